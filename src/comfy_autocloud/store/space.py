"""Disk facts the store decides on: free space where a file will land, allocated bytes, durable renames."""

from __future__ import annotations

import os
from pathlib import Path


def existing_ancestor(path: Path) -> Path:
    """The nearest directory that exists (a folder about to be created lives on its parent's disk)."""
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def disk_space(path: Path) -> tuple[int, int, int]:
    """(free bytes usable by this user, total bytes, st_dev) of the filesystem holding `path`."""
    p = existing_ancestor(path)
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize, os.stat(p).st_dev


def allocated(path: Path) -> int:
    """Bytes a (possibly sparse or preallocated) file already occupies on disk; 0 if absent."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0



