"""Commit durabilities: "deferred" entries are unsettled until a flush, and checked once in another boot."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
from pathlib import Path

import pytest

from comfy_autocloud.store import Store
from comfy_autocloud.store import store as store_mod
from comfy_autocloud.store.settle import main as settle_main
from comfy_autocloud.store.settle import settle_delay
from servers import background_pids, stop_background
from test_store import blob, put

KEY = "checkpoints/a.safetensors"


def flip_one_byte(path: Path) -> None:
    """Same size, other content: what a machine going down can leave behind an unsynced write."""
    with open(path, "r+b") as fh:
        fh.seek(os.path.getsize(path) - 1)
        last = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([last[0] ^ 0xFF]))


def test_durable_and_ephemeral_commits_leave_no_mark(store: Store) -> None:
    put(store, "vae/d.safetensors", blob("d", 4096))
    put(store, "vae/e.safetensors", blob("e", 4096), durability="ephemeral")
    assert store.unsettled() == []


def test_deferred_entry_is_trusted_in_its_own_boot_without_reading_it(store: Store,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    put(store, KEY, blob("a", 64 * 1024), durability="deferred")
    [(key, _, boot)] = store.unsettled()
    assert key == KEY and boot == store_mod.boot_id() != ""
    monkeypatch.setattr(store_mod, "sha256_of", lambda p: pytest.fail("a lookup in the same boot read the file"))
    assert store.lookup(KEY) is not None  # the page cache is the truth while this kernel runs


def test_deferred_entry_from_a_boot_that_ended_is_checked_once(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    data = blob("a", 64 * 1024)
    put(store, KEY, data, durability="deferred")
    monkeypatch.setattr(store_mod, "boot_id", lambda: "the-next-boot")
    reads: list[Path] = []
    real = store_mod.sha256_of
    monkeypatch.setattr(store_mod, "sha256_of", lambda p: reads.append(p) or real(p))
    entry = store.lookup(KEY)
    assert entry is not None and entry.sha256 == hashlib.sha256(data).hexdigest()
    assert len(reads) == 1 and store.unsettled() == []  # good bytes: trusted from now on
    assert store.lookup(KEY) is not None and len(reads) == 1


def test_deferred_entry_that_lost_bytes_is_removed_not_served(store: Store, monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    put(store, KEY, blob("a", 64 * 1024), durability="deferred")
    put(store, "vae/kept.safetensors", blob("k", 4096))  # durable: never re-read
    flip_one_byte(store.path_for(KEY))
    monkeypatch.setattr(store_mod, "boot_id", lambda: "the-next-boot")
    with caplog.at_level(logging.WARNING):
        assert store.lookup(KEY) is None
    assert not store.path_for(KEY).exists() and store.unsettled() == []
    assert KEY in caplog.text and "sha256 differs" in caplog.text
    assert store.lookup("vae/kept.safetensors") is not None
    put(store, KEY, blob("a", 64 * 1024))  # fetched again: a normal entry
    assert store.lookup(KEY) is not None


def test_settle_flushes_then_trusts_what_was_written_before(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    put(store, KEY, blob("a", 64 * 1024), durability="deferred")
    assert store.settle() == 1 and store.unsettled() == []
    flip_one_byte(store.path_for(KEY))  # after a settle the bytes were on disk: no later check
    monkeypatch.setattr(store_mod, "boot_id", lambda: "the-next-boot")
    assert store.lookup(KEY) is not None


def test_settle_in_background_clears_the_marks(store: Store) -> None:
    put(store, KEY, blob("a", 64 * 1024), durability="deferred")
    assert store.settle_in_background(delay=0)
    deadline = time.monotonic() + 30
    while store.unsettled() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.unsettled() == []


def test_settle_of_a_removed_cache_recreates_nothing(tmp_path: Path) -> None:
    with Store(tmp_path / "cache") as s:
        put(s, KEY, blob("a", 4096), durability="deferred")
    shutil.rmtree(tmp_path / "cache")
    assert settle_main([str(tmp_path / "cache"), "0"]) == 0
    assert not (tmp_path / "cache").exists()
    assert settle_main([]) == 2


def test_settle_delay_setting(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("AUTOCLOUD_SETTLE_DELAY", "2.5")
    assert settle_delay() == 2.5
    monkeypatch.setenv("AUTOCLOUD_SETTLE_DELAY", "soon")
    assert 5 <= settle_delay() <= 120
    assert "AUTOCLOUD_SETTLE_DELAY" in caplog.text and "soon" in caplog.text


def test_verify_checks_what_a_boot_that_ended_left_unsettled(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    put(store, KEY, blob("a", 64 * 1024), durability="deferred")
    put(store, "vae/b.safetensors", blob("b", 64 * 1024), durability="deferred")
    flip_one_byte(store.path_for(KEY))
    monkeypatch.setattr(store_mod, "boot_id", lambda: "the-next-boot")
    store.verify()
    assert store.unsettled() == [] and not store.path_for(KEY).exists()
    assert store.lookup(KEY) is None and store.lookup("vae/b.safetensors") is not None


# ------------------------------------------------------------------------------ downloads (the durability setting)

def test_durability_names_agree_between_config_and_store() -> None:
    from comfy_autocloud import config
    from comfy_autocloud.store import DURABILITIES

    assert sorted(config.DURABILITIES) == sorted(DURABILITIES)


def test_durability_setting_defaults_to_deferred_and_refuses_unknown_names() -> None:
    from comfy_autocloud.config import load_settings

    assert load_settings({}).durability == "deferred"
    assert load_settings({"durability": "Durable"}).durability == "durable"
    with pytest.raises(Exception, match="durability"):
        load_settings({"durability": "sometimes"})


def test_a_download_with_the_default_setting_commits_deferred_and_settles_in_the_background(
        tmp_path: Path, nginx_origin, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from cli_helpers import run_cli
    from servers import write_random_file

    write_random_file(nginx_origin.data_dir / "dur.safetensors", 256 * 1024, seed=7)
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTOCLOUD_SETTLE_DELAY", "600")  # still waiting when we look
    monkeypatch.delenv("AUTOCLOUD_DURABILITY", raising=False)
    assert run_cli("--cache-dir", str(cache), "fetch", nginx_origin.url("dur.safetensors"), "--folder", "vae") == 0
    with Store(cache) as store:
        assert [k for k, _, _ in store.unsettled()] == ["vae/dur.safetensors"]
    from comfy_autocloud.store.settle import _settler_waiting

    deadline = time.monotonic() + 30
    while not _settler_waiting(cache) and time.monotonic() < deadline:  # the detached flush has started
        time.sleep(0.02)
    settlers = background_pids(cache, ("comfy_autocloud.store.settle",))
    assert len(settlers) == 1
    # A second download while that one waits starts no second flush (it covers both).
    write_random_file(nginx_origin.data_dir / "dur2.safetensors", 256 * 1024, seed=8)
    assert run_cli("--cache-dir", str(cache), "fetch", nginx_origin.url("dur2.safetensors"), "--folder", "vae") == 0
    assert background_pids(cache, ("comfy_autocloud.store.settle",)) == settlers
    stop_background(cache)

    monkeypatch.setenv("AUTOCLOUD_DURABILITY", "durable")
    write_random_file(nginx_origin.data_dir / "dur3.safetensors", 256 * 1024, seed=9)
    assert run_cli("--cache-dir", str(cache), "fetch", nginx_origin.url("dur3.safetensors"), "--folder", "vae") == 0
    with Store(cache) as store:
        assert "vae/dur3.safetensors" not in [k for k, _, _ in store.unsettled()]


def test_one_settler_per_cache_and_it_goes_on_while_entries_arrive_during_its_flush(
        store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    import fcntl

    from comfy_autocloud.store import settle as settle_mod
    from comfy_autocloud.store.layout import SETTLE_LOCK

    put(store, KEY, blob("a", 4096), durability="deferred")
    with open(store.private / SETTLE_LOCK, "a+b") as held:  # another settler waits for this cache
        fcntl.flock(held, fcntl.LOCK_EX)
        assert settle_mod.settle_cache(store.root, 0) == 0 and len(store.unsettled()) == 1
        assert settle_mod._settler_waiting(store.root)
    assert not settle_mod._settler_waiting(store.root)

    real = settle_mod.flush_and_settle
    rounds: list[int] = []

    def flush_while_a_download_commits(root: Path, index) -> int:  # type: ignore[no-untyped-def]
        n = real(root, index)
        rounds.append(n)
        if len(rounds) == 1:  # committed after this flush began: not covered by it
            put(store, "vae/late.safetensors", blob("l", 4096), durability="deferred")
        return n

    monkeypatch.setattr(settle_mod, "flush_and_settle", flush_while_a_download_commits)
    assert settle_mod.settle_cache(store.root, 0) == 2
    assert rounds == [1, 1] and store.unsettled() == []
