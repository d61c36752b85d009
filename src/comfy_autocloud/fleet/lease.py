"""A fleet-wide lease per model key: one node downloads from the origin, the others wait or stream.

Acquire is one Lua script: if the lease key is free, INCR the key's fencing counter and
`SET lease "<node> <fence> <nonce>" NX PX ttl`. The holder renews it (compare-and-PEXPIRE) from a
background thread every ttl/3; a crashed holder stops renewing and the lease expires, so another
node takes over. The fencing token grows with every acquisition: a follower streaming from holder
fence 7 knows that holder was replaced when the lease shows fence 8, and a holder that was paused
past its TTL learns on its next renewal that it lost the lease.
"""

from __future__ import annotations

import logging
import threading
import uuid
from dataclasses import dataclass

from comfy_autocloud.fleet.conn import FleetUnavailable, RedisGate

log = logging.getLogger("comfy_autocloud.fleet")

ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local fence = redis.call('INCR', KEYS[2])
local value = ARGV[1] .. ' ' .. fence .. ' ' .. ARGV[2]
redis.call('SET', KEYS[1], value, 'NX', 'PX', ARGV[3])
return value
"""

RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
return 0
"""

RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class LeaseInfo:
    """Who holds a key's lease: node id and fencing token."""

    node: str
    fence: int
    value: str

    @classmethod
    def parse(cls, value: str | None) -> LeaseInfo | None:
        if not value:
            return None
        parts = value.split(" ")
        if len(parts) != 3 or not parts[1].isdigit():
            return None
        return cls(parts[0], int(parts[1]), value)


class Lease:
    """A held lease, renewed in the background until released; `lost` turns True if it expired."""

    def __init__(self, leases: Leases, key: str, info: LeaseInfo) -> None:
        self.leases = leases
        self.key = key
        self.info = info
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._renew_loop, name="autocloud-lease", daemon=True)
        self._thread.start()

    @property
    def fence(self) -> int:
        return self.info.fence

    def _renew_loop(self) -> None:
        interval = self.leases.ttl / 3
        while not self._stop.wait(interval):
            try:
                ok = self.leases.gate.run(lambda r: self.leases._renew(
                    keys=[self.leases.lease_key(self.key)], args=[self.info.value, int(self.leases.ttl * 1000)],
                    client=r))
            except FleetUnavailable:
                continue  # Redis gone: the download goes on; the lease may expire meanwhile
            if not int(ok):
                self.lost = True
                log.warning("fleet: lost the lease on %s (fence %d): another node may fetch it too",
                            self.key, self.info.fence)
                return

    def release(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.leases.gate.call(lambda r: self.leases._release(
            keys=[self.leases.lease_key(self.key)], args=[self.info.value], client=r))

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Leases:
    """Acquire and inspect per-key leases for one node."""

    def __init__(self, gate: RedisGate, node_id: str, ttl: float = 30.0) -> None:
        if ttl <= 0:
            raise ValueError(f"lease TTL must be positive, got {ttl}")
        self.gate = gate
        self.node_id = node_id
        self.ttl = ttl
        self._acquire = gate.script(ACQUIRE)
        self._renew = gate.script(RENEW)
        self._release = gate.script(RELEASE)

    def lease_key(self, key: str) -> str:
        return self.gate.key("lease", key)

    def try_acquire(self, key: str) -> Lease | None:
        """The lease if it was free (renewed until released), else None. Raises FleetUnavailable."""
        value = self.gate.run(lambda r: self._acquire(
            keys=[self.lease_key(key), self.gate.key("fence", key)],
            args=[self.node_id, uuid.uuid4().hex[:12], int(self.ttl * 1000)], client=r))
        info = LeaseInfo.parse(value)
        if info is None:
            return None
        log.info("fleet: %s: lease acquired (fence %d)", key, info.fence)
        return Lease(self, key, info)

    def holder(self, key: str) -> LeaseInfo | None:
        return LeaseInfo.parse(self.gate.run(lambda r: r.get(self.lease_key(key))))
