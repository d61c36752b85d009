"""Warmup's copy step: volume files into the Store, several at once, in the kernel, hashing only when needed.

It uses the same parts as the fetch service (the per-key single-flight lock, `Store.reserve`,
`transfer.copy_file`, `Store.commit`), not the service itself, because a warmup differs in three ways
that decide its speed: a cached copy is current when the volume file's size + mtime match (no
hashing, no network stack imported), the sha256 comes from the volume's hash sidecar (so the bytes are
never read back) or, for a file copied for the first time, from a detached hasher after the warmup
(hash_later.py; `--hash now` hashes while copying instead), and by default nothing waits for the disk,
as with `cp` (Store.commit's "deferred" durability). What does not change: the partial file lives in
the store's partial dir and reaches its final path only by the store's atomic rename once complete, so
a killed warmup never shows a half file; room is reserved before the first byte; another process
copying the same key is waited for.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from comfy_autocloud.errors import AutoCloudError
from comfy_autocloud.fsutil import sha256_of
from comfy_autocloud.progress import CancelToken, ProgressCallback, ProgressEvent, map_cancellable
from comfy_autocloud.warmup.plan import WarmupItem

if TYPE_CHECKING:  # a rerun that its memo proves current never imports the store (warmup/memo.py)
    from comfy_autocloud.store import Durability, Store
    from comfy_autocloud.warmup.hashes import HashBook

Status = Literal["copied", "recopied", "cached", "failed", "missing"]


@dataclass
class FileOutcome:
    key: str
    status: Status
    size: int = 0
    bytes_copied: int = 0
    seconds: float = 0.0
    source: str = ""
    error: str = ""
    line: str = ""
    hash_pending: bool = False  # committed without its sha256: the background hasher computes it (hash_later.py)

    @property
    def rate(self) -> float:
        return self.bytes_copied / self.seconds if self.seconds > 0 and self.bytes_copied else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["seconds"] = round(self.seconds, 4)
        d["rate"] = round(self.rate)
        return d


def source_of(item: WarmupItem) -> str:
    """The store's `source` column for a warmup copy (what the fetch service records for a file:// source)."""
    return source_of_path(item.source)


def source_of_path(path: Path) -> str:
    return f"file://{path}"


def current(store: Store, item: WarmupItem, progress: ProgressCallback | None) -> FileOutcome | None:
    """'cached' if the store holds a copy of the volume file as it is now (touched: warmup lists hot files)."""
    entry = store.lookup(item.key)
    if entry is None or entry.etag != item.identity:
        return None
    store.touch(item.key)
    if progress is not None:
        progress(ProgressEvent(item.key, "hit", entry.size, entry.size))
    return FileOutcome(item.key, "cached", entry.size, 0, 0.0, entry.source, line=item.line)


def copy_items(store: Store, items: list[WarmupItem], book: HashBook, *, parallel: int = 4,
               durability: Durability = "durable", hash_later: bool = False,
               progress: ProgressCallback | None = None, cancel: CancelToken | None = None) -> list[FileOutcome]:
    """Copy every item (none already current, as far as the caller knew); one outcome per item, in order.

    `hash_later`: a file the hash sidecar does not know is committed without its sha256 (for the
    background hasher, hash_later.py) instead of being hashed while it is copied.

    A failure is that file's outcome and never stops the others; Ctrl-C cancels every copy (their
    partial files stay in the partial dir, never at a final path).
    """
    if not items:
        return []
    # Imported here, once, before the threads: a rerun with nothing to copy never imports them, and
    # worker threads never wait on each other's import locks.
    from comfy_autocloud.fetch import singleflight  # noqa: F401
    from comfy_autocloud.transfer import localcopy  # noqa: F401

    token = cancel or CancelToken()
    return map_cancellable(lambda item: _copy_one(store, item, book, durability, hash_later, progress, token), items,
                           parallel=parallel, token=token, thread_name="autocloud-warmup")


@contextlib.contextmanager
def _key_lock(store: Store, item: WarmupItem, cancel: CancelToken,
              progress: ProgressCallback | None) -> Iterator[None]:
    from comfy_autocloud.fetch.singleflight import single_flight  # the fetch service's lock, shared with it

    def on_wait() -> None:
        if progress is not None:
            progress(ProgressEvent(item.key, "wait", message="another process is copying this file"))

    with single_flight(item.key, store.lock_path(item.key), cancel=cancel, on_wait=on_wait):
        yield


def _copy_one(store: Store, item: WarmupItem, book: HashBook, durability: Durability, hash_later: bool,
              progress: ProgressCallback | None, cancel: CancelToken) -> FileOutcome:
    try:
        with _key_lock(store, item, cancel, progress):
            done = current(store, item, progress)  # whoever held the lock may have copied it
            if done is not None:
                return done
            return _copy_locked(store, item, book, durability, hash_later, progress, cancel)
    except AutoCloudError as exc:
        if progress is not None:
            progress(ProgressEvent(item.key, "error", message=exc.reason))
        return FileOutcome(item.key, "failed", item.size, error=f"{exc.subject}: {exc.reason}", line=item.line)


def _copy_locked(store: Store, item: WarmupItem, book: HashBook, durability: Durability, hash_later: bool,
                 progress: ProgressCallback | None, cancel: CancelToken) -> FileOutcome:
    from comfy_autocloud.transfer.localcopy import copy_file

    t0 = time.perf_counter()
    replaced = False
    old = store.lookup(item.key)
    if old is not None:  # a copy of another version of the volume file, or of another source
        try:
            store.evict(item.key)  # pinned/in-use copies raise: reported, the old copy stays
        except AutoCloudError as exc:
            return FileOutcome(item.key, "failed", item.size, error="cached copy differs from the volume file "
                               f"and cannot be replaced: {exc.reason}", line=item.line)
        replaced = True
    known = book.known(item.key, item.size, item.mtime_ns)
    part = store.partial_path(item.key, item.size, disk=True)  # beside the cache: the commit is a rename
    part.parent.mkdir(parents=True, exist_ok=True)
    if progress is not None:
        progress(ProgressEvent(item.key, "start", 0, item.size, message=source_of(item)))

    def on_bytes(done: int, total: int | None) -> None:
        if progress is not None:
            progress(ProgressEvent(item.key, "download", done, total))

    with store.reserve(item.key, item.size):
        result = copy_file(item.source, part, progress=on_bytes, cancel=cancel, hash=known is None and not hash_later,
                           writeback=durability == "durable")  # the fsync before the rename finds the writes done
        identity = result.etag or ""
        sha: str | None = result.sha256 or None
        if identity != item.identity:  # the volume file changed after the plan: what was copied is the truth
            size, _, mtime = identity.partition("-")
            sha = book.known(item.key, int(size), int(mtime)) or sha or (None if hash_later else sha256_of(part))
            if sha is not None:
                book.add(item.key, int(size), int(mtime), sha)
        elif known is not None:
            sha = known
        elif sha is not None:
            book.add(item.key, item.size, item.mtime_ns, sha)
        if progress is not None:
            progress(ProgressEvent(item.key, "commit", result.size, result.size))
        entry = store.commit(item.key, part, size=result.size, sha256=sha, source=source_of(item), etag=identity,
                             last_modified=result.last_modified, durability=durability)
    if progress is not None:
        progress(ProgressEvent(item.key, "done", entry.size, entry.size))
    return FileOutcome(item.key, "recopied" if replaced else "copied", entry.size, result.size,
                       time.perf_counter() - t0, source_of(item), line=item.line, hash_pending=not entry.hashed)

