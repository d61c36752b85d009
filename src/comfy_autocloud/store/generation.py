"""The index's generation: a token that changes with every commit to the index, read without SQLite.

A process that remembers something it learned from the index (warmup's rerun memo) compares this
token instead of opening the index: equal tokens mean no transaction has committed since. The index
runs in WAL mode, and SQLite keeps the WAL's state in the header of the wal-index (`index.sqlite-shm`,
https://www.sqlite.org/walformat.html): the WAL's salts, which change whenever the WAL starts over,
and mxFrame, the last committed frame, which grows with every commit; every commit rewrites that
header before it returns. Two copies of it are kept, written in turn; a read that finds them unequal
met a writer and gives no token. With no WAL (every connection closed, the WAL folded into the
database file) the token is the database file's own identity, given only when the file has been
still for a while: its timestamps are coarse, so a write within the same tick could leave them equal.

The wal-index is read through a descriptor kept open for the life of the process, never opened and
closed per reading: POSIX record locks belong to the process, and closing any descriptor of a file drops
every lock the process holds on it, SQLite's included (https://www.sqlite.org/howtocorrupt.html, 2.2).
A process that holds the index open (warmup writing its memo) would lose its hold on the wal-index; the
next process to open the index would then rebuild it under the first one's feet ("disk I/O error").
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from comfy_autocloud.store.layout import INDEX_NAME, PRIVATE_DIR

WAL_INDEX_HEADER = 48  # bytes of one copy of the wal-index header
STILL_NS = 1_000_000_000  # a database file unchanged this long has timestamps no later write can repeat


def index_path(root: Path) -> Path:
    """The index of the store at `root`."""
    return Path(root) / PRIVATE_DIR / INDEX_NAME


def index_generation(root: Path) -> str | None:
    """The token for the store at `root` now; None when it cannot be told (no index, a write under way)."""
    db = index_path(root)
    try:
        st = os.stat(db)
    except OSError:
        return None
    ident = f"{st.st_dev}:{st.st_ino}"
    try:
        header = _read_wal_index_header(f"{db}-shm")
    except FileNotFoundError:
        header = None
    except OSError:
        return None
    wal = os.path.exists(f"{db}-wal")
    if header is None and not wal:
        if time.time_ns() - max(st.st_mtime_ns, st.st_ctime_ns) < STILL_NS:
            return None
        return f"{ident}:db:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}"
    if header is None or not wal or len(header) < 2 * WAL_INDEX_HEADER:
        return None
    first, second = header[:WAL_INDEX_HEADER], header[WAL_INDEX_HEADER:]
    if first != second or not any(first):
        return None
    return f"{ident}:wal:{first.hex()}"


_open_shm: dict[str, tuple[int, int, int]] = {}  # path -> (fd, st_dev, st_ino), kept open: see the module doc
_open_shm_lock = threading.Lock()


def _read_wal_index_header(path: str) -> bytes:
    """Both copies of the wal-index header at `path`, through this process's one descriptor of that file.

    A descriptor is closed only once the path names another file (the WAL was removed and started anew):
    the locks it would drop are on a file nobody can open by that name any more.
    """
    st = os.stat(path)
    with _open_shm_lock:
        held = _open_shm.get(path)
        if held is not None and (held[1], held[2]) != (st.st_dev, st.st_ino):
            os.close(held[0])
            held = None
        if held is None:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            fst = os.fstat(fd)
            held = _open_shm[path] = (fd, fst.st_dev, fst.st_ino)
        return os.pread(held[0], 2 * WAL_INDEX_HEADER, 0)
