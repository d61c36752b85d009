"""Write or merge ComfyUI's `extra_model_paths.yaml` so the warmup cache is searched before the volume.

ComfyUI (`utils/extra_config.py`) reads each top-level section as `base_path`, `is_default` and
`<folder>: <path relative to base_path>` lines; `is_default: true` inserts the path at the *front*
of the folder's search list (`folder_paths.add_model_folder_path`), and sections are applied in file
order, so the last `is_default` section wins. Our section therefore goes last, between marker
comments, and is rewritten in place on every run; the user's own sections and comments are kept
byte for byte. A file we cannot parse is never overwritten, and the first change saves one `.bak`.

A rerun usually finds the file as the last run left it: `merge_extra_paths` then compares its text with
the text remembered by that run (`memo`) instead of parsing YAML, and imports neither the yaml library
(25-60 ms of a warmup rerun that copies nothing, measured) nor hashlib (OpenSSL's library, about 1-2
MB read from a cold disk): the memo holds the text itself, not a digest of it.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_autocloud.errors import ManifestError
from comfy_autocloud.fsutil import write_atomic

SECTION = "autocloud_warmup"
BEGIN = "# >>> autocloud warmup: managed by `autocloud warmup --setup-only`; this block is rewritten on every run"
END = "# <<< autocloud warmup"

# Folders ComfyUI knows (the classic names plus today's), so the section is stable from the first run.
DEFAULT_FOLDERS = ("checkpoints", "loras", "vae", "controlnet", "upscale_models", "embeddings", "clip", "unet",
                   "diffusion_models", "text_encoders", "clip_vision", "style_models", "hypernetworks")


@dataclass(frozen=True)
class MergeResult:
    path: Path
    changed: bool
    backup: Path | None  # written by this call (only on the first change of an existing file)
    folders: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "changed": self.changed,
                "backup": str(self.backup) if self.backup else None, "folders": list(self.folders)}


def section_folders(*groups: Iterable[str]) -> tuple[str, ...]:
    """DEFAULT_FOLDERS first, then any other folder named in `groups` (sorted), each once."""
    extra = sorted({f for g in groups for f in g} - set(DEFAULT_FOLDERS))
    return (*DEFAULT_FOLDERS, *extra)


def render_section(cache_root: Path, folders: Iterable[str]) -> str:
    """Our managed block (with markers), YAML-quoted by the YAML library so odd paths stay valid."""
    import yaml

    body: dict[str, Any] = {"base_path": str(cache_root), "is_default": True}
    for f in folders:
        body[f] = f"{f}/"
    dumped = yaml.safe_dump({SECTION: body}, sort_keys=False, default_flow_style=False, indent=4,
                            allow_unicode=True, width=10**6)
    return f"{BEGIN}\n{dumped.rstrip()}\n{END}\n"


def _parse(text: str, where: str) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as exc:
        raise ManifestError(where, f"not valid YAML, left untouched: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ManifestError(where, f"expected a mapping of sections, found {type(data).__name__}; left untouched")
    return data


def strip_section(text: str, where: str) -> str:
    """The text without our managed block (markers included)."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, ln in enumerate(lines) if ln.rstrip("\r\n") == BEGIN]
    ends = [i for i, ln in enumerate(lines) if ln.rstrip("\r\n") == END]
    if not starts and not ends:
        return text
    if len(starts) != 1 or len(ends) != 1 or ends[0] < starts[0]:
        raise ManifestError(where, f"the autocloud block markers ({BEGIN[:24]}… / {END}) are damaged; "
                                   "remove that block by hand, then run again")
    return "".join(lines[: starts[0]] + lines[ends[0] + 1:])


def merged_text(old: str, cache_root: Path, folders: Iterable[str], where: str) -> str:
    """`old` with our block replaced/appended at the end; checked to keep every user section unchanged."""
    user_before = _parse(old, where)
    user_before.pop(SECTION, None)  # ours if inside the markers; otherwise refused just below
    rest = strip_section(old, where)
    rest_data = _parse(rest, where)
    if SECTION in rest_data:
        raise ManifestError(f"{where}:{SECTION}", "a section with this name exists outside the autocloud block; "
                                                  "rename it, then run again")
    block = render_section(cache_root, folders)
    head = rest.rstrip()
    new = f"{head}\n\n{block}" if head else block
    new_data = _parse(new, where)
    ours = new_data.pop(SECTION, None)
    if new_data != user_before or ours != _parse(block, where)[SECTION]:
        raise ManifestError(where, "merging would change the user's sections (unusual YAML layout); left untouched")
    return new


def merge_extra_paths(yaml_path: Path, cache_root: Path, folders: Iterable[str], *,
                      memo: Path | None = None) -> MergeResult:
    """Write our section into `yaml_path` (created if absent); a no-op when it already says the same.

    `memo`: a small file holding the text this function last found current (or wrote) for the same
    arguments; a text that matches it is current without being parsed again.
    """
    yaml_path = Path(yaml_path)
    folders = tuple(folders)
    where = str(yaml_path)
    try:
        old = yaml_path.read_text(encoding="utf-8")
        mode = yaml_path.stat().st_mode & 0o7777
        existed = True
    except FileNotFoundError:
        old, mode, existed = "", 0o644, False
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(where, f"cannot read: {exc}") from None
    cache_root = Path(cache_root).absolute()
    if existed and memo is not None and _recall(memo) == _memo_text(old, yaml_path, cache_root, folders):
        return MergeResult(yaml_path, False, None, folders)
    new = merged_text(old, cache_root, folders, where)
    if new == old:
        _remember(memo, _memo_text(old, yaml_path, cache_root, folders))
        return MergeResult(yaml_path, False, None, folders)
    backup = None
    if existed:
        bak = yaml_path.with_name(yaml_path.name + ".bak")
        if not bak.exists():
            import shutil  # here: a rerun copies nothing (shutil brings zlib, bz2 and lzma)

            shutil.copy2(yaml_path, bak)
            backup = bak
    write_atomic(yaml_path, new, mode)
    _remember(memo, _memo_text(new, yaml_path, cache_root, folders))  # `merged_text(new)` is `new`: built so
    return MergeResult(yaml_path, True, backup, folders)


def _memo_text(text: str, yaml_path: Path, cache_root: Path, folders: tuple[str, ...]) -> str:
    """What makes `text` current: the text, the arguments, and this module's code (a new version renders anew)."""
    code = os.stat(__file__)
    return f"{code.st_size} {code.st_mtime_ns}\0{yaml_path}\0{cache_root}\0{folders!r}\0{text}"


def _recall(memo: Path) -> str | None:
    try:
        return memo.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return None


def _remember(memo: Path | None, remembered: str) -> None:
    """Best effort: a memo that cannot be written costs the next run a parse, never a failure."""
    if memo is None:
        return
    with contextlib.suppress(OSError, UnicodeError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(memo, remembered)


def search_order(yaml_text: str, yaml_dir: Path, folder: str, default_dir: Path) -> list[Path]:
    """Where ComfyUI would look for `folder`, in order: replays extra_config + add_model_folder_path.

    Used by the tests and `--list` to prove the cache comes before the volume; mirrors ComfyUI's
    rules (relative base_path is relative to the yaml file; is_default inserts at the front).
    """
    paths = [default_dir]
    for conf in (_parse(yaml_text, "extra_model_paths.yaml") or {}).values():
        if not isinstance(conf, dict):
            continue
        conf = dict(conf)
        base = conf.pop("base_path", None)
        is_default = bool(conf.pop("is_default", False))
        if base is not None:
            base = os.path.expandvars(os.path.expanduser(str(base)))
            if not os.path.isabs(base):
                base = os.path.abspath(os.path.join(yaml_dir, base))
        for name, value in conf.items():
            if name != folder:
                continue
            for y in str(value).split("\n"):
                if not y:
                    continue
                full = os.path.join(base, y) if base else (y if os.path.isabs(y) else os.path.join(yaml_dir, y))
                p = Path(os.path.normpath(full))
                if p in paths:
                    if is_default and paths[0] != p:
                        paths.remove(p)
                        paths.insert(0, p)
                elif is_default:
                    paths.insert(0, p)
                else:
                    paths.append(p)
    return paths
