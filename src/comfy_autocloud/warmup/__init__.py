"""Warmup: hot models from the slow network volume to local NVMe, ComfyUI set to read them first.

`plan` expands the warmup list against `<COMFYUI_PATH>/models`, `run` copies (`copier`; the sha256 from
the volume's sidecar, `hashes`, when known) into a Store at CACHE_PATH, `extra_paths` merges ComfyUI's
`extra_model_paths.yaml`, `pagecache` warms RAM, `supervise` runs ComfyUI under a health-checking,
restarting supervisor (`autocloud start`).
"""

from comfy_autocloud.warmup.copier import FileOutcome
from comfy_autocloud.warmup.extra_paths import MergeResult, merge_extra_paths, search_order
from comfy_autocloud.warmup.plan import Missing, Plan, WarmupItem, build_plan
from comfy_autocloud.warmup.run import (
    WarmupPaths,
    WarmupReport,
    clean,
    list_rows,
    load_plan,
    resolve_conf,
    run_warmup,
    setup_extra_paths,
    status_info,
)

__all__ = [
    "FileOutcome",
    "MergeResult",
    "Missing",
    "Plan",
    "WarmupItem",
    "WarmupPaths",
    "WarmupReport",
    "build_plan",
    "clean",
    "list_rows",
    "load_plan",
    "merge_extra_paths",
    "resolve_conf",
    "run_warmup",
    "search_order",
    "setup_extra_paths",
    "status_info",
]
