"""`python -m comfy_autocloud.store.settle CACHE [DELAY]`: the detached step of the "deferred" durability.

Started by `Store.settle_in_background` after a warmup that committed files without fsync: it waits
DELAY seconds (the kernel writes most dirty pages back by itself meanwhile), flushes the cache's file
system once (syncfs) and then trusts the entries committed unsettled in this boot before the flush
began. It only ever deletes marks: a cache removed meanwhile is left alone (nothing is recreated), and
any failure leaves the marks, which only costs a sha256 check should the machine go down first.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from comfy_autocloud.fsutil import boot_id, syncfs
from comfy_autocloud.store.index import Index
from comfy_autocloud.store.layout import INDEX_NAME, PRIVATE_DIR


def settle_cache(root: Path) -> int:
    """Flush the file system of `root`, then clear this boot's older unsettled marks; how many were cleared."""
    index_path = root / PRIVATE_DIR / INDEX_NAME
    if not index_path.is_file():
        return 0
    started = time.time()
    syncfs(root)
    if not index_path.is_file():
        return 0
    index = Index(index_path, {})
    try:
        return index.settle(boot=boot_id(), before=started)
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
