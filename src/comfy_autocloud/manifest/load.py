"""One entry point for every model-list format: detect it, parse it, merge across files.

Users point the CLI and the fetch service at whatever they have (model lists, warmup lists, preload
configs, workflows); guessing the format from content means they never have to say which it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from comfy_autocloud.manifest.common import at, decode_utf8, fail, parse_json_text, read_bytes
from comfy_autocloud.manifest.merge import merge_specs
from comfy_autocloud.manifest.model_list import parse_model_list
from comfy_autocloud.manifest.preload_config import is_preload_config, preload_from_data, preload_specs
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.manifest.versions import is_versions_index
from comfy_autocloud.manifest.warmup_conf import parse_warmup_text, warmup_specs
from comfy_autocloud.manifest.workflow import is_api_workflow, is_ui_workflow, workflow_model_refs

FORMATS = ("model_list", "versions_index", "warmup_conf", "preload_config", "workflow_ui", "workflow_api")
CONF_SUFFIXES = (".conf", ".txt", ".list", ".lst")
YAML_SUFFIXES = (".yaml", ".yml")
DIR_SUFFIXES = (".json", ".conf")  # what a directory of split lists contributes


def _read(path: Path) -> tuple[str, Any]:
    """Read once and return (format, parsed content: JSON value or the conf text)."""
    where = str(path)
    suffix = path.suffix.lower()
    if suffix in YAML_SUFFIXES:
        fail(at(where, ""), "YAML manifests are not supported; write the same content as JSON "
                            "({folder: {filename: url}})")
    text = decode_utf8(read_bytes(path), where)
    if suffix in CONF_SUFFIXES or (suffix != ".json" and text.lstrip()[:1] not in ("{", "[")):
        return "warmup_conf", text
    data = parse_json_text(text, where)
    return _json_format(data), data


def _json_format(data: Any) -> str:
    if is_ui_workflow(data):
        return "workflow_ui"
    if is_api_workflow(data):
        return "workflow_api"
    if is_preload_config(data):
        return "preload_config"
    if is_versions_index(data):
        return "versions_index"
    return "model_list"


def detect_format(path: Path) -> str:
    """One of FORMATS, from the extension and content; unreadable or hostile files raise ManifestError."""
    return _read(Path(path))[0]


def load_manifest(path: Path) -> list[ModelSpec]:
    """All model specs one file defines, merged by key (a conf file yields its non-glob lines)."""
    path = Path(path)
    return merge_specs(_specs(path, *_read(path)))


def _specs(path: Path, fmt: str, content: Any) -> list[ModelSpec]:
    where = str(path)
    if fmt == "warmup_conf":
        return warmup_specs(parse_warmup_text(content, where))
    if fmt == "versions_index":
        fail(at(where, ""), "this is a versions index ({list: {url, md5|sha256}}), not a model list; "
                            "use parse_versions_index/stale_lists and load the lists it names")
    if fmt == "preload_config":
        return preload_specs(preload_from_data(content, where), where)
    if fmt in ("workflow_ui", "workflow_api"):
        return workflow_model_refs(content, where)
    return parse_model_list(content, where)


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files as given; directories as their *.json and *.conf files (not recursive, sorted, no dotfiles)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir()
                           if f.is_file() and f.suffix.lower() in DIR_SUFFIXES and not f.name.startswith("."))
            if not found:
                fail(at(str(p), ""), "directory has no manifest files (*.json, *.conf)")
            out += found
        else:
            out.append(p)
    return out


def load_manifests(paths: Iterable[Path]) -> list[ModelSpec]:
    """Load files and directories and merge them; contradicting entries raise naming both places.

    Inside a directory a versions index (model_versions.json next to its lists) is skipped; named
    explicitly it is an error, like load_manifest.
    """
    specs: list[ModelSpec] = []
    for path, fmt, content in _manifest_contents(paths):
        specs += merge_specs(_specs(path, fmt, content))
    return merge_specs(specs)


def manifest_files(paths: Iterable[Path]) -> list[tuple[Path, str]]:
    """(file, format) for every file load_manifests would read, in the order it reads them."""
    return [(path, fmt) for path, fmt, _ in _manifest_contents(paths)]


def _manifest_contents(paths: Iterable[Path]) -> Iterator[tuple[Path, str, Any]]:
    paths = [Path(p) for p in paths]
    explicit = {p for p in paths if not p.is_dir()}
    for path in expand_paths(paths):
        fmt, content = _read(path)
        if fmt != "versions_index" or path in explicit:
            yield path, fmt, content
