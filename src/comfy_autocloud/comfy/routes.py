"""HTTP routes under /autocloud/ (aiohttp handlers, added to ComfyUI's PromptServer.routes).

Store and index work runs in a worker thread so the server's event loop never waits on SQLite or
the disk. Errors answer 400/404/409 with {"error": "thing: reason"}; secrets are already redacted.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from comfy_autocloud.comfy.metrics import CONTENT_TYPE, render_metrics
from comfy_autocloud.comfy.runtime import Adapter
from comfy_autocloud.errors import AutoCloudError, ManifestError, StoreError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError):
        raise ManifestError("request body", "expected JSON") from None
    if not isinstance(data, dict):
        raise ManifestError("request body", "expected a JSON object")
    return data


def _key(data: dict[str, Any]) -> str:
    key = data.get("key")
    if not isinstance(key, str) or not key:
        raise ManifestError("request.key", "missing; give the model key 'folder/filename'")
    return key


def _status_for(exc: AutoCloudError) -> int:
    if isinstance(exc, StoreError) and "not in the cache" in exc.reason:
        return 404
    if isinstance(exc, StoreError):
        return 409
    return 400


def _guard(fn: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        try:
            return await fn(request)
        except AutoCloudError as exc:
            return _error(_status_for(exc), str(exc))

    return handler


def route_defs(adapter: Adapter) -> list[web.RouteDef]:
    """The adapter's routes; `setup` adds them to PromptServer.instance.routes, tests to a bare app."""

    async def status(request: web.Request) -> web.StreamResponse:
        return web.json_response(await asyncio.to_thread(adapter.status))

    async def metrics(request: web.Request) -> web.StreamResponse:
        text = render_metrics(await asyncio.to_thread(adapter.status))
        return web.Response(text=text, headers={"Content-Type": CONTENT_TYPE})

    async def fetch(request: web.Request) -> web.StreamResponse:
        key = await asyncio.to_thread(adapter.request_fetch, await _body(request))
        return web.json_response({"key": key, "started": True}, status=202)

    async def evict(request: web.Request) -> web.StreamResponse:
        data = await _body(request)
        removed = await asyncio.to_thread(adapter.evict, _key(data), bool(data.get("force", False)))
        return web.json_response({"evicted": removed})

    async def pin(request: web.Request) -> web.StreamResponse:
        data = await _body(request)
        pinned = bool(data.get("pinned", True))
        key = _key(data)
        await asyncio.to_thread(adapter.set_pinned, key, pinned)
        return web.json_response({"key": key, "pinned": pinned})

    async def cancel(request: web.Request) -> web.StreamResponse:
        key = _key(await _body(request))
        if not await asyncio.to_thread(adapter.cancel, key):
            return _error(404, f"{key}: no download of it is running")
        return web.json_response({"key": key, "cancelled": True})

    async def dismiss(request: web.Request) -> web.StreamResponse:
        key = _key(await _body(request))
        return web.json_response({"key": key, "dismissed": await asyncio.to_thread(adapter.dismiss, key)})

    async def workflow(request: web.Request) -> web.StreamResponse:
        data = await _body(request)
        return web.json_response(await asyncio.to_thread(adapter.check_workflow, data.get("workflow")))

    async def doctor(request: web.Request) -> web.StreamResponse:
        return web.json_response(await asyncio.to_thread(adapter.doctor))

    return [
        *preload_route_defs(),
        web.get("/autocloud/doctor", _guard(doctor)),
        web.post("/autocloud/dismiss", _guard(dismiss)),
        web.post("/autocloud/workflow", _guard(workflow)),
        web.get("/autocloud/status", _guard(status)),
        web.get("/autocloud/metrics", _guard(metrics)),
        web.post("/autocloud/fetch", _guard(fetch)),
        web.post("/autocloud/evict", _guard(evict)),
        web.post("/autocloud/pin", _guard(pin)),
        web.post("/autocloud/cancel", _guard(cancel)),
    ]


def preload_route_defs() -> list[web.RouteDef]:
    """GET /autocloud/preload (registry status; ?verify=1 re-hashes held weights), POST …/load_all, …/to_gpu."""
    from comfy_autocloud.preload import snapshot
    from comfy_autocloud.preload.held_models import current

    def _reg() -> Any:
        reg = current()
        if reg is None:
            raise ManifestError("preload", "the preload registry is not running in this ComfyUI")
        return reg

    def _status(verify: bool) -> dict[str, Any]:
        reg = _reg()
        st = reg.status()
        if verify:
            st["verified"] = {e["name"]: reg.verify(e["name"]) for e in st["entries"]}
        return st

    async def preload(request: web.Request) -> web.StreamResponse:
        verify = request.query.get("verify", "") in ("1", "true", "yes")
        return web.json_response(await asyncio.to_thread(_status, verify))

    async def load_all(request: web.Request) -> web.StreamResponse:
        data = await _body(request) if request.can_read_body else {}
        device = str(data.get("device", "cpu"))
        reg = _reg()
        return web.json_response(await asyncio.to_thread(snapshot.load_all, device, registry=reg))

    async def to_gpu(request: web.Request) -> web.StreamResponse:
        reg = _reg()
        return web.json_response(await asyncio.to_thread(snapshot.to_gpu, registry=reg))

    return [
        web.get("/autocloud/preload", _guard(preload)),
        web.post("/autocloud/preload/load_all", _guard(load_all)),
        web.post("/autocloud/preload/to_gpu", _guard(to_gpu)),
    ]


def add_to(routes: web.RouteTableDef, adapter: Adapter) -> None:
    """Register on a RouteTableDef (ComfyUI's PromptServer.routes also serves them under /api)."""
    for rd in route_defs(adapter):
        routes.route(rd.method, rd.path)(rd.handler)
