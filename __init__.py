"""ComfyUI custom node pack entry point (this repository cloned into ComfyUI/custom_nodes/).

Makes the bundled `src/` importable when the pack was cloned rather than pip-installed, then exports
the mappings ComfyUI reads. Import-safe: any failure is logged and ComfyUI starts without the pack.
"""

import logging
import os
import sys

_SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "src")
if os.path.isdir(_SRC) and _SRC not in sys.path:
    sys.path.insert(0, _SRC)

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}

try:
    from comfy_autocloud import __version__  # noqa: F401  (fails loudly here if dependencies are missing)
except Exception:  # pragma: no cover - only reached inside a broken ComfyUI environment
    logging.getLogger("comfy_autocloud").exception(
        "ComfyUI-AutoCloud could not be imported; install it with `pip install -r requirements.txt`")

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
