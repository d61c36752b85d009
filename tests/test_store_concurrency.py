"""Processes sharing one store (ComfyUI server, CLI runs, cron clean) keep one consistent index."""

from __future__ import annotations

import fcntl
import hashlib
import multiprocessing as mp
import os
import random
from pathlib import Path

from comfy_autocloud.errors import NotEnoughSpace
from comfy_autocloud.store import Store
from servers import safetensors_of

KiB = 1024


def _blob(tag: str, size: int) -> bytes:
    return safetensors_of(hashlib.sha256(tag.encode()).digest(), size)


def _worker(root: str, wid: int, ops: int, q: mp.Queue) -> None:
    """The fetch flow: single-flight lock per key, reserve, write part, commit; plus hits and pins."""
    try:
        store = Store(Path(root), max_size=600 * KiB)
        rng = random.Random(wid)
        for j in range(ops):
            shared = rng.random() < 0.4
            key = f"loras/shared{rng.randrange(6)}.safetensors" if shared else f"loras/w{wid}_{j}.safetensors"
            if rng.random() < 0.3 and store.lookup(key) is not None:
                store.touch(key)
                continue
            # Same key => same content, as for a real model; shared content across keys exercises dedupe.
            content_tag = key if rng.random() < 0.7 else f"common{rng.randrange(3)}"
            data = _blob(content_tag, (8 + (hash(content_tag) % 40)) * KiB)
            if content_tag != key:
                key = f"loras/c_{content_tag}_{wid}_{j}.safetensors"
            fd = os.open(store.lock_path(key), os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    with store.reserve(key, len(data)), store.in_use(key):
                        part = store.partial_path(key)
                        part.write_bytes(data)
                        store.commit(key, part, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                                     source=f"worker{wid}")
                except NotEnoughSpace:
                    pass  # everything else in use by other workers right now: a legitimate refusal
            finally:
                os.close(fd)
            if j % 10 == 0:
                store.clean(max_size=500 * KiB)
        store.close()
        q.put((wid, None))
    except BaseException as exc:  # report to the parent instead of dying silently
        q.put((wid, repr(exc)))


def test_four_processes_leave_a_consistent_index(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    Store(root).close()
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(root), w, 50, q)) for w in range(4)]
    for p in procs:
        p.start()
    results = [q.get(timeout=240) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert [err for _w, err in results if err] == []

    store = Store(root, max_size=600 * KiB)
    report = store.verify(rehash=True, fix=False, stale_minutes=0)
    assert report.ok, report.findings
    assert [f for f in report.findings if f.kind != "stale_lock"] == []
    entries = store.entries()
    assert entries
    # Disk and index agree exactly: every file is indexed, and usage counts each inode once.
    on_disk = {p.relative_to(root).as_posix(): p.stat() for p in root.rglob("*")
               if p.is_file() and ".autocloud" not in p.parts}
    assert set(on_disk) == {e.key for e in entries}
    inodes = {(st.st_dev, st.st_ino): st.st_size for st in on_disk.values()}
    assert store.usage().bytes == sum(inodes.values())
    assert store.usage().bytes <= 600 * KiB
    conn = store._index.conn()
    assert conn.execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 0
    assert conn.execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0
    assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
