"""Two-phase preload for memory snapshots (Modal `enable_memory_snapshot=True`).

Phase 1 runs before the snapshot, where no GPU is attached: load every configured model into CPU RAM
(`load_all(device="cpu")`), so the snapshot carries the loaded weights. Phase 2 runs after each
restore: `to_gpu()` moves them onto the GPU. Works on the in-process registry (ComfyUI imported in
this process) or, given `url`, on a running ComfyUI through its /autocloud/preload routes.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Any

from comfy_autocloud.preload.held_models import PreloadRegistry, current


def _post(url: str, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]:
    req = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def _registry(registry: PreloadRegistry | None) -> PreloadRegistry:
    reg = registry or current()
    if reg is None:
        raise RuntimeError("no preload registry in this process: start ComfyUI with the pack, or pass url=")
    return reg


def load_all(device: str = "cpu", *, registry: PreloadRegistry | None = None, url: str | None = None,
             timeout: float = 3600.0) -> dict[str, Any]:
    """Load every queued entry now and wait for running loads; `device='gpu'` also moves them. Returns status."""
    if url is not None:
        return _post(url, "/autocloud/preload/load_all", {"device": device}, timeout)
    reg = _registry(registry)
    reg.preload()
    reg.wait_idle(timeout)
    if device != "cpu":
        reg.to_device(device)
    return reg.status()


def to_gpu(*, registry: PreloadRegistry | None = None, url: str | None = None,
           timeout: float = 3600.0) -> dict[str, Any]:
    """After a restore: put every ready entry on the GPU (stays on the CPU where there is none)."""
    if url is not None:
        return _post(url, "/autocloud/preload/to_gpu", {}, timeout)
    reg = _registry(registry)
    reg.wait_idle(timeout)
    moved = reg.to_device("gpu")
    return {"devices": moved, **reg.status()}
