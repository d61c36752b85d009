"""Every model-list format (model lists, versions index, warmup list, preload config, workflows) as ModelSpecs.

Pure data: reads only the files it is given, imports neither torch nor ComfyUI. Each name is imported
from its module on first use (`comfy_autocloud.lazy`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from comfy_autocloud.keys import KNOWN_SCHEMES, check_source
from comfy_autocloud.lazy import lazy_names

if TYPE_CHECKING:
    from comfy_autocloud.manifest.common import MAX_DEPTH, MAX_MANIFEST_BYTES
    from comfy_autocloud.manifest.load import (
        FORMATS,
        detect_format,
        expand_paths,
        load_manifest,
        load_manifests,
        manifest_files,
    )
    from comfy_autocloud.manifest.merge import merge_specs
    from comfy_autocloud.manifest.preload_config import PreloadConfig, parse_preload_config, preload_specs
    from comfy_autocloud.manifest.spec import ModelSpec, SpecError
    from comfy_autocloud.manifest.versions import VersionedList, parse_versions_index, stale_lists
    from comfy_autocloud.manifest.warmup_conf import WarmupEntry, parse_warmup_conf
    from comfy_autocloud.manifest.workflow import LOADER_INPUTS, workflow_model_refs

_WHERE = {
    "MAX_DEPTH": "common", "MAX_MANIFEST_BYTES": "common",
    "FORMATS": "load", "detect_format": "load", "expand_paths": "load", "load_manifest": "load",
    "load_manifests": "load", "manifest_files": "load",
    "merge_specs": "merge",
    "PreloadConfig": "preload_config", "parse_preload_config": "preload_config", "preload_specs": "preload_config",
    "ModelSpec": "spec", "SpecError": "spec",
    "VersionedList": "versions", "parse_versions_index": "versions", "stale_lists": "versions",
    "WarmupEntry": "warmup_conf", "parse_warmup_conf": "warmup_conf",
    "LOADER_INPUTS": "workflow", "workflow_model_refs": "workflow",
}
__getattr__ = lazy_names(__name__, _WHERE)

__all__ = [
    "FORMATS",
    "KNOWN_SCHEMES",
    "LOADER_INPUTS",
    "MAX_DEPTH",
    "MAX_MANIFEST_BYTES",
    "ModelSpec",
    "PreloadConfig",
    "SpecError",
    "VersionedList",
    "WarmupEntry",
    "check_source",
    "detect_format",
    "expand_paths",
    "load_manifest",
    "load_manifests",
    "manifest_files",
    "merge_specs",
    "parse_preload_config",
    "parse_versions_index",
    "parse_warmup_conf",
    "preload_specs",
    "stale_lists",
    "workflow_model_refs",
]
