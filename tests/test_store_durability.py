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
