"""Fleet-wide rate limits as GCRA (generic cell rate algorithm) Lua scripts run inside Redis.

GCRA keeps one number per limit, the theoretical arrival time (TAT), so a limit costs one key and
one EVALSHA however many nodes share it, and Redis' own clock (`TIME`) is the only clock: nodes
with skewed clocks still share the rate exactly. Two forms:

- `DownloadLimit`: allow-or-deny ("10 downloads a minute per node", burst N). A denied caller is told
  when to ask again and waits (cancellable); nothing is recorded for a denied request.
- `FleetByteLimiter`: reservation with debt for byte streams ("origin bytes per second, fleet-wide").
  The engine asks for bytes per chunk; this limiter takes 1-4 MiB grants from Redis at a time, so
  Redis sees a few calls a second, not one per network read.

Redis down: both fall back to an equivalent local limit (this node alone), logged once by the gate.
"""

from __future__ import annotations

import logging
import threading
import time

from comfy_autocloud.errors import Cancelled
from comfy_autocloud.fleet.conn import FleetUnavailable, RedisGate
from comfy_autocloud.progress import CancelToken
from comfy_autocloud.transfer import RateLimiter

log = logging.getLogger("comfy_autocloud.fleet")

# Both scripts: KEYS[1] = TAT key; ARGV = emission interval (us per unit), burst tolerance (us), cost (units).
# The shared prelude reads Redis' clock and computes the new theoretical arrival time (new_tat).
_GCRA_PRELUDE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
local new_tat = tat + cost * interval
"""

# Returns {allowed (0/1), retry_after_us}; numbers as strings (Lua numbers would be truncated).
GCRA_ALLOW = _GCRA_PRELUDE + """
local allow_at = new_tat - tolerance - interval
if now < allow_at then
  return {0, tostring(allow_at - now)}
end
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
return {1, '0'}
"""

# Reservation form: the cost is always taken (going into debt); the reply says how long to wait (us)
# before using it, so the aggregate over all callers is exactly the rate plus one burst.
GCRA_RESERVE = _GCRA_PRELUDE + """
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000) + 1)
local wait = new_tat - tolerance - now
if wait < 0 then wait = 0 end
return tostring(wait)
"""


class _LocalGCRA:
    """The same allow-or-deny algorithm in process memory (used while Redis is unreachable)."""

    def __init__(self, interval: float, tolerance: float) -> None:
        self.interval = interval
        self.tolerance = tolerance
        self.tat = 0.0
        self._lock = threading.Lock()

    def allow(self) -> float:
        with self._lock:
            now = time.monotonic()
            tat = max(self.tat, now)
            new_tat = tat + self.interval
            allow_at = new_tat - self.tolerance - self.interval
            if now < allow_at:
                return allow_at - now
            self.tat = new_tat
            return 0.0


class DownloadLimit:
    """At most `per_minute` origin downloads a minute for one node (burst `burst`), shared by its processes."""

    def __init__(self, gate: RedisGate, node_id: str, per_minute: float, burst: int = 1) -> None:
        if per_minute <= 0:
            raise ValueError(f"downloads per minute must be positive, got {per_minute}")
        self.gate = gate
        self.key = gate.key("rl", "downloads", node_id)
        self.interval_us = 60e6 / per_minute
        self.tolerance_us = max(0, burst - 1) * self.interval_us
        self._script = gate.script(GCRA_ALLOW)
        self._local = _LocalGCRA(self.interval_us / 1e6, self.tolerance_us / 1e6)

    def try_acquire(self) -> float:
        """Take one download if allowed now (returns 0.0), else return seconds until one is allowed."""
        try:
            allowed, retry_us = self.gate.run(lambda r: self._script(
                keys=[self.key], args=[self.interval_us, self.tolerance_us, 1], client=r))
        except FleetUnavailable:
            return self._local.allow()
        return 0.0 if int(allowed) == 1 else float(retry_us) / 1e6

    def acquire(self, cancel: CancelToken | None = None, on_wait: object = None, max_wait: float = 3600.0) -> float:
        """Block until a download is allowed; returns the seconds waited. Cancellable."""
        waited = 0.0
        while True:
            wait = self.try_acquire()
            if wait <= 0:
                return waited
            if waited == 0.0:
                log.info("fleet: download rate limit reached, waiting %.1fs", wait)
                if callable(on_wait):
                    on_wait(wait)
            step = min(wait, 0.25)
            if cancel is not None and cancel.cancelled:
                raise Cancelled(self.key, "cancelled while waiting for the download rate limit")
            if waited >= max_wait:
                return waited
            time.sleep(step)
            waited += step


class FleetByteLimiter(RateLimiter):
    """A `RateLimiter` for the transfer engine whose tokens come from one Redis GCRA shared fleet-wide.

    `reserve(n)` spends from a local grant; when the grant is used up it reserves the next 1-4 MiB
    (about 1/20 s of the rate) from Redis and passes on Redis' wait. While Redis is down it behaves
    as a plain local token bucket of the same rate.
    """

    def __init__(self, gate: RedisGate, name: str, rate_bytes_per_s: float, burst: int | None = None) -> None:
        super().__init__(rate_bytes_per_s, burst)
        self.gate = gate
        self.key = gate.key("rl", "bytes", name)
        self.interval_us = 1e6 / self.rate
        self.tolerance_us = self.burst * self.interval_us
        self.grant = int(min(4 << 20, max(1 << 20, self.rate / 20)))
        self._script = gate.script(GCRA_RESERVE)
        self._bank = 0
        self._bank_ready = 0.0     # monotonic time from which the banked bytes may be used
        self._bank_lock = threading.Lock()

    def reserve(self, nbytes: int) -> float:
        with self._bank_lock:
            now = time.monotonic()
            if self._bank >= nbytes:
                # Banked bytes were reserved with a wait: a second connection must not use them before it.
                self._bank -= nbytes
                return max(0.0, self._bank_ready - now)
            need = nbytes - self._bank
            take = max(need, self.grant)
            try:
                wait_us = self.gate.run(lambda r: self._script(
                    keys=[self.key], args=[self.interval_us, self.tolerance_us, take], client=r))
            except FleetUnavailable:
                self._bank = 0
                return super().reserve(nbytes)
            wait = float(wait_us) / 1e6
            self._bank = take - need
            self._bank_ready = now + wait
            return wait

    def __repr__(self) -> str:
        return f"FleetByteLimiter({self.key!r}, rate={self.rate:.0f} B/s)"

