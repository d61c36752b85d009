"""Store: commit/lookup/touch, atomic replace, dedupe, reserve/evict, pin, clean, paths, adopt."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from comfy_autocloud.errors import IntegrityError, NotEnoughSpace, StoreError
from comfy_autocloud.store import Entry, Store
from servers import safetensors_header, safetensors_of

MiB = 2**20


def put(store: Store, key: str, data: bytes, **kw: object) -> Entry:
    """Write a partial file the way the transfer engine does, then commit it."""
    part = store.partial_path(key)
    part.write_bytes(data)
    return store.commit(key, part, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                        source=str(kw.pop("source", "https://example.test/" + key)), **kw)  # type: ignore[arg-type]


def blob(tag: str, size: int) -> bytes:
    """A valid safetensors file of `size` bytes (the store checks model files' format) named by `tag`."""
    return safetensors_of(hashlib.sha256(tag.encode()).digest(), size)


def age(store: Store, key: str, seconds_ago: float) -> None:
    """Pretend `key` was last used `seconds_ago` (LRU priority is the access time)."""
    t = time.time() - seconds_ago
    store._index.execute(
        "UPDATE entries SET last_access=?, priority=ac_priority(size, hits, ?, 0) WHERE key=?", (t, t, key))


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_commit_lookup_touch_round_trip(store: Store) -> None:
    data = blob("a", 4096)
    e = put(store, "checkpoints/sd/a.safetensors", data, source="https://cdn.test/a")
    assert e.path == store.root / "checkpoints" / "sd" / "a.safetensors"
    assert e.path.read_bytes() == data
    assert (e.size, e.sha256, e.source, e.hits, e.pinned, e.in_use) == (
        4096, hashlib.sha256(data).hexdigest(), "https://cdn.test/a", 1, False, False)
    assert not store.partial_path("checkpoints/sd/a.safetensors").exists()
    got = store.lookup("checkpoints/sd/a.safetensors")
    assert got == e
    time.sleep(0.01)
    store.touch("checkpoints/sd/a.safetensors")
    store.touch("checkpoints/sd/a.safetensors")
    after = store.lookup("checkpoints/sd/a.safetensors")
    assert after is not None and after.hits == 3 and after.last_access > e.last_access
    assert store.lookup("checkpoints/missing.safetensors") is None
    store.touch("checkpoints/missing.safetensors")  # not cached: no error, no row
    assert [x.key for x in store.entries()] == ["checkpoints/sd/a.safetensors"]


def test_lookup_heals_vanished_file_and_ignores_wrong_size(store: Store) -> None:
    e = put(store, "loras/x.safetensors", blob("x", 1000))
    e.path.write_bytes(b"short")
    assert store.lookup(e.key) is None
    assert [x.key for x in store.entries()] == [e.key]  # a wrong size is for verify() to judge
    e.path.unlink()
    assert store.lookup(e.key) is None
    assert store.entries() == []


def test_commit_wrong_size_raises_and_leaves_nothing_at_final_path(store: Store) -> None:
    key = "vae/v.safetensors"
    part = store.partial_path(key)
    part.write_bytes(b"x" * 10)
    with pytest.raises(IntegrityError, match="10 bytes, expected 11"):
        store.commit(key, part, size=11, sha256="0" * 64, source="s")
    assert not store.path_for(key).exists()
    assert part.exists()  # kept for the transfer engine to resume or discard
    assert store.entries() == []


def test_replace_is_atomic_for_readers(store: Store) -> None:
    key = "checkpoints/m.safetensors"
    a, b = blob("A", 2 * MiB), blob("B", 2 * MiB)
    put(store, key, a)
    path = store.path_for(key)
    with open(path, "rb") as held:  # an open reader keeps the old bytes after a replace
        stop = threading.Event()
        seen: list[str] = []

        def reader() -> None:
            while not stop.is_set():
                data = path.read_bytes()
                seen.append("A" if data == a else "B" if data == b else "torn")

        t = threading.Thread(target=reader)
        t.start()
        for i in range(20):
            put(store, key, b if i % 2 == 0 else a)
        stop.set()
        t.join()
        assert held.read() == a
    assert seen and "torn" not in seen
    e = store.lookup(key)
    assert e is not None and e.sha256 == hashlib.sha256(a).hexdigest() and e.hits == 21
    assert len(store.entries()) == 1


def test_identical_content_is_stored_once(store: Store) -> None:
    data = blob("same", 3 * MiB)
    e1 = put(store, "checkpoints/one.safetensors", data)
    e2 = put(store, "checkpoints/renamed/two.safetensors", data)
    assert os.stat(e1.path).st_ino == os.stat(e2.path).st_ino
    assert not store.partial_path(e2.key).exists()
    u = store.usage()
    assert (u.entries, u.bytes, u.logical_bytes) == (2, 3 * MiB, 6 * MiB)
    assert store.find_by_sha256(e2.sha256) is not None
    store.evict(e1.key)
    assert not e1.path.exists()
    assert e2.path.read_bytes() == data
    assert store.lookup(e2.key) is not None
    assert store.usage().bytes == 3 * MiB


def test_reserve_evicts_lru_victims_but_never_pinned_in_use_or_self(tmp_path: Path) -> None:
    s = Store(tmp_path / "c", max_size=10 * MiB, policy="lru", high_watermark=1.0, low_watermark=1.0)
    for i, k in enumerate(["loras/old.safetensors", "loras/pinned.safetensors", "loras/busy.safetensors",
                           "loras/self.safetensors", "loras/mid.safetensors", "loras/new.safetensors"]):
        put(s, k, blob(k, MiB + i))
    age(s, "loras/pinned.safetensors", 600)
    age(s, "loras/busy.safetensors", 500)
    age(s, "loras/self.safetensors", 450)
    age(s, "loras/old.safetensors", 400)
    age(s, "loras/mid.safetensors", 300)
    s.pin("loras/pinned.safetensors")
    with s.in_use("loras/busy.safetensors"):
        assert s.lookup("loras/busy.safetensors").in_use  # type: ignore[union-attr]
        # 6 files ~6 MiB used; replacing self (1 MiB) with 6 MiB needs ~1 MiB more than the cap allows.
        with s.reserve("loras/self.safetensors", 6 * MiB) as r:
            assert [e.key for e in r.evicted] == ["loras/old.safetensors", "loras/mid.safetensors"]
            assert s.usage().reserved_bytes == 6 * MiB
        assert s.usage().reserved_bytes == 0
    left = {e.key for e in s.entries()}
    assert left == {"loras/pinned.safetensors", "loras/busy.safetensors", "loras/self.safetensors",
                    "loras/new.safetensors"}
    assert not (s.root / "loras/old.safetensors").exists()
    s.close()


def test_reserve_default_policy_prefers_keeping_frequently_used(tmp_path: Path) -> None:
    s = Store(tmp_path / "c", max_size=8 * MiB, high_watermark=1.0, low_watermark=1.0)
    put(s, "checkpoints/hot.safetensors", blob("hot", 3 * MiB))
    for _ in range(5):
        s.touch("checkpoints/hot.safetensors")
    put(s, "checkpoints/once.safetensors", blob("once", 3 * MiB))  # newer, but used only once
    with s.reserve("checkpoints/new.safetensors", 3 * MiB) as r:
        assert [e.key for e in r.evicted] == ["checkpoints/once.safetensors"]
    clock = s._index.get_meta("clock")
    assert clock is not None and float(clock) > 0  # aging clock advanced and persisted
    s.close()
    s2 = Store(tmp_path / "c", max_size=8 * MiB)
    assert s2._index.get_meta("clock") == clock
    s2.close()


def test_not_enough_space_before_download_when_pinned_fill_cap(tmp_path: Path) -> None:
    s = Store(tmp_path / "c", max_size=4 * MiB)
    put(s, "checkpoints/big.safetensors", blob("big", 3 * MiB), pin=True)
    put(s, "loras/small.safetensors", blob("small", MiB // 2))
    with pytest.raises(NotEnoughSpace) as info:
        s.reserve("checkpoints/next.safetensors", 2 * MiB)
    assert info.value.subject == "checkpoints/next.safetensors"
    assert info.value.reason == "needs 2.0 MiB, cap 4.0 MiB, 3.0 MiB held by pinned/in-use files"
    # Impossible requests evict nothing.
    assert {e.key for e in s.entries()} == {"checkpoints/big.safetensors", "loras/small.safetensors"}
    assert s.usage().reserved_bytes == 0
    s.close()


def test_reservations_are_shared_and_dead_ones_ignored(tmp_path: Path) -> None:
    s = Store(tmp_path / "c", max_size=4 * MiB)
    r1 = s.reserve("checkpoints/a.safetensors", 3 * MiB)
    with pytest.raises(NotEnoughSpace, match=r"3\.0 MiB reserved by downloads in progress"):
        s.reserve("checkpoints/b.safetensors", 2 * MiB)
    r1.release()
    s.reserve("checkpoints/b.safetensors", 2 * MiB).release()
    # A reservation and a lease left by a process that died do not block anything.
    pid = dead_pid()
    s._index.execute("INSERT INTO reservations(key, nbytes, pid, pstart, created) VALUES(?,?,?,?,?)",
                     ("checkpoints/z.safetensors", 4 * MiB, pid, "1", time.time()))
    put(s, "loras/l.safetensors", blob("l", MiB))
    s._index.execute("INSERT INTO leases(key, pid, pstart, token, created) VALUES(?,?,?,?,?)",
                     ("loras/l.safetensors", pid, "1", "t", time.time()))
    assert s.usage().reserved_bytes == 0
    assert s.lookup("loras/l.safetensors").in_use is False  # type: ignore[union-attr]
    with s.reserve("checkpoints/c.safetensors", 4 * MiB) as r:
        assert [e.key for e in r.evicted] == ["loras/l.safetensors"]
    assert s._index.conn().execute("SELECT COUNT(*) FROM reservations").fetchone()[0] == 0
    s.close()


def test_commit_evicts_down_to_low_watermark(tmp_path: Path) -> None:
    s = Store(tmp_path / "c", max_size=10 * MiB, high_watermark=0.9, low_watermark=0.5, policy="lru")
    for i in range(9):
        put(s, f"loras/l{i}.safetensors", blob(str(i), MiB))
    assert s.usage().bytes == 9 * MiB  # at 90%: not above the high watermark yet
    e = put(s, "loras/last.safetensors", blob("last", MiB))
    u = s.usage()
    assert u.bytes <= 5 * MiB and s.lookup(e.key) is not None
    assert s.lookup("loras/l8.safetensors") is not None and s.lookup("loras/l0.safetensors") is None
    s.close()


def test_pin_unpin_evict_rules(store: Store) -> None:
    e = put(store, "loras/p.safetensors", blob("p", 100))
    with pytest.raises(StoreError, match="not in the cache"):
        store.pin("loras/nothing.safetensors")
    with pytest.raises(StoreError, match="not in the cache"):
        store.unpin("loras/nothing.safetensors")
    store.pin(e.key)
    assert store.lookup(e.key).pinned  # type: ignore[union-attr]
    with pytest.raises(StoreError, match="pinned"):
        store.evict(e.key)
    store.unpin(e.key)
    with store.in_use(e.key), pytest.raises(StoreError, match="in use"):
        store.evict(e.key)
    with store.in_use(e.key):
        assert store.evict(e.key, force=True).key == e.key
    assert not e.path.exists() and store.entries() == []
    with pytest.raises(StoreError, match="not in the cache"):
        store.evict(e.key)


def test_clean_keep_days_and_max_size(tmp_path: Path) -> None:
    s = Store(tmp_path / "c", policy="lru")
    for name in ("stale1", "stale2", "pinned_stale", "warm1", "warm2", "warm3"):
        put(s, f"loras/{name}.safetensors", blob(name, MiB))
    for name in ("stale1", "stale2", "pinned_stale"):
        age(s, f"loras/{name}.safetensors", 10 * 86400)
    age(s, "loras/warm1.safetensors", 3 * 86400)
    age(s, "loras/warm2.safetensors", 2 * 86400)
    s.pin("loras/pinned_stale.safetensors")
    plan = s.clean(keep_days=7, max_size=3 * MiB, dry_run=True)
    expect = ["loras/stale1.safetensors", "loras/stale2.safetensors", "loras/warm1.safetensors"]
    assert sorted(e.key for e in plan) == expect
    assert len(s.entries()) == 6  # dry run removed nothing
    removed = s.clean(keep_days=7, max_size=3 * MiB)
    assert sorted(e.key for e in removed) == expect
    assert {e.key for e in s.entries()} == {"loras/pinned_stale.safetensors", "loras/warm2.safetensors",
                                            "loras/warm3.safetensors"}
    assert s.clean(keep_days=7) == []
    s.close()


def test_path_for_rejects_symlinked_folder_leading_outside(tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    s = Store(tmp_path / "c")
    (s.root / "checkpoints").symlink_to(outside, target_is_directory=True)
    with pytest.raises(StoreError, match="outside the cache"):
        s.path_for("checkpoints/x.safetensors")
    part = s.partial_path("checkpoints/x.safetensors")
    part.write_bytes(b"data")
    with pytest.raises(StoreError, match="outside the cache"):
        s.commit("checkpoints/x.safetensors", part, size=4, sha256=hashlib.sha256(b"data").hexdigest(),
                 source="s")
    assert list(outside.iterdir()) == []
    # A symlink that stays inside the cache is fine (folder aliases such as unet -> diffusion_models).
    (s.root / "diffusion_models").mkdir()
    (s.root / "unet").symlink_to(s.root / "diffusion_models", target_is_directory=True)
    assert s.path_for("unet/u.safetensors") == s.root / "unet" / "u.safetensors"
    (s.root / "private").symlink_to(s.root / ".autocloud", target_is_directory=True)
    with pytest.raises(StoreError, match="private"):
        s.path_for("private/index.sqlite")
    s.close()


@pytest.mark.parametrize("key", [
    "../etc/passwd", "/etc/passwd", "checkpoints/../../x", "checkpoints", "checkpoints/",
    ".autocloud/index.sqlite", "checkpoints/.autocloud", "checkpoints\\x", "checkpoints/a\x00b",
    "c:/x", "~/x", "loras//x", "loras/./x", "",
])
def test_hostile_keys_are_rejected(store: Store, key: str) -> None:
    for fn in (store.path_for, store.partial_path, store.lock_path, store.lookup, store.pin):
        with pytest.raises(StoreError):
            fn(key)
    with pytest.raises(StoreError):
        store.reserve(key, 1)


def test_adopt_and_find_by_sha256(store: Store) -> None:
    path = store.root / "vae" / "hand.safetensors"
    path.parent.mkdir()
    path.write_bytes(b"placed by hand")
    e = store.adopt("vae/hand.safetensors")
    assert e.sha256 == hashlib.sha256(b"placed by hand").hexdigest() and e.source == "local"
    assert store.find_by_sha256(e.sha256.upper()) == store.lookup(e.key)
    assert store.find_by_sha256("1" * 64) is None
    with pytest.raises(StoreError):
        store.find_by_sha256("nothex")
    with pytest.raises(StoreError, match="no file"):
        store.adopt("vae/absent.safetensors")


def test_lookup_and_touch_of_a_1gib_file_are_fast(store: Store) -> None:
    key = "checkpoints/big.safetensors"
    part = store.partial_path(key)
    with open(part, "wb") as fh:  # sparse: the store never reads the bytes on a hit
        fh.write(safetensors_header(2**30))
        fh.truncate(2**30)
    store.commit(key, part, size=2**30, sha256="ab" * 32, source="s")
    timings = []
    for _ in range(50):
        t0 = time.perf_counter()
        assert store.lookup(key) is not None
        store.touch(key)
        timings.append(time.perf_counter() - t0)
    timings.sort()
    assert timings[len(timings) // 2] < 0.005, timings


def test_switching_policy_reranks(tmp_path: Path) -> None:
    s = Store(tmp_path / "c", policy="lru")
    put(s, "loras/a.safetensors", blob("a", 100))
    prio = s._index.conn().execute("SELECT priority FROM entries").fetchone()[0]
    assert prio > 1e9  # an access time
    s.close()
    s = Store(tmp_path / "c", policy="default")
    prio = s._index.conn().execute("SELECT priority FROM entries").fetchone()[0]
    assert prio < 1e9 and s._index.get_meta("policy") == "default"
    s.close()
    with pytest.raises(StoreError, match="unknown eviction policy"):
        Store(tmp_path / "c", policy="fifo")


def test_store_used_from_many_threads(store: Store) -> None:
    keys = [f"loras/t{i}.safetensors" for i in range(8)]
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(10):
                k = keys[(i + j) % len(keys)]
                put(store, f"loras/w{i}_{j}.safetensors", blob(f"{i}-{j}", 1000))
                store.touch(k)
                store.lookup(k)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(store.entries()) == 80
    assert store.verify(fix=False).ok
