"""Copy a local file (file:// sources, warmup from a network volume) into a `.part`, hashing it or not.

The copy itself stays in the kernel (`copy_file_range`, falling back to `sendfile`, then to plain
reads and writes); a hasher thread hashes the copied blocks from the page cache (through a mapping,
fsutil.RangeHasher) while the next block copies. Warmup copies without hashing when it already knows
the file's sha256 (its sidecar on the volume), and kicks writeback block by block so the final flush
finds little to do.
A source that changes size or mtime while it is copied is an error, never a mixed copy.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

from ..errors import Cancelled, IntegrityError, NotEnoughSpace, TransferError
from ..fsutil import RangeHasher, start_writeback
from ..progress import CancelToken
from .options import TransferResult

BLOCK = 16 << 20
PROGRESS_INTERVAL = 0.1


def _copy_block(src: int, dst: int, offset: int, count: int, mode: list[str]) -> int:
    """Copy up to `count` bytes at `offset`; `mode[0]` remembers which syscall works here."""
    if mode[0] == "copy_file_range":
        try:
            return os.copy_file_range(src, dst, count, offset, offset)
        except OSError as e:
            if e.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: try the next way
                raise
            mode[0] = "sendfile"
    if mode[0] == "sendfile":
        try:
            os.lseek(dst, offset, os.SEEK_SET)
            return os.sendfile(dst, src, offset, count)
        except OSError as e:
            if e.errno not in (22, 38, 95):
                raise
            mode[0] = "readwrite"
    data = os.pread(src, count, offset)
    return os.pwrite(dst, data, offset) if data else 0


def copy_file(src: Path, part_path: Path, *, progress: Callable[[int, int | None], None] | None = None,
              cancel: CancelToken | None = None, hash: bool = True, writeback: bool = False) -> TransferResult:
    """Copy `src` to `part_path` (truncating it), return size and sha256 ('' with `hash=False`).

    `writeback` starts writing each copied block to disk at once (see fsutil.start_writeback).
    Cancelled keeps the part.
    """
    t0 = time.monotonic()
    src = Path(src)
    part_path = Path(part_path)
    try:
        sfd = os.open(src, os.O_RDONLY)
    except OSError as e:
        raise TransferError(str(src), f"cannot open: {e.strerror or e}") from None
    try:
        st = os.fstat(sfd)
        size = st.st_size
        part_path.parent.mkdir(parents=True, exist_ok=True)
        dfd = os.open(part_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            if size:
                try:
                    os.posix_fallocate(dfd, 0, size)
                except OSError as e:
                    if e.errno == 28:
                        raise NotEnoughSpace(str(part_path), f"no space for {size} bytes") from None
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(sfd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead on the volume
            copy = _copy_and_hash if hash else _copy_only
            digest = copy(sfd, dfd, size, str(src), str(part_path), progress, cancel, writeback)
            os.ftruncate(dfd, size)
            now = os.fstat(sfd)
            if (now.st_size, now.st_mtime_ns) != (size, st.st_mtime_ns):
                raise IntegrityError(str(src), "changed while it was being copied (size or mtime); copy it again")
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    if progress is not None:
        progress(size, size)
    mtime = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(st.st_mtime))
    # The source's identity when the copy started (rsync's quick check): warmup compares it with the
    # volume file to know whether the cached copy is still the same file.
    etag = f"{size}-{st.st_mtime_ns}"
    return TransferResult(size=size, sha256=digest, etag=etag, last_modified=mtime, bytes_downloaded=size,
                          resumed_bytes=0, seconds=time.monotonic() - t0, connections=1 if size else 0)


def _copy_step(sfd: int, dfd: int, copied: int, size: int, src_name: str, dst_name: str, mode: list[str],
               cancel: CancelToken | None, writeback: bool) -> int:
    """Copy the next block; returns its length (errors name the file and the reason)."""
    if cancel is not None and cancel.cancelled:
        raise Cancelled(src_name, "copy cancelled; the partial file is kept")
    try:
        n = _copy_block(sfd, dfd, copied, min(BLOCK, size - copied), mode)
    except OSError as e:
        if e.errno == 28:
            raise NotEnoughSpace(dst_name, "disk full while copying") from None
        raise TransferError(src_name, f"copy failed: {e.strerror or e}") from None
    if n == 0:
        raise IntegrityError(src_name, f"file shrank while copying ({copied} of {size} bytes)")
    if writeback:
        start_writeback(dfd, copied, n)
    return n


def _copy_only(sfd: int, dfd: int, size: int, src_name: str, dst_name: str,
               progress: Callable[[int, int | None], None] | None, cancel: CancelToken | None,
               writeback: bool) -> str:
    mode = ["copy_file_range"]
    copied = 0
    last = 0.0
    while copied < size:
        copied += _copy_step(sfd, dfd, copied, size, src_name, dst_name, mode, cancel, writeback)
        now = time.monotonic()
        if progress is not None and now - last >= PROGRESS_INTERVAL:
            last = now
            progress(copied, size)
    return ""


def _copy_and_hash(sfd: int, dfd: int, size: int, src_name: str, dst_name: str,
                   progress: Callable[[int, int | None], None] | None, cancel: CancelToken | None,
                   writeback: bool) -> str:
    hasher = RangeHasher(dfd)
    copied = 0
    error: list[BaseException] = []
    wake = threading.Condition()
    stop = False

    def hash_loop() -> None:
        try:
            while True:
                with wake:
                    while hasher.done >= copied and not stop:
                        wake.wait(0.05)
                    limit = copied
                    if hasher.done >= limit and stop:
                        return
                hasher.update_to(limit)
        except BaseException as e:  # surfaced by the caller
            error.append(e)
        finally:
            hasher.close()

    thread = threading.Thread(target=hash_loop, name="autocloud-copyhash", daemon=True)
    thread.start()
    mode = ["copy_file_range"]
    last = 0.0
    try:
        while copied < size:
            if error:
                break
            n = _copy_step(sfd, dfd, copied, size, src_name, dst_name, mode, cancel, writeback)
            with wake:
                copied += n
                wake.notify()
            now = time.monotonic()
            if progress is not None and now - last >= PROGRESS_INTERVAL:
                last = now
                progress(copied, size)
    finally:
        with wake:
            stop = True
            wake.notify()
        thread.join()
    if error:
        raise TransferError(dst_name, f"cannot read back the copy: {error[0]}")
    return hasher.hexdigest()
