"""`python -m comfy_autocloud.store.settle CACHE [DELAY]`: the detached step of the "deferred" durability.

Started by `start_settle` (`Store.settle_in_background`) after a warmup that committed files without
fsync, as a fresh interpreter rather than a fork, so it inherits no descriptors, locks or threads of the
caller's. It waits DELAY seconds (the kernel writes most dirty pages back by itself meanwhile), flushes
the cache's file system once (syncfs) and then trusts the entries committed unsettled in this boot before
the flush began. It only ever deletes marks: a cache removed meanwhile is left alone (nothing is recreated), and
any failure leaves the marks, which only costs a sha256 check should the machine go down first.

One waits per cache (a lock file): downloads in a ComfyUI server or a `fetch` of many files each ask for
one, and a second one started while the first waits has nothing to add, so it exits at once; the one
waiting flushes again after another delay as long as entries were committed during its flush. (An entry
committed in the instant between its last look and its exit stays marked: a sha256 check if the machine
goes down, never a wrong file.)
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

from comfy_autocloud.fsutil import boot_id, syncfs
from comfy_autocloud.store.index import Index
from comfy_autocloud.store.layout import INDEX_NAME, PRIVATE_DIR, SETTLE_LOCK

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
    """Start `python -m comfy_autocloud.store.settle ROOT DELAY` detached, unless one already waits for this
    cache (it covers what was committed before it flushes); False when it cannot be started."""
    import subprocess

    if _settler_waiting(root):
        return True
    wait = settle_delay() if delay is None else delay
    try:
        subprocess.Popen([sys.executable, "-m", "comfy_autocloud.store.settle", str(root), f"{wait:g}"],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True, close_fds=True)
    except OSError as exc:
        log.info("cannot start the background settle (%s); entries stay unsettled until checked", exc)
        return False
    return True


def _settler_waiting(root: Path) -> bool:
    """Whether a settle process holds this cache's lock (it flushes after its delay)."""
    import fcntl

    try:
        with open(root / PRIVATE_DIR / SETTLE_LOCK, "a+b") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                return True
            fcntl.flock(lock, fcntl.LOCK_UN)
    except OSError:
        pass
    return False


def flush_and_settle(root: Path, index: Index) -> int:
    """One syncfs of the file system holding `root`, then clear the marks of this boot's entries committed
    before it began; how many were cleared."""
    started = time.time()
    syncfs(root)
    return index.settle(boot=boot_id(), before=started)


def settle_cache(root: Path, delay: float = 0.0) -> int:
    """Wait `delay`, then `flush_and_settle` the cache at `root` from another process, again after another
    delay while entries committed during a flush remain; how many were settled. Returns 0 at once when
    another process is already waiting to settle this cache; a cache removed meanwhile is left alone
    (its index is not recreated)."""
    import fcntl

    index_path = root / PRIVATE_DIR / INDEX_NAME
    if not index_path.is_file():
        return 0
    try:
        lock = open(index_path.with_name(SETTLE_LOCK), "a+b")  # noqa: SIM115 - held for the whole wait
    except OSError:
        return 0
    with lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return 0  # another settler waits for this cache: it covers what was committed before it flushes
        settled = 0
        this_boot = boot_id()
        while True:
            time.sleep(delay)
            if not index_path.is_file():
                return settled
            index = Index(index_path, {})
            try:
                settled += flush_and_settle(root, index)
                if not any(boot == this_boot for _key, _created, boot in index.unsettled()):
                    return settled
            finally:
                index.close()


def main(argv: list[str]) -> int:
    if not argv or len(argv) > 2:
        print("usage: python -m comfy_autocloud.store.settle CACHE [DELAY_SECONDS]", file=sys.stderr)
        return 2
    settle_cache(Path(argv[0]), float(argv[1]) if len(argv) > 1 else 0.0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
