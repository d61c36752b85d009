"""Partial downloads no process is running: room the planner may take back, and a fact its errors state.

A resumable partial (one with a `.state` record) of a download that stopped is kept so a later fetch
resumes it, but it occupies the disk meanwhile: `Store.reserve` counts those bytes, removes the oldest
such partials when that (and eviction) makes a download fit, and names them when nothing does.
"""

from __future__ import annotations

import errno
import fcntl
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_autocloud.store.layout import LOCKS_DIR, group_name
from comfy_autocloud.store.space import allocated

if TYPE_CHECKING:
    from comfy_autocloud.store.store import Store


def flock_free(path: Path) -> bool:
    """True if nobody holds an flock on `path` (the fetch service's single-flight lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
    finally:
        os.close(fd)  # closing our own descriptor drops only our probe lock
    return True


@dataclass(frozen=True)
class IdlePartial:
    name: str          # the key's hashed name (`<name>.part`, `.part.state`, ...)
    files: tuple[Path, ...]
    nbytes: int        # bytes allocated on disk
    mtime: float       # newest change among its files
    dev: int


def idle_partials(store: Store, running: set[str], dev: int | None = None) -> list[IdlePartial]:
    """Partials whose download runs nowhere (`running`: key names of live reservations; a held lock also
    counts as running), on device `dev` if given, oldest first."""
    groups: dict[tuple[Path, str], list[Path]] = {}
    for d in store.partial_dirs:
        try:
            entries = list(d.iterdir())
        except OSError:
            continue
        for p in entries:
            groups.setdefault((d, group_name(p.name)), []).append(p)
    out = []
    for (d, name), files in groups.items():
        if name in running or not flock_free(store.private / LOCKS_DIR / f"{name}.lock"):
            continue
        try:
            stats = [f.lstat() for f in files]
        except OSError:
            continue
        partial = IdlePartial(name, tuple(files), sum(allocated(f) for f in files), max(s.st_mtime for s in stats),
                              os.stat(d).st_dev)
        if dev is None or partial.dev == dev:
            out.append(partial)
    return sorted(out, key=lambda p: p.mtime)


def remove(partial: IdlePartial) -> None:
    for f in partial.files:
        try:
            f.unlink()
        except FileNotFoundError:
            pass
