"""This node's side of the fleet inside a long-running process (ComfyUI): serve and announce files.

`autocloud serve-peer` does the same as a separate process (a sidecar); in ComfyUI, setting
AUTOCLOUD_PEER_SERVE=1 runs it on a background thread so one container is a whole fleet node.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

from comfy_autocloud.fleet.client import Fleet
from comfy_autocloud.fleet.peer_server import PeerLimits, PeerServer, PeerServerThread
from comfy_autocloud.fleet.registry import Heartbeat, holdings_of
from comfy_autocloud.store import Store

log = logging.getLogger(__name__)


def advertised_url(host: str, port: int, explicit: str | None) -> str:
    """The URL other nodes reach this one at: the explicit one, else this host's name for a wildcard bind."""
    if explicit:
        return explicit.rstrip("/")
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"http://{host}:{port}"


def peer_limits(settings: Any) -> PeerLimits:
    rps = float(settings.values.get("peer_requests_per_s") or 200.0)
    return PeerLimits(requests_per_s=rps, burst=max(1, int(2 * rps)),
                      bytes_per_s=settings.values.get("peer_rate_limit"),
                      public_metrics=bool(settings.values.get("peer_metrics_public")))


class PeerNode:
    """A peer server thread plus the heartbeat that announces what the store holds."""

    def __init__(self, store: Store, fleet: Fleet, *, host: str, port: int, advertise: str | None,
                 limits: PeerLimits) -> None:
        self.store = store
        self.fleet = fleet
        self.host = host
        self.advertise = advertise
        server = PeerServer(store, fleet.config.token, node_id=fleet.node_id, limits=limits)
        self.server = PeerServerThread(server, host=host, port=port)
        self.heartbeat: Heartbeat | None = None
        self.url = ""

    @classmethod
    def from_settings(cls, store: Store, fleet: Fleet, settings: Any) -> PeerNode:
        v = settings.values
        return cls(store, fleet, host=v.get("peer_host") or "0.0.0.0", port=int(v.get("peer_port") or 0),
                   advertise=v.get("peer_url"), limits=peer_limits(settings))

    def start(self) -> PeerNode:
        self.server.start()
        self.url = advertised_url(self.host, self.server.port, self.advertise)
        self.heartbeat = Heartbeat(self.fleet.registry, self.url, lambda: holdings_of(self.store))
        self.heartbeat.start()
        log.info("fleet: node %s serves its files at %s", self.fleet.node_id, self.url)
        return self

    def stop(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop(leave=True)
        self.server.stop()
