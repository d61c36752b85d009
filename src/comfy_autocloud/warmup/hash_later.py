"""`python -m comfy_autocloud.warmup.hash_later CACHE MODELS`: the sha256 of warmup's first copies, after it.

The first warmup of a volume file has no record in the volume's hash sidecar (hashes.py), and hashing
its bytes while copying made that warmup slower than `cp` (0.70x here): the hash is CPU work on the
critical path of a command whose only job is to have the files in place before ComfyUI starts. So
warmup commits such copies without a sha256 (Store.commit(sha256=None)) and starts this detached
process, which hashes them from the page cache at the lowest CPU priority while ComfyUI starts, records
each sha256 in the store's index and in the volume's sidecar, so the next pod copies without hashing.

Nothing trusts a missing hash: until it is recorded the entry is not announced to the fleet or served
to peers, a fetch that names a sha256 hashes the file first (Store.with_sha256), `verify` hashes it,
and a copy both unhashed and not yet flushed when the machine goes down is removed at the next lookup
and copied again. One hasher per cache at a time (a lock file); a second waits, then hashes what is left.
A killed hasher loses nothing: the next warmup starts another for whatever is still unhashed.
"""

from __future__ import annotations

import fcntl
import logging
import os
import sys
from pathlib import Path

from comfy_autocloud.store.layout import HASH_LATER_LOCK, INDEX_NAME, PRIVATE_DIR

log = logging.getLogger(__name__)

MODULE = "comfy_autocloud.warmup.hash_later"
NICENESS = 19


def start(cache: Path, models: Path) -> bool:
    """Start the hasher for `cache` detached (a fresh interpreter: no inherited descriptors, locks or
    threads); False when it cannot be started (the entries stay unhashed until the next warmup or verify)."""
    import subprocess

    try:
        subprocess.Popen([sys.executable, "-m", MODULE, str(cache), str(models)], stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                         close_fds=True)
    except OSError as exc:
        log.info("warmup: cannot start the background hasher (%s); `autocloud verify` hashes the copies", exc)
        return False
    return True


def hash_copies(cache: Path, models: Path) -> dict[str, str]:
    """Hash every unhashed entry of the store at `cache` and add those copied from `models` to the volume's
    sidecar; {key: sha256} of what was recorded. A cache whose index is gone is left alone."""
    from comfy_autocloud.store import Store
    from comfy_autocloud.warmup.copier import source_of_path
    from comfy_autocloud.warmup.hashes import HashBook

    cache, models = Path(cache), Path(models)
    index = cache / PRIVATE_DIR / INDEX_NAME
    if not index.is_file():
        return {}
    with open(index.with_name(HASH_LATER_LOCK), "a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another hasher may be on the same files: wait, then do the rest
        with Store(cache) as store:
            done = store.hash_pending()
    book = HashBook(models)
    for e in done:
        size, _, mtime = (e.etag or "").partition("-")
        if e.source == source_of_path(models / e.key) and size.isdigit() and mtime.isdigit():
            book.add(e.key, int(size), int(mtime), e.sha256)
    book.save()
    return {e.key: e.sha256 for e in done}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(f"usage: python -m {MODULE} CACHE MODELS", file=sys.stderr)
        return 2
    os.nice(NICENESS)  # ComfyUI starting beside it comes first
    hash_copies(Path(argv[0]), Path(argv[1]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
