"""`Fleet`: what the fetch service talks to when a node is part of a fleet.

It bundles the node's Redis gate, registry, leases and rate limits, and turns peers into sources
the one transfer engine downloads from (a bearer header, the peer's announced sha256 and size).
"""

from __future__ import annotations

import logging
import re
import socket
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

from comfy_autocloud.config import check_node_id
from comfy_autocloud.errors import ManifestError
from comfy_autocloud.fleet.conn import FleetUnavailable, RedisGate
from comfy_autocloud.fleet.gcra import DownloadLimit, FleetByteLimiter
from comfy_autocloud.fleet.lease import LeaseInfo, Leases
from comfy_autocloud.fleet.registry import Peer, Registry
from comfy_autocloud.fleet.streams import Streams
from comfy_autocloud.sources import ResolvedSource
from comfy_autocloud.transfer import BothLimiter, Mirror, RetryPolicy, TransferOptions

log = logging.getLogger("comfy_autocloud.fleet")

def default_node_id() -> str:
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname())[:64].strip("-.")
    return name or "node"


@dataclass(frozen=True)
class FleetConfig:
    """Everything a node needs to join a fleet; `from_settings` reads it from `autocloud` settings."""

    redis_url: str
    token: str
    node_id: str
    prefix: str = "autocloud"
    lease_ttl: float = 30.0
    heartbeat_ttl: float = 15.0
    bad_ttl: float = 600.0
    downloads_per_minute: float | None = 10.0
    download_burst: int = 10
    origin_rate: float | None = None      # fleet-wide origin bytes/s
    peer_connections: int = 4
    peer_sources: int = 4                 # peers one download takes ranges from at once
    max_wait: float = 900.0               # longest wait on another node's lease before going alone
    poll: float = 0.1
    redis_timeout: float = 1.0

    def __repr__(self) -> str:  # the token and a password in the Redis URL must never be printed
        from comfy_autocloud.redact import redact_url

        return f"FleetConfig(node_id={self.node_id!r}, redis={redact_url(self.redis_url)!r})"

    @classmethod
    def from_settings(cls, settings: Any) -> FleetConfig | None:
        """None when no Redis is configured (a node alone); a clear error when the token is missing."""
        url = settings.values.get("redis_url")
        if url is None:
            return None
        token = settings.values.get("peer_token")
        if token is None:
            raise ManifestError("AUTOCLOUD_PEER_TOKEN", "a fleet (AUTOCLOUD_REDIS_URL is set) needs the shared "
                                "peer token too, the same on every node")
        v = settings.values
        return cls(redis_url=str(getattr(url, "value", url)), token=str(getattr(token, "value", token)),
                   node_id=v.get("node_id") or default_node_id(), lease_ttl=v.get("fleet_lease_ttl") or 30.0,
                   heartbeat_ttl=v.get("fleet_heartbeat_ttl") or 15.0,
                   downloads_per_minute=v.get("fleet_downloads_per_minute"),
                   download_burst=v.get("fleet_download_burst") or 10,
                   origin_rate=v.get("fleet_origin_rate"),
                   max_wait=v.get("fleet_max_wait") or 900.0)


class Fleet:
    """One node's view of the fleet. Every method may raise FleetUnavailable (Redis down)."""

    def __init__(self, config: FleetConfig) -> None:
        check_node_id(config.node_id)
        self.config = config
        self.node_id = config.node_id
        self.gate = RedisGate(config.redis_url, prefix=config.prefix, timeout=config.redis_timeout)
        self.registry = Registry(self.gate, config.node_id, heartbeat_ttl=config.heartbeat_ttl,
                                 bad_ttl=config.bad_ttl)
        self.leases = Leases(self.gate, config.node_id, ttl=config.lease_ttl)
        self.streams = Streams(self.gate, config.node_id)
        self.downloads = (DownloadLimit(self.gate, config.node_id, config.downloads_per_minute,
                                        config.download_burst) if config.downloads_per_minute else None)
        self.origin_limiter = (FleetByteLimiter(self.gate, "origin", config.origin_rate)
                               if config.origin_rate else None)

    @classmethod
    def from_settings(cls, settings: Any) -> Fleet | None:
        config = FleetConfig.from_settings(settings)
        return cls(config) if config is not None else None

    # ---------------------------------------------------------------- sources
    def _source(self, base_url: str, route: str, key: str, display: str, sha256: str | None,
                size: int | None) -> ResolvedSource:
        url = f"{base_url.rstrip('/')}/v1/{route}/{quote(key, safe='/')}"
        return ResolvedSource(kind="http", url=url, headers={"Authorization": f"Bearer {self.config.token}"},
                              display=display, expected_sha256=sha256, expected_size=size)

    def peer_source(self, peer: Peer, key: str) -> ResolvedSource:
        """A verified copy on `peer`: the engine must produce exactly the announced sha256 and size."""
        return self._source(peer.url, "files", key, f"peer {peer.node}", peer.sha256, peer.size)

    def peers_source(self, peers: list[Peer], key: str) -> tuple[ResolvedSource, tuple[Mirror, ...]]:
        """Ranges from several peers with the same verified copy: the first is probed, the rest are mirrors."""
        first, *rest = peers
        source = self.peer_source(first, key)
        mirrors = tuple(Mirror(m.url, m.headers, m.display) for m in (self.peer_source(p, key) for p in rest))
        display = "peers " + ", ".join(p.node for p in peers)
        return replace(source, display=display), mirrors

    def partial_source(self, base_url: str, holder: LeaseInfo, key: str, node: str | None = None) -> ResolvedSource:
        """A download in progress on `node` (default: the lease holder); verified afterwards against the
        hash the holder announces."""
        return self._source(base_url, "partial", key, f"peer {node or holder.node} (downloading, fence {holder.fence})",
                            None, None)

    def peer_options(self, base: TransferOptions) -> TransferOptions:
        """Peers are on the LAN: a few connections, quick retries (another source is next), no origin limits.

        Every peer download is checked against a sha256 (announced, or the holder's once it finishes), so
        a partial may be resumed from whichever peer comes next.
        """
        return replace(base, connections=self.config.peer_connections, limiter=None, rate_limit=None,
                       retry=RetryPolicy(attempts=2, backoff_base=0.1, backoff_max=0.5), connect_timeout=3.0,
                       read_timeout=45.0, expected_size=None, resume_any_source=True)

    def origin_options(self, base: TransferOptions) -> TransferOptions:
        """The node's own limits plus the fleet-wide origin byte rate."""
        if self.origin_limiter is None:
            return base
        limiter = self.origin_limiter if base.limiter is None else BothLimiter(base.limiter, self.origin_limiter)
        return replace(base, limiter=limiter)

    # ---------------------------------------------------------------- registry helpers
    def announce(self, key: str, sha256: str, size: int) -> None:
        """Best effort: a node whose Redis is down announces later, when its heartbeat reconciles."""
        try:
            self.registry.announce(key, sha256, size)
        except FleetUnavailable:
            pass

    def withdraw(self, key: str, node: str | None = None) -> None:
        try:
            self.registry.withdraw(key, node)
        except FleetUnavailable:
            pass

    def verified_sha(self, base_url: str, key: str, size: int, timeout: float) -> str | None:
        """The sha256 a node's peer server gives (as ETag) for its verified copy of `key`, once it has one.

        Asked of the node itself, not of Redis, so a follower can finish what it streamed even if
        Redis went away meanwhile. None if the node has no verified copy of that size within `timeout`.
        """
        from comfy_autocloud.errors import AutoCloudError
        from comfy_autocloud.keys import check_sha256
        from comfy_autocloud.transfer import probe

        source = self._source(base_url, "files", key, "peer", None, None)
        options = replace(self.peer_options(TransferOptions()), headers=source.headers,
                          retry=RetryPolicy(attempts=1))
        deadline = time.monotonic() + timeout
        while True:
            try:
                info = probe(source.url, options)
                if info.size == size and info.etag:
                    return check_sha256(info.etag.strip('"'))
            except (AutoCloudError, ValueError):
                pass
            if time.monotonic() >= deadline:
                return None
            time.sleep(self.config.poll / 2)

    def close(self) -> None:
        self.gate.close()
