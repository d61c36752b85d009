"""Versions index: `{list_name: {"url": ..., "md5" or "sha256": ..., "version": ...}}`.

Published next to split model lists so nodes can bring theirs up to date.

Nodes compare the hash of their local `<config_dir>/<name>.json` with the index and re-download only
stale lists (`fetch.sync` downloads through the fetch service; this module only decides what is stale).
Published indexes use md5 as a change detector; an index may give sha256 instead (or both: both must match).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from comfy_autocloud.keys import check_folder
from comfy_autocloud.manifest.common import at, check_sha256_at, check_source_at, fail, load_json

_MD5_RE = re.compile(r"^[0-9a-fA-F]{32}$")
ENTRY_KEYS = ("url", "md5", "sha256", "version")
HASH_KEYS = ("md5", "sha256")


@dataclass(frozen=True)
class VersionedList:
    """One model list named by the index: where to download it and the hash(es) it must have."""

    name: str
    url: str
    md5: str | None
    defined_in: str = ""
    version: str | None = None
    sha256: str | None = None

    @property
    def filename(self) -> str:
        """Local file name inside the config directory ('base_models' -> 'base_models.json')."""
        return self.name if self.name.endswith(".json") else f"{self.name}.json"


def is_versions_index(data: Any) -> bool:
    """Content sniffing: a non-empty object whose values are objects carrying 'url' and an 'md5'/'sha256'.

    A model list's entries are {filename: ...} objects, never {url, md5|sha256, version} ones.
    """
    return (isinstance(data, dict) and bool(data)
            and any(isinstance(v, dict) and ("md5" in v or _index_sha(v)) for v in data.values()))


def _index_sha(v: dict[str, Any]) -> bool:
    sha = v.get("sha256")
    return "url" in v and isinstance(sha, str) and len(sha.removeprefix("sha256:")) == 64 and "/" not in sha


def parse_versions_index(path: Path) -> list[VersionedList]:
    """Read and validate a versions index file."""
    return versions_from_data(load_json(path), str(path))


def versions_from_data(data: Any, where: str) -> list[VersionedList]:
    if not isinstance(data, dict) or not data:
        fail(at(where, ""), 'expected a non-empty object {list_name: {"url": ..., "md5" or "sha256": ...}}')
    out: list[VersionedList] = []
    for name, entry in data.items():
        sub = at(where, name)
        try:
            check_folder(name)  # one safe path component: it becomes <config_dir>/<name>.json
        except ValueError as exc:
            fail(sub, f"list name must be a single safe file name such as 'base_models' ({exc})")
        if not isinstance(entry, dict):
            fail(sub, 'expected an object {"url": ..., "md5" or "sha256": ...}')
        for k in entry:
            if k not in ENTRY_KEYS:
                fail(f"{sub}.{k}", f"unknown key {k!r}; an index entry may have: {', '.join(ENTRY_KEYS)}")
        if "url" not in entry:
            fail(sub, "missing 'url'")
        if not any(h in entry for h in HASH_KEYS):
            fail(sub, "missing 'md5' or 'sha256' (the hash the list must have)")
        url = check_source_at(entry["url"], f"{sub}.url")
        md5 = entry.get("md5")
        if md5 is not None and (not isinstance(md5, str) or not _MD5_RE.match(md5.strip())):
            fail(f"{sub}.md5", "md5 must be 32 hex digits")
        sha256 = check_sha256_at(entry["sha256"], f"{sub}.sha256") if "sha256" in entry else None
        version = entry.get("version")
        if version is not None and (isinstance(version, bool) or not isinstance(version, (str, int, float))):
            fail(f"{sub}.version", "expected a version string or number")
        out.append(VersionedList(name=name, url=url, md5=None if md5 is None else md5.strip().lower(),
                                 defined_in=sub, version=None if version is None else str(version),
                                 sha256=sha256))
    return out


def file_md5(path: Path) -> str | None:
    """md5 of a local list, or None when it is missing (missing counts as stale)."""
    return _file_hash(path, hashlib.md5(usedforsecurity=False))  # a change detector, not security


def file_sha256(path: Path) -> str | None:
    """sha256 of a local list, or None when it is missing."""
    return _file_hash(path, hashlib.sha256())


def _file_hash(path: Path, h: Any) -> str | None:
    try:
        with path.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
    return h.hexdigest()


def matches(v: VersionedList, path: Path) -> bool:
    """Whether the file at `path` has every hash the index gives for `v` (missing file: False)."""
    if v.md5 is not None and file_md5(path) != v.md5:
        return False
    return v.sha256 is None or file_sha256(path) == v.sha256


def stale_lists(index: list[VersionedList], config_dir: Path) -> list[VersionedList]:
    """The lists whose local copy is missing or has another md5/sha256 than the index says."""
    return [v for v in index if not matches(v, Path(config_dir) / v.filename)]
