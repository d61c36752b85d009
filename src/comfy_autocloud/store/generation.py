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
"""

from __future__ import annotations

import os
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
        with open(f"{db}-shm", "rb", buffering=0) as fh:
            header = fh.read(2 * WAL_INDEX_HEADER)
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
