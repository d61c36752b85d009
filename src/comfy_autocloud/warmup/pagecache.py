"""Warm the Linux page cache with the files just warmed up, so ComfyUI's first load reads RAM, not disk.

`posix_fadvise(WILLNEED)` is not enough: kernels cap its readahead (8 MiB measured here), so a file
that is not fully resident is read in once (`read_through`); right after a copy the pages are already
resident and nothing is read. A budget (half of MemAvailable by default) keeps a long list from pushing
its own first files back out. `resident_bytes` also feeds `--list`'s "in RAM" column: one `cachestat`
call per file where the kernel has it (Linux >= 6.5: a count kept by the kernel, 0.3-4 ms for 8 x 256
MiB measured), else `mincore` over a mapping of the file (40-70 ms for the same files).

With `background=True` the files that must be read are read by a detached child (forked, so nothing
is imported again), and warmup returns at once: its files are complete at their final paths either
way, and a rerun after a reboot no longer waits for gigabytes to be read before ComfyUI may start.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from comfy_autocloud.detach import run_detached

READ_BLOCK = 8 << 20
_LOW_BIT = bytes(b & 1 for b in range(256))


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes (None where there is no /proc)."""
    try:
        with open("/proc/meminfo", "rb") as fh:  # bytes: no codec module to import
            for line in fh:
                if line.startswith(b"MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


POPULATE_BLOCK = 64 << 20  # mapped at a time: page tables for 64 MiB, whatever the file's size
_MADV_POPULATE_READ = 22  # Linux >= 5.14
_populate_works = sys.platform.startswith("linux")  # mmap.madvise: Python >= 3.8 on Linux
PAGESIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096  # no mmap import to learn it


def read_through(path: Path) -> int:
    """Bring every page of the file into the page cache; returns its size.

    `madvise(MADV_POPULATE_READ)` over a mapping reads the pages in without copying them to this process:
    2 GiB cold in 0.8 s with 0.15 s of CPU, against 2.9-4.6 s and 1.6-2.6 s of CPU for `read` into a
    buffer (measured here; the CPU is what ComfyUI, starting meanwhile, competes with). Kernels without
    it (EINVAL), and files that cannot be mapped, get the reads.
    """
    global _populate_works
    import mmap  # here: only the detached reader reads (warmup's own process checks residency)

    with open(path, "rb", buffering=0) as fh:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fh.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)  # larger readahead windows
        size = os.fstat(fh.fileno()).st_size
        done = 0
        while _populate_works and done < size:
            length = min(POPULATE_BLOCK, size - done)
            try:
                with mmap.mmap(fh.fileno(), length, prot=mmap.PROT_READ, offset=done) as view:
                    view.madvise(_MADV_POPULATE_READ)
            except OSError as exc:  # read the rest instead
                if exc.errno in (errno.EINVAL, errno.ENOSYS):
                    _populate_works = False  # this kernel has no MADV_POPULATE_READ
                break
            done += length
        if done >= size:
            return size
        fh.seek(done)
        buf = bytearray(READ_BLOCK)
        while n := fh.readinto(buf):
            done += n
    return done


@dataclass(frozen=True)
class Warmed:
    bytes: int  # resident now, or (background) being read
    background_bytes: int = 0  # of those, what a detached reader is still reading


def warm(paths: Iterable[Path], *, budget: int | None = None, background: bool = False,
         first: Callable[[], object] | None = None) -> Warmed:
    """Make files resident in order until `budget` bytes (default: half of MemAvailable).

    Files already resident (the usual case right after a copy) are only checked (mincore), not read;
    the others are read here, or with `background` by a detached child while this returns. `first`:
    work for that child to do before its reads (a detached child of its own when nothing is to be read;
    here, first, where no child can be started); its errors are the child's alone.
    """
    if budget is None:
        avail = mem_available()
        budget = avail // 2 if avail is not None else 2**62
    done = 0
    to_read: list[tuple[Path, int]] = []
    for p in paths:
        try:
            size = os.stat(p).st_size
            if done + size > budget:
                break
            resident = resident_bytes(p)
            if resident is None or resident < size:
                to_read.append((Path(p), size))
        except OSError:
            continue
        done += size
    if background and (to_read or first is not None) and run_detached(partial(_first_then_read, first, to_read)):
        return Warmed(done, sum(n for _, n in to_read))
    if first is not None:
        first()
    for p, size in to_read:
        try:
            read_through(p)
        except OSError:
            done -= size
    return Warmed(done)


def _first_then_read(first: Callable[[], object] | None, to_read: list[tuple[Path, int]]) -> None:
    if first is not None:
        with contextlib.suppress(Exception):
            first()
    for p, _size in to_read:
        with contextlib.suppress(OSError):
            read_through(p)


_libc: ctypes.CDLL | None = None
# cachestat's number is 451 on every Linux architecture but alpha (new syscalls share one table since 5.1)
_CACHESTAT = 451 if sys.platform.startswith("linux") and os.uname().machine != "alpha" else None
_cachestat_works = _CACHESTAT is not None  # until the kernel says ENOSYS (older than 6.5) or EPERM (seccomp)


class _CachestatRange(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]  # len 0: to the end of the file


class _Cachestat(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint64) for name in
                ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")]


def _load_libc() -> ctypes.CDLL | None:
    global _libc
    if _libc is None:
        try:  # the symbols already in this process (libc among them): no ldconfig run to find it
            lib = ctypes.CDLL(None, use_errno=True)
            lib.mincore  # noqa: B018 - raises AttributeError where there is no mincore
        except (OSError, AttributeError):
            return None
        lib.mmap.restype = ctypes.c_void_p
        lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                             ctypes.c_long]
        lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
        lib.syscall.restype = ctypes.c_long
        _libc = lib
    return _libc


def resident_bytes(path: Path) -> int | None:
    """Bytes of `path` in the page cache now (cachestat, else mincore); None if unknown."""
    lib = _load_libc()
    if lib is None:
        return None
    size = os.stat(path).st_size
    if size == 0:
        return 0
    fd = os.open(path, os.O_RDONLY)
    try:
        pages = _cachestat_pages(lib, fd)
        if pages is None:
            pages = _mincore_pages(lib, fd, size)
    finally:
        os.close(fd)
    return None if pages is None else min(size, pages * PAGESIZE)


def _cachestat_pages(lib: ctypes.CDLL, fd: int) -> int | None:
    """Pages of the file the page cache holds, counted by the kernel; None where there is no cachestat."""
    global _cachestat_works
    if not _cachestat_works:
        return None
    stat = _Cachestat()
    if lib.syscall(ctypes.c_long(_CACHESTAT), ctypes.c_int(fd), ctypes.byref(_CachestatRange(0, 0)),
                   ctypes.byref(stat), ctypes.c_uint(0)) == 0:
        return stat.nr_cache
    if ctypes.get_errno() in (errno.ENOSYS, errno.EPERM):
        _cachestat_works = False  # this kernel (or its sandbox) has none: mincore from now on
    return None


def _mincore_pages(lib: ctypes.CDLL, fd: int, size: int) -> int | None:
    """Resident pages of a read-only mapping of the file (mincore); None if it cannot be mapped."""
    import mmap

    addr = lib.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if addr in (None, ctypes.c_void_p(-1).value):
        return None
    try:
        vec = (ctypes.c_ubyte * ((size + PAGESIZE - 1) // PAGESIZE))()
        if lib.mincore(addr, size, vec) != 0:
            return None
        return bytes(vec).translate(_LOW_BIT).count(1)  # only bit 0 is defined
    finally:
        lib.munmap(addr, size)
