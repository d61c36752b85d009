"""Which byte ranges of a `.part` file are done, in memory and durably on disk.

In memory a download is a sorted list of `Segment`s that partition [0, size): each is done from
`start` up to `pos` and still owes [pos, end). Workers take pieces in file order; work stealing
splits the largest remaining segment. Only the event loop mutates the table (inserting before
shrinking, under a lock), while the hasher and the state-saver threads read it under the same lock.

On disk `<part>.state` is a small JSON document (url key, size, validators, finished ranges) written
by temp file + fsync + rename *after* the part's data it describes was fdatasync'ed, so a process
killed at any moment (or a machine that loses power) resumes from a record that never claims bytes
that are not on disk.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

STATE_VERSION = 1


def state_path(part_path: Path) -> Path:
    return part_path.with_name(part_path.name + ".state")


def live_path(part_path: Path) -> Path:
    """Progress for readers on this machine (a peer server streaming a download in progress): ranges
    pwritten so far, rewritten often and never fsynced. The page cache is shared, so those bytes can be
    read now; `.state` stays the only record a resume trusts."""
    return part_path.with_name(part_path.name + ".live")


def url_key(url: str) -> str:
    """Identity of a URL for resuming: scheme, host and path (no userinfo, no query).

    Presigned URLs change their query on every run; the size and validators (ETag/Last-Modified,
    checked again by If-Range on every request) guard the content instead.
    """
    p = urlsplit(url)
    host = p.hostname or ""
    port = f":{p.port}" if p.port else ""
    return hashlib.sha256(f"{p.scheme}://{host}{port}{p.path}".encode()).hexdigest()[:32]


class Segment:
    """[start, end) of the file; bytes [start, pos) are written. `owner` is the worker holding it."""

    __slots__ = ("end", "owner", "pos", "start")

    def __init__(self, start: int, end: int, pos: int | None = None) -> None:
        self.start = start
        self.end = end
        self.pos = start if pos is None else pos
        self.owner: object | None = None

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def __repr__(self) -> str:
        return f"Segment({self.start}, {self.pos}, {self.end})"


@dataclass
class SegmentTable:
    """All segments of one download, sorted by `start`, partitioning [0, size).

    Mutated from the event loop only; the hasher and state-saver threads read it under `lock`.
    Work is handed out in file order (pieces carved off the first unowned segment) so the
    contiguous finished prefix, and with it the streaming sha256, keeps up with the download.
    """

    size: int
    segments: list[Segment] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def fresh(cls, size: int) -> SegmentTable:
        return cls(size, [Segment(0, size)] if size else [])

    @classmethod
    def from_done(cls, size: int, done: list[tuple[int, int]]) -> SegmentTable:
        """Rebuild from finished intervals: each gap becomes an empty segment, each interval a full one."""
        segs: list[Segment] = []
        cursor = 0
        for lo, hi in normalize(done, size):
            if lo > cursor:
                segs.append(Segment(cursor, lo))
            segs.append(Segment(lo, hi, hi))
            cursor = hi
        if cursor < size:
            segs.append(Segment(cursor, size))
        return cls(size, segs)

    def done_bytes(self) -> int:
        with self.lock:
            return sum(s.pos - s.start for s in self.segments)

    def done_intervals(self) -> list[tuple[int, int]]:
        with self.lock:
            raw = [(s.start, s.pos) for s in self.segments if s.pos > s.start]
        return normalize(raw, self.size)

    def prefix(self) -> int:
        """End of the contiguous finished prefix [0, prefix)."""
        with self.lock:
            for s in self.segments:
                if s.pos < s.end:
                    return s.pos
        return self.size

    def complete(self) -> bool:
        return all(s.pos >= s.end for s in self.segments)

    def remaining(self) -> int:
        return sum(s.end - s.pos for s in self.segments)

    def unowned(self) -> int:
        return sum(s.end - s.pos for s in self.segments if s.owner is None)

    def _insert_after(self, seg: Segment, new: Segment, new_end_of_seg: int) -> None:
        with self.lock:
            # Insert first, shrink second: readers never see bytes that belong to no segment.
            self.segments.insert(self.segments.index(seg) + 1, new)
            seg.end = new_end_of_seg

    def take(self, owner: object, piece: int, min_split: int) -> Segment | None:
        """Next work for a free worker: the first unowned bytes (at most `piece`), else half of the
        largest segment another worker still owes (work stealing, so the tail doesn't straggle)."""
        for s in self.segments:
            if s.owner is None and s.pos < s.end:
                if s.end - s.pos > piece + min_split:
                    cut = s.pos + piece
                    self._insert_after(s, Segment(cut, s.end), cut)
                s.owner = owner
                return s
        victim = max((s for s in self.segments if s.pos < s.end), key=lambda s: s.remaining, default=None)
        if victim is None or victim.remaining < 2 * min_split:
            return None
        mid = victim.pos + victim.remaining // 2
        new = Segment(mid, victim.end)
        new.owner = owner
        self._insert_after(victim, new, mid)
        return new

    def compact(self) -> None:
        """Merge runs of finished, released segments so scans stay short on huge files."""
        with self.lock:
            out: list[Segment] = []
            for s in self.segments:
                prev = out[-1] if out else None
                if (prev is not None and prev.pos >= prev.end and s.pos >= s.end
                        and prev.owner is None and s.owner is None):
                    prev.end = prev.pos = s.end
                else:
                    out.append(s)
            self.segments = out


def normalize(intervals: list[tuple[int, int]] | list[list[int]], size: int) -> list[tuple[int, int]]:
    """Sort, clip to [0, size) and merge touching intervals; drop empty or malformed ones."""
    clean = sorted((max(0, int(lo)), min(size, int(hi))) for lo, hi in intervals)
    out: list[tuple[int, int]] = []
    for lo, hi in clean:
        if hi <= lo:
            continue
        if out and lo <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return out


@dataclass
class PartState:
    """What `<part>.state` records about a partial download."""

    key: str
    size: int
    etag: str | None
    last_modified: str | None
    done: list[tuple[int, int]]

    def to_json(self) -> str:
        return json.dumps({
            "version": STATE_VERSION, "key": self.key, "size": self.size, "etag": self.etag,
            "last_modified": self.last_modified, "done": [list(iv) for iv in self.done],
        }, separators=(",", ":"))

    @classmethod
    def load(cls, path: Path) -> PartState | None:
        """The recorded state, or None when absent, unreadable or from another version (start afresh)."""
        try:
            raw = json.loads(path.read_text())
            if raw.get("version") != STATE_VERSION:
                return None
            size = int(raw["size"])
            done = normalize([(int(a), int(b)) for a, b in raw["done"]], size)
            return cls(str(raw["key"]), size, raw.get("etag"), raw.get("last_modified"), done)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self, path: Path, *, durable: bool = True) -> None:
        """Atomic replace: temp file, fsync, rename. A crash leaves the old or the new record, never half.

        `durable=False` skips the fsync (the `.live` record: readers need it atomic, not crash-proof).
        """
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, self.to_json().encode())
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    def done_bytes(self) -> int:
        return sum(hi - lo for lo, hi in self.done)

    @property
    def identity(self) -> tuple[str, int, str | None, str | None]:
        """Which download a record belongs to (the bytes it names are of that download only)."""
        return self.key, self.size, self.etag, self.last_modified

    def with_done(self, done: list[tuple[int, int]]) -> PartState:
        return PartState(self.key, self.size, self.etag, self.last_modified, done)


def _drop_record(record: Path) -> None:
    for p in (record, record.with_name(record.name + ".tmp")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def remove_live(part_path: Path) -> None:
    """Drop the live record only (a finished download kept it for streaming readers until its commit)."""
    _drop_record(live_path(part_path))


def discard_unresumable(part_path: Path) -> bool:
    """After a failed download: remove a partial that no durable record describes (a single stream, a
    local copy, a ranged download that failed before its first record). Nothing could resume it, and
    kept it would only fill the disk. True if a file was removed."""
    if state_path(part_path).exists():
        return False
    remove_live(part_path)
    try:
        part_path.unlink()
    except FileNotFoundError:
        return False
    return True


def remove_state(part_path: Path, *, keep_live: bool = False) -> None:
    """Drop the durable and (unless `keep_live`) the live record, and their temp files."""
    _drop_record(state_path(part_path))
    if not keep_live:
        remove_live(part_path)


def discard_partial(part_path: Path) -> None:
    """Forget a partial download: the `.part` file and its state record."""
    with contextlib.suppress(FileNotFoundError):
        Path(part_path).unlink()
    remove_state(Path(part_path))
