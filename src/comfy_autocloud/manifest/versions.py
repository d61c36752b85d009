"""Seed 004 §2.2 versions index: `{list_name: {"url": ..., "md5": ...}}` says which lists changed.

Nodes compare the md5 of their local `<config_dir>/<name>.json` with the index and re-download only
stale lists (the fetch service does the download; this module only decides what is stale).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_autocloud.keys import check_folder
from comfy_autocloud.manifest.common import at, check_source_at, fail, load_json

_MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")
ENTRY_KEYS = ("url", "md5", "version")


@dataclass(frozen=True)
class VersionedList:
    """One model list named by the index: where to download it and the md5 it must have."""

    name: str
    url: str
    md5: str
    defined_in: str = ""
    version: str | None = None

    @property
    def filename(self) -> str:
        """Local file name inside the config directory ('base_models' -> 'base_models.json')."""
        return self.name if self.name.endswith(".json") else f"{self.name}.json"


def is_versions_index(data: Any) -> bool:
    """Content sniffing: a non-empty object whose values are objects carrying an 'md5'."""
    return (isinstance(data, dict) and bool(data)
            and any(isinstance(v, dict) and "md5" in v for v in data.values()))


def parse_versions_index(path: Path) -> list[VersionedList]:
    """Read and validate a versions index file."""
    return versions_from_data(load_json(path), str(path))


def versions_from_data(data: Any, where: str) -> list[VersionedList]:
    if not isinstance(data, dict) or not data:
        fail(at(where, ""), 'expected a non-empty object {list_name: {"url": ..., "md5": ...}}')
    out: list[VersionedList] = []
    for name, entry in data.items():
        sub = at(where, name)
        try:
            check_folder(name)  # one safe path component: it becomes <config_dir>/<name>.json
        except ValueError as exc:
            fail(sub, f"list name must be a single safe file name such as 'base_models' ({exc})")
        if not isinstance(entry, dict):
            fail(sub, 'expected an object {"url": ..., "md5": ...}')
        for k in entry:
            if k not in ENTRY_KEYS:
                fail(f"{sub}.{k}", f"unknown key {k!r}; an index entry may have: {', '.join(ENTRY_KEYS)}")
        for required in ("url", "md5"):
            if required not in entry:
                fail(sub, f"missing {required!r}")
        url = check_source_at(entry["url"], f"{sub}.url")
        md5 = entry["md5"]
        if not isinstance(md5, str) or not _MD5_RE.match(md5.strip()):
            fail(f"{sub}.md5", "md5 must be 32 hex digits")
        version = entry.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int, float))):
            fail(f"{sub}.version", "expected a version string or number")
        out.append(VersionedList(name=name, url=url, md5=md5.strip().lower(), defined_in=sub,
                                 version=None if version is None else str(version)))
    return out


def file_md5(path: Path) -> str | None:
    """md5 of a local list, or None when it is missing (missing counts as stale)."""
    h = hashlib.md5(usedforsecurity=False)  # md5 is the seed's change detector, not a security check
    try:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return h.hexdigest()


def stale_lists(index: list[VersionedList], config_dir: Path) -> list[VersionedList]:
    """The lists whose local copy is missing or has a different md5 than the index says."""
    return [v for v in index if file_md5(Path(config_dir) / v.filename) != v.md5]
