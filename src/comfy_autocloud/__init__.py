"""ComfyUI-AutoCloud: models fetched on demand, verified, cached and evicted for ComfyUI on cloud GPUs.

The core (manifest, sources, transfer, store, fetch, CLI) imports neither torch nor ComfyUI.
"""

__version__ = "0.1.0"
