"""Small file-system primitives every layer shares: the one way to replace a small file atomically."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename inside `directory` durable: without it a power cut can undo the directory entry.

    Best effort: some file systems refuse to open or fsync a directory, and that must not fail a commit.
    """
    try:
        fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new file `.<name>.<random>.tmp` in `path`'s directory, opened exclusively (what tempfile.mkstemp
    does, without importing tempfile: it brings shutil, zlib, bz2 and lzma, ~25 ms from a cold disk)."""
    for _ in range(100):
        tmp = str(path.parent / f".{path.name}.{os.urandom(6).hex()}.tmp")
        try:
            return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), tmp
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name beside {path}")


def write_atomic(path: Path, text: str, mode: int | None = None, *, durable: bool = True) -> None:
    """Temp file in the same directory + fsync + rename + fsync of the directory.

    Readers see the old or the new content, never a mix; the old file's mode is kept unless `mode` is given.
    `durable=False` skips both fsyncs, for a file that only saves work (a crash may leave it empty).
    """
    path = Path(path)
    if mode is None:
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            if durable:
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


_SYNC_FILE_RANGE_WRITE = 2
_sync_file_range: list[object] = []  # [function or None] once looked up


def _sync_file_range_fn() -> object | None:
    """libc's sync_file_range through ctypes (`os` does not wrap it); None where there is none."""
    if not _sync_file_range:
        import ctypes

        try:  # the symbols already in this process (libc among them): no ldconfig run to find it
            fn = getattr(ctypes.CDLL(None, use_errno=True), "sync_file_range", None)
        except OSError:
            fn = None
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        _sync_file_range.append(fn)
    return _sync_file_range[0]


def start_writeback(fd: int, offset: int, count: int) -> None:
    """Ask the kernel to start writing these dirty pages to disk now, without waiting for it.

    A copy that kicks writeback block by block overlaps the disk writes with the reads still to come,
    so the fsync at the end finds little left to do. Best effort: a no-op where
    `sync_file_range` does not exist.
    """
    fn = _sync_file_range_fn()
    if fn is not None:
        fn(fd, offset, count, _SYNC_FILE_RANGE_WRITE)  # type: ignore[operator]



_boot: list[str] = []


def boot_id() -> str:
    """This boot of the machine (Linux: /proc/sys/kernel/random/boot_id), so data written without an fsync
    can be told apart from data a crash or power cut may have lost; '' where the kernel does not say."""
    if not _boot:
        try:
            with open("/proc/sys/kernel/random/boot_id", "rb") as fh:  # bytes: no codec module to import
                _boot.append(fh.read().decode().strip())
        except OSError:
            _boot.append("")
    return _boot[0]


def syncfs(path: Path) -> None:
    """Write back every dirty page of the file system holding `path` and wait for it (one call for a
    whole cache instead of one fsync per file); `os.sync()` where libc has no syncfs."""
    import ctypes

    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), "syncfs", None)
    except OSError:
        fn = None
    if fn is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if fn(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


HASH_SLICE = 256 << 20        # bytes hashed per call through the mapping (a stop request waits at most one)
_READ_BLOCK = 8 << 20         # the fallback's pread size


class RangeHasher:
    """sha256 of a file's bytes in file order, fed as far as they are final (`update_to`).

    It hashes through a read-only shared mapping of the file: no copy out of the page cache, and hashlib
    drops the GIL for a whole slice. Reading into a buffer 8 MiB at a time needs the GIL back after every
    read and every update, and beside a busy event loop (a download's) that starved the hasher to a
    third of its speed (465 vs 1,404 MiB/s measured here), which became the hash tail after the last
    byte arrived. The mapping follows a growing file; where a file cannot be mapped it reads instead.
    Only bytes already written are hashed, so the mapping never reaches past the end of the file.
    """

    def __init__(self, fd: int) -> None:
        import hashlib  # here, not at the top: a warmup rerun hashes nothing (a cold .so load saved)

        self.fd = fd
        self.digest = hashlib.sha256()
        self.done = 0
        self._map: Any = None  # an mmap.mmap
        self._view: memoryview | None = None
        self._mappable = True
        self._buf: bytearray | None = None

    def update_to(self, end: int, stop: Callable[[], bool] | None = None) -> int:
        """Hash [done, end); returns the bytes hashed (fewer when `stop()` turns true between slices)."""
        start = self.done
        while self.done < end and not (stop is not None and stop()):
            n = min(HASH_SLICE, end - self.done)
            view = self._mapped(self.done + n)
            if view is not None:
                self.digest.update(view[self.done:self.done + n])
            else:
                n = self._read_into(n)
            self.done += n
        return self.done - start

    def hexdigest(self) -> str:
        return self.digest.hexdigest()

    def _mapped(self, end: int) -> memoryview | None:
        if not self._mappable:
            return None
        if self._view is None or len(self._view) < end:
            self._unmap()
            try:
                length = os.fstat(self.fd).st_size
                if length < end:
                    raise OSError(f"file has {length} bytes, {end} expected")
                import mmap

                self._map = mmap.mmap(self.fd, length, prot=mmap.PROT_READ)
                self._view = memoryview(self._map)
            except (OSError, ValueError):
                self._mappable = False
                return None
        return self._view

    def _read_into(self, n: int) -> int:
        if self._buf is None:
            self._buf = bytearray(_READ_BLOCK)
        view = memoryview(self._buf)
        got = os.preadv(self.fd, [view[: min(_READ_BLOCK, n)]], self.done)
        if got <= 0:
            raise OSError(f"unexpected end of file at {self.done}")
        self.digest.update(view[:got])
        return got

    def _unmap(self) -> None:
        if self._view is not None:
            self._view.release()
            self._view = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def close(self) -> None:
        self._unmap()


def sha256_of(path: Path) -> str:
    """The sha256 of a whole file (constant memory for 20 GB checkpoints)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return sha256_of_fd(fd)
    finally:
        os.close(fd)


def sha256_of_fd(fd: int) -> str:
    """The sha256 of the whole open file `fd` (for a caller that checked the inode it opened)."""
    hasher = RangeHasher(fd)
    try:
        hasher.update_to(os.fstat(fd).st_size)
        return hasher.hexdigest()
    finally:
        hasher.close()
