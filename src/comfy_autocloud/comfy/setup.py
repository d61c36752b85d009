"""Entry point called from the pack's `__init__.py` when ComfyUI loads custom nodes.

Order matters: settings -> store/catalog -> folder_paths hooks -> routes and the prompt handler on
PromptServer -> websocket progress -> background prefetcher. Each step that touches ComfyUI is
guarded: a missing piece is logged once and the rest still works; nothing here may stop ComfyUI from
starting.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from comfy_autocloud.comfy.runtime import Adapter

log = logging.getLogger("comfy_autocloud")

_adapter: Adapter | None = None
_lock = threading.Lock()
WS_EVENT = "autocloud.progress"


def get_adapter() -> Adapter | None:
    """The adapter of this ComfyUI process (None before setup or when it failed)."""
    return _adapter


def _server() -> Any:
    try:
        from server import PromptServer  # ComfyUI

        return getattr(PromptServer, "instance", None)
    except Exception:
        return None


def _attach_server(adapter: Adapter, server: Any) -> None:
    from comfy_autocloud.comfy import routes

    table = getattr(server, "routes", None)
    if table is not None and hasattr(table, "route"):
        routes.add_to(table, adapter)
    else:
        log.warning("autocloud: PromptServer.routes missing; /autocloud/* routes are off")

    if adapter.settings.values.get("prefetch", True):
        add_handler = getattr(server, "add_on_prompt_handler", None)
        if callable(add_handler):
            def on_prompt(json_data: Any) -> Any:
                try:
                    adapter.prefetch(json_data)
                except Exception:
                    log.exception("autocloud: prefetch failed; models download when the loaders run")
                return json_data

            add_handler(on_prompt)
        else:
            log.warning("autocloud: PromptServer.add_on_prompt_handler missing; no workflow prefetch "
                        "(models still download when their loader runs)")

    send = getattr(server, "send_sync", None)
    if callable(send):
        def push(payload: dict[str, Any]) -> None:
            send(WS_EVENT, payload)

        adapter.tracker.add_listener(push)


def _start_prefetcher(adapter: Adapter) -> None:
    if not adapter.settings.values.get("prefetch_background"):
        return
    from comfy_autocloud.comfy.background_prefetch import prefetcher_for

    adapter.prefetcher = prefetcher_for(adapter).start()  # type: ignore[attr-defined]


def _start_memory_preload(adapter: Adapter, user_dir: str | None) -> None:
    """Memory preload: preload_config.json into the preload registry (background, or blocking for snapshots)."""
    from comfy_autocloud.comfy import nodes_preload

    nodes_preload.start(adapter.settings.values, user_dir, adapter.resolve_missing)


def setup() -> Adapter | None:
    """Install the adapter once; returns it, or None when it could not start (ComfyUI runs on without it)."""
    global _adapter
    with _lock:
        if _adapter is not None:
            return _adapter
        try:
            import folder_paths  # ComfyUI
        except Exception:
            log.info("autocloud: not running inside ComfyUI (no folder_paths); adapter not installed")
            return None
        try:
            from comfy_autocloud.comfy import hooks
            from comfy_autocloud.comfy.settings import load_comfy_settings

            user_dir = folder_paths.get_user_directory() if hasattr(folder_paths, "get_user_directory") else None
            settings = load_comfy_settings(user_dir)
            adapter = Adapter.create(settings, is_present=hooks.original_is_present(folder_paths))
            wrapped = hooks.install(folder_paths, adapter)
            adapter.layout_provider = lambda: hooks.layout(folder_paths)
        except Exception:
            log.exception("autocloud: adapter not installed; ComfyUI runs with its standard model folders")
            return None
        server = _server()
        if server is not None:
            try:
                _attach_server(adapter, server)
            except Exception:
                log.exception("autocloud: routes/prefetch not installed")
        else:
            log.warning("autocloud: no PromptServer instance; routes, prefetch and UI progress are off")
        try:
            _start_prefetcher(adapter)
        except Exception:
            log.exception("autocloud: background disk prefetcher not started")
        try:
            _start_memory_preload(adapter, user_dir)
        except Exception:
            log.exception("autocloud: memory preload not started; cached loaders load on first use")
        _adapter = adapter
        log.info("autocloud: cache %s (%s), %d models offered, hooks: %s", adapter.store.root,
                 "cap " + str(settings.max_size) if settings.max_size else "no cap", len(adapter.catalog),
                 ", ".join(wrapped) or "none")
        return adapter
