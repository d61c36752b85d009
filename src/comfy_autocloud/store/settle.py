"""`python -m comfy_autocloud.store.settle CACHE [DELAY]`: the detached step of the "deferred" durability.

Started by `start_settle` (`Store.settle_in_background`) after a warmup that committed files without
fsync, as a fresh interpreter rather than a fork, so it inherits no descriptors, locks or threads of the
caller's. It waits DELAY seconds (the kernel writes most dirty pages back by itself meanwhile), flushes
the cache's file system once (syncfs) and then trusts the entries committed unsettled in this boot before
the flush began. It only ever deletes marks: a cache removed meanwhile is left alone (nothing is recreated), and
any failure leaves the marks, which only costs a sha256 check should the machine go down first.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from comfy_autocloud.fsutil import boot_id, syncfs
from comfy_autocloud.store.index import Index
from comfy_autocloud.store.layout import INDEX_NAME, PRIVATE_DIR

log = logging.getLogger(__name__)

SETTLE_DELAY_ENV = "AUTOCLOUD_SETTLE_DELAY"


def settle_delay() -> float:
    """Seconds the detached flush waits: $AUTOCLOUD_SETTLE_DELAY, else the kernel's own writeback window
    (dirty_expire_centisecs + 5 s): by then the kernel has written most of it back by itself, so the flush
    does not compete with ComfyUI reading the same models at start-up."""
    raw = os.environ.get(SETTLE_DELAY_ENV)
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            log.warning("%s=%r is not a number of seconds; using the kernel's writeback window", SETTLE_DELAY_ENV,
                        raw)
    try:
        with open("/proc/sys/vm/dirty_expire_centisecs", encoding="ascii") as fh:
            return min(120.0, int(fh.read()) / 100 + 5)
    except (OSError, ValueError):
        return 35.0


def start_settle(root: Path, delay: float | None = None) -> bool:
    """Start `python -m comfy_autocloud.store.settle ROOT DELAY` detached; False when it cannot be started."""
    import subprocess

    wait = settle_delay() if delay is None else delay
    try:
        subprocess.Popen([sys.executable, "-m", "comfy_autocloud.store.settle", str(root), f"{wait:g}"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    except OSError as exc:
        log.info("cannot start the background settle (%s); entries stay unsettled until checked", exc)
        return False
    return True


def flush_and_settle(root: Path, index: Index) -> int:
    """One syncfs of the file system holding `root`, then clear the marks of this boot's entries committed
    before it began; how many were cleared."""
    started = time.time()
    syncfs(root)
    return index.settle(boot=boot_id(), before=started)


def settle_cache(root: Path) -> int:
    """`flush_and_settle` for the cache at `root` from another process; a cache removed meanwhile is left
    alone (its index is not recreated)."""
    index_path = root / PRIVATE_DIR / INDEX_NAME
    if not index_path.is_file():
        return 0
    index = Index(index_path, {})
    try:
        return flush_and_settle(root, index)
    finally:
        index.close()


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print("usage: python -m comfy_autocloud.store.settle CACHE [DELAY_SECONDS]", file=sys.stderr)
        return 2
    time.sleep(float(argv[1]) if len(argv) > 1 else 0.0)
    settle_cache(Path(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
