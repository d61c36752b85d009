"""The volume's hash sidecar: each warmed file's sha256, keyed by its size + mtime, kept on the volume.

Hashing every byte is what made a warmup slower than `cp`. The volume outlives the pods that copy
from it, so the first warmup of a file records its sha256 in `<models>/.autocloud/warmup-sha256.json`
and every later warmup (a new pod, an emptied cache) copies it in the kernel without reading it back.
A record counts only while the file's size and mtime (nanoseconds) are what they were when it was
hashed: rsync's quick check, the same test warmup already uses to decide that a copy is current. So
a file rewritten in place keeping both (`touch -r` after editing) would carry its old hash; `autocloud
verify --rehash` finds that.

Best effort by design: an unreadable or malformed sidecar counts as empty, a read-only volume means
files are hashed while copying every time, and two warmups saving at once can each lose the other's
new records (each rereads and merges just before its atomic replace); all that costs is a rehash.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from comfy_autocloud.fsutil import write_atomic
from comfy_autocloud.keys import check_sha256

SIDECAR = Path(".autocloud") / "warmup-sha256.json"  # '.autocloud' can never be a model folder (keys.py)
VERSION = 1

log = logging.getLogger(__name__)

Record = tuple[int, int, str]  # size, mtime_ns, sha256


class HashBook:
    """The sha256 of volume files by key ('folder/filename'), valid for one size + mtime each."""

    def __init__(self, models_dir: Path) -> None:
        self.path = Path(models_dir) / SIDECAR
        self._records = self._read()
        self._new: dict[str, Record] = {}

    def _read(self) -> dict[str, Record]:
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.info("warmup: ignoring the hash sidecar %s: %s", self.path, exc)
            return {}
        out: dict[str, Record] = {}
        files = raw.get("files") if isinstance(raw, dict) and raw.get("version") == VERSION else None
        for key, rec in (files or {}).items():
            try:
                out[key] = (int(rec["size"]), int(rec["mtime_ns"]), check_sha256(str(rec["sha256"])))
            except (TypeError, KeyError, ValueError):
                continue  # one bad record costs one rehash, not the others
        return out

    def known(self, key: str, size: int, mtime_ns: int) -> str | None:
        """The recorded sha256 of `key` if the volume file still has this size and mtime."""
        rec = self._new.get(key) or self._records.get(key)
        if rec is not None and rec[0] == size and rec[1] == mtime_ns:
            return rec[2]
        return None

    def add(self, key: str, size: int, mtime_ns: int, sha256: str) -> None:
        if self.known(key, size, mtime_ns) != sha256:
            self._new[key] = (size, mtime_ns, sha256)

    def save(self) -> bool:
        """Merge the new records into the sidecar on the volume; False (logged) where it cannot be written."""
        if not self._new:
            return False
        merged = {**self._read(), **self._new}
        doc = {"version": VERSION, "files": {k: {"size": s, "mtime_ns": m, "sha256": h}
                                             for k, (s, m, h) in sorted(merged.items())}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(doc, indent=1) + "\n")
        except OSError as exc:
            log.info("warmup: cannot write the hash sidecar %s (%s); the next warmup hashes again", self.path,
                     exc.strerror or exc)
            return False
        self._records = merged
        self._new = {}
        return True
