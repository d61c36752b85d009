"""ComfyUI custom node pack entry point (this repository cloned into ComfyUI/custom_nodes/).

Makes the bundled `src/` importable when the pack was cloned rather than pip-installed, installs the
AutoCloud adapter (model folders, on-demand downloads, prefetch, /autocloud routes) and exports what
ComfyUI reads, including WEB_DIRECTORY for the cache panel. Import-safe: any failure is logged and
ComfyUI starts without the pack's features.
"""

import importlib
import logging
import os
import sys

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(_SRC) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
WEB_DIRECTORY = "./web"

try:
    from comfy_autocloud.comfy.setup import setup as _setup
except Exception:  # pragma: no cover - only reached inside a broken ComfyUI environment
    logging.getLogger("comfy_autocloud").exception(
        "ComfyUI-AutoCloud could not be imported; install it with `pip install -r requirements.txt`")
else:
    try:
        _setup()
    except Exception:  # setup guards itself; this is the last line of defence for ComfyUI's start-up
        logging.getLogger("comfy_autocloud").exception("ComfyUI-AutoCloud adapter failed to start")

# Node modules import ComfyUI (and torch) only when a node runs; one that fails to import is logged
# and skipped so the others still load.
for _name in ("nodes_preload", "nodes_stepcache", "nodes_parallel"):
    try:
        _mod = importlib.import_module(f"comfy_autocloud.comfy.{_name}")
    except Exception:  # pragma: no cover - only reached inside a broken environment
        logging.getLogger("comfy_autocloud").exception("ComfyUI-AutoCloud: %s not available", _name)
    else:
        NODE_CLASS_MAPPINGS.update(_mod.NODE_CLASS_MAPPINGS)
        NODE_DISPLAY_NAME_MAPPINGS.update(_mod.NODE_DISPLAY_NAME_MAPPINGS)

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
