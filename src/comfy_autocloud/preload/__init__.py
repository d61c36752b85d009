"""Memory preload (seed 000): a process-wide registry of loaded MODEL / CLIP / VAE objects.

`registry` holds the logic and needs neither ComfyUI nor torch at import; `loaders` calls ComfyUI's own
loader functions; `snapshot` is the two-phase API for Modal memory snapshots.
"""

from comfy_autocloud.preload.registry import (
    Backend,
    Entry,
    EntryState,
    FileIdentity,
    LoadRequest,
    PreloadRegistry,
    derive_key,
)

__all__ = ["Backend", "Entry", "EntryState", "FileIdentity", "LoadRequest", "PreloadRegistry", "derive_key"]
