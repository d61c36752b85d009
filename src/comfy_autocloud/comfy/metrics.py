"""Prometheus text exposition of the cache and download counters (GET /autocloud/metrics).

Written by hand (the format is five lines of rules) so scraping needs no client library in ComfyUI.
"""

from __future__ import annotations

from typing import Any

# name, type, help, status-dict path
_METRICS: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    ("autocloud_cache_bytes", "gauge", "Bytes of model files in the cache (hardlinked twins once).", ("bytes",)),
    ("autocloud_cache_cap_bytes", "gauge", "Cache size cap in bytes (absent: no cap).", ("cap",)),
    ("autocloud_cache_entries", "gauge", "Model files in the cache.", ("entries",)),
    ("autocloud_cache_pinned_entries", "gauge", "Pinned model files.", ("pinned",)),
    ("autocloud_cache_reserved_bytes", "gauge", "Bytes reserved for downloads in progress.", ("reserved_bytes",)),
    ("autocloud_disk_free_bytes", "gauge", "Free bytes on the cache's file system.", ("disk_free",)),
    ("autocloud_cache_hits_total", "counter", "Model resolutions served from the cache.", ("counters", "hits")),
    ("autocloud_cache_misses_total", "counter", "Model downloads started because a file was missing.",
     ("counters", "misses")),
    ("autocloud_downloads_total", "counter", "Model downloads completed.", ("counters", "downloads")),
    ("autocloud_download_bytes_total", "counter", "Bytes received from origins.", ("counters", "bytes_downloaded")),
    ("autocloud_download_seconds_total", "counter", "Seconds spent in completed downloads.",
     ("counters", "download_seconds")),
    ("autocloud_download_errors_total", "counter", "Downloads that failed (after retries).", ("counters", "errors")),
    ("autocloud_downloads_in_flight", "gauge", "Downloads running now.", ("_in_flight",)),
    ("autocloud_catalog_entries", "gauge", "Models offered by the manifests.", ("catalog_entries",)),
)


def _get(status: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = status
    for part in path:
        if part == "_in_flight":
            return len(status.get("downloads", ()))
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


def _number(value: Any) -> str:
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    text = repr(float(value))
    return text[:-2] if text.endswith(".0") else text


def render_metrics(status: dict[str, Any]) -> str:
    """Prometheus text format 0.0.4 for an Adapter.status() dict; unknown values are left out."""
    lines: list[str] = []
    for name, kind, help_text, path in _METRICS:
        value = _get(status, path)
        if value is None:
            continue
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {_number(value)}"]
    return "\n".join(lines) + "\n"


CONTENT_TYPE = "text/plain; version=0.0.4"
