"""Turn warmup-list lines into concrete volume files: `<models>/<folder>/<name|glob>` -> WarmupItems.

Globs are expanded like the seed's bash did (shell rules: `*` does not match a leading dot or '/'),
so a list that worked with `warmup.sh` selects the same files. A line that selects nothing is kept as
a `Missing` with the reason, so one typo is reported and never stops the other copies.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_autocloud.keys import make_key
from comfy_autocloud.manifest.warmup_conf import WarmupEntry

if TYPE_CHECKING:
    from comfy_autocloud.manifest.spec import ModelSpec


def volume_identity(size: int, mtime_ns: int) -> str:
    """What `transfer.copy_file` records as the etag of a local copy: size and mtime (rsync's quick check)."""
    return f"{size}-{mtime_ns}"


@dataclass(frozen=True)
class WarmupItem:
    """One volume file to copy, with the stat taken when the plan was made."""

    folder: str
    filename: str  # relative to the folder, may contain '/'
    source: Path  # absolute path on the volume
    size: int
    mtime_ns: int
    line: str  # 'conf:line' that selected it

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.filename}"

    @property
    def identity(self) -> str:
        return volume_identity(self.size, self.mtime_ns)

    def spec(self) -> ModelSpec:
        """A spec whose only source is the volume file, so the fetch service copies it (never downloads)."""
        from comfy_autocloud.manifest.spec import ModelSpec

        return ModelSpec(folder=self.folder, filename=self.filename, sources=(self.source.as_uri(),),
                         size=self.size, tags=("warmup",), defined_in=self.line)


@dataclass(frozen=True)
class Missing:
    """A list line that selected no usable volume file, and why."""

    key: str  # the line's 'folder/pattern'
    line: str
    reason: str


@dataclass
class Plan:
    models_dir: Path
    items: list[WarmupItem] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)
    # Every line with what it selected (globs may select several files), in list order, for `--list`.
    lines: list[tuple[WarmupEntry, list[WarmupItem]]] = field(default_factory=list)

    @property
    def folders(self) -> list[str]:
        seen: dict[str, None] = {}
        for entry, _items in self.lines:
            seen.setdefault(entry.folder, None)
        return list(seen)

    @property
    def total_bytes(self) -> int:
        return sum(i.size for i in self.items)


def _item(entry: WarmupEntry, folder_dir: Path, rel: str) -> WarmupItem | Missing:
    path = folder_dir / rel
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return Missing(entry.key, entry.defined_in, f"not on the volume: {path}")
    except OSError as exc:
        return Missing(entry.key, entry.defined_in, f"cannot read {path}: {exc.strerror or exc}")
    if not path.is_file():
        return Missing(entry.key, entry.defined_in, f"not a regular file: {path}")
    try:
        make_key(entry.folder, rel)  # the rules every cache key follows (keys.py), as a ModelSpec checks them
    except ValueError as exc:
        reason = str(exc)
        return Missing(f"{entry.folder}/{rel}", entry.defined_in, f"cannot be cached under this name: {reason}")
    return WarmupItem(entry.folder, rel, path.absolute(), st.st_size, st.st_mtime_ns, entry.defined_in)


def build_plan(entries: list[WarmupEntry], models_dir: Path) -> Plan:
    """Stat every named file and expand every glob against `<models_dir>/<folder>/` (sorted, files only)."""
    models_dir = Path(models_dir).expanduser().absolute()
    plan = Plan(models_dir)
    seen: set[str] = set()
    for entry in entries:
        folder_dir = models_dir / entry.folder
        selected: list[WarmupItem] = []
        if entry.is_glob:
            if not folder_dir.is_dir():
                plan.missing.append(Missing(entry.key, entry.defined_in, f"no folder {folder_dir} on the volume"))
                plan.lines.append((entry, selected))
                continue
            names = sorted(glob.glob(entry.pattern, root_dir=folder_dir))
            results = [_item(entry, folder_dir, n) for n in names if (folder_dir / n).is_file()]
            if not results:
                plan.missing.append(Missing(entry.key, entry.defined_in, f"no file in {folder_dir} matches"))
        else:
            results = [_item(entry, folder_dir, entry.pattern)]
        for r in results:
            if isinstance(r, Missing):
                plan.missing.append(r)
                continue
            selected.append(r)
            if r.key not in seen:
                seen.add(r.key)
                plan.items.append(r)
        plan.lines.append((entry, selected))
    return plan
