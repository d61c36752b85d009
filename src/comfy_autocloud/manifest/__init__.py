"""Every model-list format (seed lists, versions index, warmup list, preload config, workflows) as ModelSpecs.

Pure data: reads only the files it is given, imports neither torch nor ComfyUI.
"""

from __future__ import annotations

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
from comfy_autocloud.manifest.spec import KNOWN_SCHEMES, ModelSpec, check_source
from comfy_autocloud.manifest.versions import VersionedList, parse_versions_index, stale_lists
from comfy_autocloud.manifest.warmup_conf import WarmupEntry, parse_warmup_conf
from comfy_autocloud.manifest.workflow import LOADER_INPUTS, workflow_model_refs

__all__ = [
    "FORMATS",
    "KNOWN_SCHEMES",
    "LOADER_INPUTS",
    "MAX_DEPTH",
    "MAX_MANIFEST_BYTES",
    "ModelSpec",
    "PreloadConfig",
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
