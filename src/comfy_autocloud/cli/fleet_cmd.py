"""`autocloud serve-peer` (this node's files for the fleet) and `autocloud fleet status`."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import TYPE_CHECKING

import click

from comfy_autocloud.cli.context import AppContext, pass_app
from comfy_autocloud.cli.output import console, emit_json, err_console
from comfy_autocloud.errors import ManifestError

if TYPE_CHECKING:
    from comfy_autocloud.fleet.peer_server import PeerServer

log = logging.getLogger("comfy_autocloud.fleet")


@click.command("serve-peer")
@click.option("--host", default=None, help="Listen address [env AUTOCLOUD_PEER_HOST; default 0.0.0.0].")
@click.option("--port", type=click.IntRange(0, 65535), default=None,
              help="Listen port [env AUTOCLOUD_PEER_PORT; default 8765].")
@click.option("--token", default=None, help="Shared peer token [env AUTOCLOUD_PEER_TOKEN, preferred: "
                                            "command lines are visible to other users].")
@click.option("--url", "advertise", default=None,
              help="URL other nodes reach this server at [env AUTOCLOUD_PEER_URL; default http://<host>:<port>].")
@click.option("--node-id", default=None,
              help="This node's name in the fleet [env AUTOCLOUD_NODE_ID; default: host name].")
@pass_app
def serve_peer_cmd(app: AppContext, host: str | None, port: int | None, token: str | None, advertise: str | None,
                   node_id: str | None) -> None:
    """Serve this node's verified model files to the other nodes of the fleet (and announce them in Redis)."""
    from comfy_autocloud.config import Secret, check_node_id
    from comfy_autocloud.fleet.client import default_node_id
    from comfy_autocloud.fleet.node import peer_limits
    from comfy_autocloud.fleet.peer_server import PeerServer

    s = app.settings
    secret = token or (s.peer_token.value if isinstance(s.peer_token, Secret) else None)
    if not secret:
        raise ManifestError("serve-peer", "a peer token is required (--token or AUTOCLOUD_PEER_TOKEN)")
    try:
        node = check_node_id(node_id or s.node_id or default_node_id())
        server = PeerServer(app.store(), secret, node_id=node, limits=peer_limits(s))
    except ValueError as exc:
        raise ManifestError("serve-peer", str(exc)) from None
    listen_host = host or s.peer_host
    listen_port = s.peer_port if port is None else port
    asyncio.run(_serve(app, server, node, listen_host, listen_port, advertise or s.peer_url, secret))


async def _serve(app: AppContext, server: PeerServer, node: str, host: str, port: int, advertise: str | None,
                 token: str) -> None:
    """Run until SIGTERM/SIGINT; heartbeat and announce this node's files while Redis is configured."""
    from comfy_autocloud.fleet.node import advertised_url
    from comfy_autocloud.fleet.peer_server import serve_forever
    from comfy_autocloud.fleet.registry import Heartbeat, holdings_of

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    heartbeat: Heartbeat | None = None
    fleet = None

    def ready(actual: int) -> None:
        nonlocal heartbeat, fleet
        url = advertised_url(host, actual, advertise)
        if app.settings.redis_url is not None:
            from dataclasses import replace

            from comfy_autocloud.fleet.client import Fleet, FleetConfig

            config = FleetConfig.from_settings(app.settings)
            assert config is not None
            fleet = Fleet(replace(config, node_id=node, token=token))
            store = app.store()
            heartbeat = Heartbeat(fleet.registry, url, lambda: holdings_of(store))
            heartbeat.start()
        console.print(f"peer server for node {node} listening on http://{host}:{actual} (advertised as {url})",
                      highlight=False, soft_wrap=True)
        if app.settings.redis_url is None:
            err_console.print("no AUTOCLOUD_REDIS_URL: serving files, but not announcing them to a fleet")

    try:
        await serve_forever(server, host, port, on_ready=ready, stop=stop)
    finally:
        if heartbeat is not None:
            heartbeat.stop(leave=True)
        if fleet is not None:
            fleet.close()


@click.group("fleet")
def fleet_group() -> None:
    """Inspect the fleet (nodes, who holds a file, leases)."""


@fleet_group.command("status")
@click.option("--key", "keys", multiple=True, metavar="FOLDER/FILE", help="Also show holders and lease of this key.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@pass_app
def fleet_status_cmd(app: AppContext, keys: tuple[str, ...], as_json: bool) -> None:
    """Live nodes of the fleet, and for each --key the nodes holding it and its lease."""
    from comfy_autocloud.fleet.conn import FleetUnavailable
    from comfy_autocloud.services import open_fleet

    fleet = open_fleet(app.settings)
    if fleet is None:
        raise ManifestError("fleet status", "no fleet configured (set AUTOCLOUD_REDIS_URL or --redis-url)")
    try:
        nodes = fleet.registry.nodes()
        files = {}
        for key in keys:
            lease = fleet.leases.holder(key)
            files[key] = {"holders": [{"node": p.node, "sha256": p.sha256, "size": p.size}
                                      for p in fleet.registry.holders(key, include_self=True)],
                          "lease": {"node": lease.node, "fence": lease.fence} if lease else None}
    except FleetUnavailable as exc:
        raise ManifestError(exc.subject, exc.reason) from None
    finally:
        fleet.close()
    if as_json:
        emit_json({"nodes": {n: {"url": r.get("url"), "seen": r.get("seen")} for n, r in nodes.items()},
                   "files": files})
        return
    console.print(f"{len(nodes)} live node(s)")
    for n, rec in nodes.items():
        console.print(f"  {n}  {rec.get('url')}", highlight=False)
    for key, info in files.items():
        holders = ", ".join(h["node"] for h in info["holders"]) or "nobody"  # type: ignore[index]
        lease = info["lease"]
        held = "none" if lease is None else f"{lease['node']} (fence {lease['fence']})"  # type: ignore[index]
        console.print(f"{key}: held by {holders}; lease: {held}", highlight=False)
