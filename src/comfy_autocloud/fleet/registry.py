"""Who is in the fleet and who holds which verified file, kept in Redis.

Keys (under the gate's prefix):

- `node:<id>` hash {url, pid, started, seen}, expiring after the heartbeat TTL: a node that stops
  heartbeating (crashed, partitioned) drops out on its own; `nodes` is the set of ids ever seen.
- `have:<key>` hash {node id: "sha256 size"}: nodes holding a verified copy of `key`; the sha256
  travels with it so a downloader knows what the peer's bytes must hash to.
- `files:<node>` set of keys that node announced (so a node can reconcile after a Redis restart).
- `bad:<node>` a node caught serving bytes that did not match their hash; skipped until it expires.

Announcements follow the store: after a commit (the fetch service), and every heartbeat a node
reconciles its store with what Redis says (files evicted by any process, files that arrived while
Redis was down, everything after Redis lost its data).
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from comfy_autocloud.fleet.conn import FleetUnavailable, RedisGate

if TYPE_CHECKING:
    from comfy_autocloud.store import Store

log = logging.getLogger("comfy_autocloud.fleet")


@dataclass(frozen=True)
class Peer:
    """A node that announced a verified copy of one file."""

    node: str
    url: str       # base URL of its peer server, e.g. http://10.0.0.5:8765
    sha256: str
    size: int


@dataclass(frozen=True)
class Holding:
    key: str
    sha256: str
    size: int


def holdings_of(store: Store) -> list[Holding]:
    """What a node announces: its cached files whose sha256 is known (a warmup copy is announced once
    hashed: peers verify what they get against the announced hash)."""
    return [Holding(e.key, e.sha256, e.size) for e in store.entries() if e.hashed]


class Registry:
    """Node liveness and file holdings in Redis (see module docstring for the key layout)."""

    def __init__(self, gate: RedisGate, node_id: str, *, heartbeat_ttl: float = 15.0, bad_ttl: float = 600.0) -> None:
        self.gate = gate
        self.node_id = node_id
        self.heartbeat_ttl = heartbeat_ttl
        self.bad_ttl = bad_ttl

    # ---------------------------------------------------------------- nodes
    def heartbeat(self, url: str) -> None:
        """Say this node is alive at `url` for the next `heartbeat_ttl` seconds."""
        k = self.gate.key("node", self.node_id)
        ttl_ms = int(self.heartbeat_ttl * 1000)

        def go(r):  # type: ignore[no-untyped-def]
            p = r.pipeline(transaction=True)
            p.hset(k, mapping={"url": url, "pid": os.getpid(), "seen": f"{time.time():.3f}"})
            p.hsetnx(k, "started", f"{time.time():.3f}")
            p.pexpire(k, ttl_ms)
            p.sadd(self.gate.key("nodes"), self.node_id)
            p.execute()

        self.gate.run(go)

    def leave(self) -> None:
        """Drop this node's liveness record at once (clean shutdown); its holdings stop counting."""
        self.gate.call(lambda r: r.delete(self.gate.key("node", self.node_id)))

    def nodes(self) -> dict[str, dict[str, str]]:
        """Live nodes and their records."""

        def go(r):  # type: ignore[no-untyped-def]
            ids = sorted(r.smembers(self.gate.key("nodes")))
            p = r.pipeline(transaction=False)
            for node in ids:
                p.hgetall(self.gate.key("node", node))
            return {n: rec for n, rec in zip(ids, p.execute(), strict=True) if rec}

        return self.gate.run(go)

    # ---------------------------------------------------------------- holdings
    def announce(self, key: str, sha256: str, size: int) -> None:
        """This node now holds a verified copy of `key`."""

        def go(r):  # type: ignore[no-untyped-def]
            p = r.pipeline(transaction=True)
            p.hset(self.gate.key("have", key), self.node_id, f"{sha256} {size}")
            p.sadd(self.gate.key("files", self.node_id), key)
            p.execute()

        self.gate.run(go)

    def withdraw(self, key: str, node: str | None = None) -> None:
        """`node` (default: this one) no longer holds `key`."""
        node = node or self.node_id

        def go(r):  # type: ignore[no-untyped-def]
            p = r.pipeline(transaction=True)
            p.hdel(self.gate.key("have", key), node)
            p.srem(self.gate.key("files", node), key)
            p.execute()

        self.gate.run(go)

    def holders(self, key: str, sha256: str | None = None, *, include_self: bool = False) -> list[Peer]:
        """Live, not-bad nodes holding `key` (with `sha256` if given), in random order to spread load."""

        def go(r):  # type: ignore[no-untyped-def]
            have = r.hgetall(self.gate.key("have", key))
            nodes = [n for n in have if include_self or n != self.node_id]
            if not nodes:
                return []
            p = r.pipeline(transaction=False)
            for node in nodes:
                p.hget(self.gate.key("node", node), "url")
                p.exists(self.gate.key("bad", node))
            answers = p.execute()
            out = []
            for i, node in enumerate(nodes):
                url, bad = answers[2 * i], answers[2 * i + 1]
                sha, _, size = have[node].partition(" ")
                if not url or bad or (sha256 is not None and sha != sha256) or not size.isdigit():
                    continue
                out.append(Peer(node, url, sha, int(size)))
            return out

        peers: list[Peer] = self.gate.run(go)
        random.shuffle(peers)
        return peers

    def holding(self, key: str, node: str) -> Holding | None:
        """What `node` announced for `key`, if anything."""
        value = self.gate.run(lambda r: r.hget(self.gate.key("have", key), node))
        if not value:
            return None
        sha, _, size = value.partition(" ")
        return Holding(key, sha, int(size)) if size.isdigit() else None

    def node_url(self, node: str) -> str | None:
        return self.gate.run(lambda r: r.hget(self.gate.key("node", node), "url"))

    def mark_bad(self, node: str, reason: str) -> None:
        """Skip `node` as a source for `bad_ttl` seconds (it served bytes that failed verification)."""
        log.warning("fleet: peer %s marked bad for %.0fs: %s", node, self.bad_ttl, reason)
        self.gate.call(lambda r: r.set(self.gate.key("bad", node), reason[:200], px=int(self.bad_ttl * 1000)))

    def is_bad(self, node: str) -> bool:
        return bool(self.gate.run(lambda r: r.exists(self.gate.key("bad", node))))

    def reconcile(self, held: Iterable[Holding]) -> tuple[int, int]:
        """Make Redis say exactly what this node's store holds; returns (announced, withdrawn)."""
        wanted = {h.key: h for h in held}
        files_key = self.gate.key("files", self.node_id)

        def go(r):  # type: ignore[no-untyped-def]
            known = r.smembers(files_key)
            p = r.pipeline(transaction=False)
            for key in known:
                p.hget(self.gate.key("have", key), self.node_id)
            values = dict(zip(known, p.execute(), strict=True))
            p = r.pipeline(transaction=True)
            added = removed = 0
            for key, h in wanted.items():
                if values.get(key) != f"{h.sha256} {h.size}":
                    p.hset(self.gate.key("have", key), self.node_id, f"{h.sha256} {h.size}")
                    p.sadd(files_key, key)
                    added += 1
            for key in known - wanted.keys():
                p.hdel(self.gate.key("have", key), self.node_id)
                p.srem(files_key, key)
                removed += 1
            if added or removed:
                p.execute()
            return added, removed

        return self.gate.run(go)


class Heartbeat(threading.Thread):
    """Background thread: heartbeat every TTL/3 and reconcile holdings with the store, until stopped."""

    def __init__(self, registry: Registry, url: str, held: Callable[[], Iterable[Holding]],
                 interval: float | None = None) -> None:
        super().__init__(name="autocloud-heartbeat", daemon=True)
        self.registry = registry
        self.url = url
        self.held = held
        self.interval = interval if interval is not None else max(0.2, registry.heartbeat_ttl / 3)
        self._stop_event = threading.Event()
        self.beats = 0

    def beat(self) -> None:
        try:
            self.registry.heartbeat(self.url)
            added, removed = self.registry.reconcile(self.held())
        except FleetUnavailable:
            return  # the gate logged it once; try again next beat
        self.beats += 1
        if added or removed:
            log.info("fleet: reconciled holdings (+%d, -%d)", added, removed)

    def run(self) -> None:
        while not self._stop_event.is_set():
            try:
                self.beat()
            except Exception:  # a bug here must not kill the heartbeat silently forever
                log.exception("fleet: heartbeat failed")
            self._stop_event.wait(self.interval)

    def stop(self, leave: bool = True) -> None:
        self._stop_event.set()
        if self.is_alive():
            self.join(timeout=5)
        if leave:
            self.registry.leave()
