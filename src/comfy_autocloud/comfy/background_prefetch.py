"""Runs the background disk prefetcher for the adapter: its downloads show up in status and the panel
as reason 'background' (shown as "fetching ahead"), and it steps aside whenever a prompt's prefetch, a
loader or an API download runs."""

from __future__ import annotations

from comfy_autocloud.comfy.runtime import Adapter
from comfy_autocloud.comfy.tracker import BACKGROUND
from comfy_autocloud.errors import AutoCloudError
from comfy_autocloud.fetch.service import FetchResult
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.prefetch.prefetcher import BackgroundPrefetcher


def prefetcher_for(adapter: Adapter) -> BackgroundPrefetcher:
    s = adapter.settings.values
    tracker = adapter.tracker

    def on_start(spec: ModelSpec) -> None:
        tracker.begin(spec.key, BACKGROUND)

    def on_done(spec: ModelSpec, result: FetchResult | None, error: AutoCloudError | None) -> None:
        if error is not None:
            tracker.finish(spec.key, error=str(error))
        elif result is None:
            tracker.finish(spec.key, error=f"{spec.key}: prefetch stopped")
        else:
            tracker.finish(spec.key, bytes_downloaded=result.bytes_downloaded, seconds=result.seconds,
                           cached=result.cached)
            adapter._changed(spec.key)

    return BackgroundPrefetcher(adapter.store, adapter.fetch_service, adapter.catalog.specs,
                                rate=s.get("prefetch_rate") or 50 * 2**20, top=int(s.get("prefetch_top", 10)),
                                interval=float(s.get("prefetch_interval", 3600.0)),
                                busy=lambda: tracker.busy(ignore=(BACKGROUND,)), progress=tracker.callback(BACKGROUND),
                                on_start=on_start, on_done=on_done,
                                predict_top=int(s.get("predict_top") or 0) if s.get("predict") else 0)
