"""Memory preload: a process-wide registry of loaded MODEL / CLIP / VAE objects.

Nothing here imports ComfyUI or torch: `held_models` is the registry (what is held, loads, clones,
budget), `load_requests` turns preload_config.json into load requests, `gate` keeps preloading out of a
running prompt, `snapshot` is the two-phase API for Modal memory snapshots. The backend that calls
ComfyUI's own loaders lives in `comfy_autocloud.comfy.preload_backend`.
"""

from comfy_autocloud.preload.held_models import (
    Backend,
    FileIdentity,
    HeldModel,
    HeldState,
    LoadRequest,
    PreloadRegistry,
    derive_key,
)

__all__ = ["Backend", "FileIdentity", "HeldModel", "HeldState", "LoadRequest", "PreloadRegistry", "derive_key"]
