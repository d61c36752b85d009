"""folder_paths patches: the cache is a model folder, manifest entries are listed, missing ones fetched.

ComfyUI functions wrapped (v0.3.x names): `folder_paths.get_filename_list` (adds manifest entries to
what loaders offer and /object_info shows) and `folder_paths.get_full_path` (which
`get_full_path_or_raise` calls through the module global, so both resolve through the hook). The cache
directory is registered with `folder_paths.add_model_folder_path(..., is_default=True)`. After a file
lands or leaves, `folder_paths.filename_list_cache` (and `cache_helper`) drop that folder, so lists
are fresh without a restart. A missing target is logged once and left alone.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from comfy_autocloud.comfy.catalog import comfy_folder, merge_names
from comfy_autocloud.comfy.runtime import MANIFEST_FOLDER, Adapter

log = logging.getLogger(__name__)
_warned: set[str] = set()
_SKIP_FOLDERS = ("custom_nodes",)
_LEGACY_DIRS = {"text_encoders": ("clip",), "diffusion_models": ("unet",)}


def warn_once(what: str, message: str, *args: object) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("autocloud: " + message, *args)


def _target(module: Any, name: str) -> Callable[..., Any] | None:
    fn = getattr(module, name, None)
    if not callable(fn):
        warn_once(name, "folder_paths.%s is missing in this ComfyUI; that part of the adapter is off", name)
        return None
    return fn


def register_folders(fp: Any, adapter: Adapter) -> list[str]:
    """Put `<cache>/<folder>` first in every model folder ComfyUI knows, and add manifest-only folders."""
    root = adapter.store.root
    known: dict[str, tuple[list[str], Any]] = getattr(fp, "folder_names_and_paths", None) or {}
    add = getattr(fp, "add_model_folder_path", None)
    if not callable(add) or not isinstance(known, dict):
        warn_once("add_model_folder_path", "folder_paths.add_model_folder_path is missing; the cache at %s is "
                                           "not a model folder (add it to extra_model_paths.yaml)", root)
        return []
    exts = set(getattr(fp, "supported_pt_extensions", {".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft"}))
    registered = []
    for name in sorted(set(known) | {comfy_folder(f) for f in adapter.catalog.folders()}):
        if name in _SKIP_FOLDERS or name == MANIFEST_FOLDER:
            continue
        fresh = name not in known
        for sub in (*_LEGACY_DIRS.get(name, ()), name):  # canonical last: is_default puts it first
            path = str(root / sub)
            try:
                add(name, path, is_default=True)
            except TypeError:  # very old ComfyUI without is_default
                add(name, path)
        if fresh:
            paths = known[name][0]
            known[name] = (paths, set(exts))  # the pack's own folders: model files, not "everything"
        registered.append(name)
    return registered


def invalidate(fp: Any, key: str) -> None:
    """Drop ComfyUI's cached file list for the key's folder (a file was added or removed)."""
    folder = comfy_folder(key.partition("/")[0])
    cache = getattr(fp, "filename_list_cache", None)
    if isinstance(cache, dict):
        cache.pop(folder, None)
    helper = getattr(fp, "cache_helper", None)
    inner = getattr(helper, "cache", None)
    if isinstance(inner, dict):
        inner.pop(folder, None)


def _on_server_loop() -> bool:
    """True on PromptServer's event loop (API handlers): a download there would freeze the server."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return False
    try:
        from server import PromptServer  # ComfyUI

        return loop is getattr(PromptServer.instance, "loop", None)
    except Exception:
        return False


def node_progress() -> Callable[[int, int], None] | None:
    """A sink that drives `comfy.utils.ProgressBar` for the executing node (raises on interrupt)."""
    try:
        import comfy.utils  # ComfyUI
    except Exception:
        warn_once("comfy.utils", "comfy.utils.ProgressBar unavailable; downloads show no node progress")
        return None
    bar: Any = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            bar = comfy.utils.ProgressBar(total)
        bar.update_absolute(done, total)

    return update


def install(fp: Any, adapter: Adapter) -> list[str]:
    """Patch folder_paths; returns the names of the functions wrapped."""
    done: list[str] = []
    register_folders(fp, adapter)
    adapter.on_commit(lambda key: invalidate(fp, key))

    orig_list = _target(fp, "get_filename_list")
    if orig_list is not None and not getattr(orig_list, "__autocloud__", False):
        @functools.wraps(orig_list)
        def get_filename_list(folder_name: str, *args: Any, **kwargs: Any) -> list[str]:
            names = orig_list(folder_name, *args, **kwargs)
            try:
                offered = adapter.catalog.names(folder_name)
                if not offered:
                    return names
                entry = getattr(fp, "folder_names_and_paths", {}).get(comfy_folder(folder_name))
                exts = entry[1] if entry else ()
                return merge_names(names, offered, exts)
            except Exception:
                warn_once("list", "could not add manifest entries to %s", folder_name)
                return names

        get_filename_list.__autocloud__ = True  # type: ignore[attr-defined]
        fp.get_filename_list = get_filename_list
        done.append("get_filename_list")

    orig_full = _target(fp, "get_full_path")
    if orig_full is not None and not getattr(orig_full, "__autocloud__", False):
        @functools.wraps(orig_full)
        def get_full_path(folder_name: str, filename: str, *args: Any, **kwargs: Any) -> str | None:
            path = orig_full(folder_name, filename, *args, **kwargs)
            if path is not None:
                adapter.record_access(path)
                return path
            if not isinstance(filename, str) or adapter.catalog.lookup(folder_name, filename) is None:
                return None
            if _on_server_loop():
                log.info("autocloud: %s/%s is not downloaded from an HTTP handler; it downloads when a prompt "
                         "uses it", folder_name, filename)
                return None
            found: Path | None = adapter.resolve_missing(folder_name, filename, node_progress())
            return None if found is None else str(found)  # the download itself counts as the first access

        get_full_path.__autocloud__ = True  # type: ignore[attr-defined]
        fp.get_full_path = get_full_path
        done.append("get_full_path")
    return done


def original_is_present(fp: Any) -> Callable[[str, str], bool]:
    """(folder, filename) -> on disk in any folder ComfyUI searches, without triggering a download."""
    orig = getattr(fp, "get_full_path", None)
    orig = getattr(orig, "__wrapped__", orig)

    def is_present(folder: str, filename: str) -> bool:
        try:
            return orig is not None and orig(comfy_folder(folder), filename) is not None
        except Exception:
            return False

    return is_present


def layout(fp: Any) -> Any:
    """The model folders this ComfyUI process reads, in search order (what `autocloud doctor` reads from a
    checkout), for the panel's Health section."""
    from importlib import metadata

    from comfy_autocloud.doctor import Layout

    base = getattr(fp, "base_path", None)
    version = None
    try:
        import comfyui_version  # ComfyUI

        version = getattr(comfyui_version, "__version__", None)
    except Exception:
        pass
    try:
        frontend: str | None = metadata.version("comfyui-frontend-package")
    except metadata.PackageNotFoundError:
        frontend = None
    known: dict[str, tuple[list[str], Any]] = getattr(fp, "folder_names_and_paths", None) or {}
    lay = Layout(str(base) if base else None, version, frontend, where="this ComfyUI process")
    lay.folders = {name: list(paths) for name, (paths, _exts) in known.items()
                   if name not in _SKIP_FOLDERS and name not in ("configs", MANIFEST_FOLDER)}
    models_dir = getattr(fp, "models_dir", None)
    lay.roots = [str(models_dir)] if models_dir else []
    # extra_model_paths.yaml sections' base paths: parents of registered folders outside models_dir
    for paths in lay.folders.values():
        for p in paths:
            parent = str(Path(p).parent)
            if parent not in lay.roots and models_dir and not parent.startswith(str(models_dir)):
                lay.roots.append(parent)
    return lay

