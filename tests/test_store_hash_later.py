"""Entries committed without a sha256 (a warmup's first copy, hashed by a background process afterwards).

Nothing may trust a hash that is not there: such an entry is not deduplicated, not announced to the fleet,
not served to peers as verified, and a caller that compares hashes gets it computed first.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest

from comfy_autocloud.fetch.service import FetchService
from comfy_autocloud.fleet.registry import holdings_of
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.store import Store
from comfy_autocloud.store import store as store_mod
from test_store import blob, put
from test_store_durability import flip_one_byte

KEY = "checkpoints/a.safetensors"


def put_unhashed(store: Store, key: str, data: bytes, **kw: object):
    part = store.partial_path(key)
    part.write_bytes(data)
    return store.commit(key, part, size=len(data), sha256=None, source="file:///volume/models/" + key,
                        etag=f"{len(data)}-1", **kw)  # type: ignore[arg-type]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_an_unhashed_entry_is_served_but_never_taken_for_a_known_hash(store: Store) -> None:
    data = blob("a", 64 * 1024)
    entry = put_unhashed(store, KEY, data)
    assert not entry.hashed and entry.sha256 == "" and entry.as_dict()["sha256"] is None
    assert store.lookup(KEY) is not None and store.path_for(KEY).read_bytes() == data
    assert [e.key for e in store.unhashed()] == [KEY]
    # Not a twin for dedupe: the same bytes committed with their hash get their own file.
    other = put(store, "checkpoints/b.safetensors", data)
    assert os.stat(other.path).st_ino != os.stat(entry.path).st_ino
    assert store.find_by_sha256(sha(data)).key == "checkpoints/b.safetensors"
    # Not announced to the fleet until hashed.
    assert [h.key for h in holdings_of(store)] == ["checkpoints/b.safetensors"]


def test_hash_pending_records_each_sha256_once(store: Store) -> None:
    a, b = blob("a", 64 * 1024), blob("b", 32 * 1024)
    put_unhashed(store, KEY, a)
    put_unhashed(store, "vae/b.safetensors", b, durability="ephemeral")
    done = store.hash_pending()
    assert {e.key: e.sha256 for e in done} == {KEY: sha(a), "vae/b.safetensors": sha(b)}
    assert store.unhashed() == [] and store.lookup(KEY).sha256 == sha(a)
    assert store.hash_pending() == []
    assert sorted(h.key for h in holdings_of(store)) == [KEY, "vae/b.safetensors"]


def test_hash_pending_skips_a_version_replaced_meanwhile(store: Store) -> None:
    put_unhashed(store, KEY, blob("old", 64 * 1024))
    rows = store._index.unhashed_rows()
    new = blob("new", 64 * 1024)
    put(store, KEY, new)  # a download replaced it after the hasher listed it
    row = store._row(rows[0], False)
    assert store._hash_row(row) is None  # the listed version is gone: nothing recorded for it
    assert store.lookup(KEY).sha256 == sha(new)


def test_with_sha256_hashes_on_demand_and_the_fetch_service_compares_the_real_hash(store: Store) -> None:
    data = blob("a", 64 * 1024)
    put_unhashed(store, KEY, data)
    assert store.with_sha256(store.lookup(KEY)).sha256 == sha(data)
    assert store.unhashed() == []  # recorded, not only returned

    put_unhashed(store, "vae/v.safetensors", data[:4096] + b"\0" * (len(data) - 4096))
    service = FetchService(store)
    # No source can be reached: a cache hit is the only way these succeed.
    spec = ModelSpec(folder="checkpoints", filename="a.safetensors", sha256=sha(data), sources=("http://127.0.0.1:9/a",))
    assert service.fetch(spec).cached
    put_unhashed(store, "checkpoints/c.safetensors", data)
    assert service.has("checkpoints/c.safetensors", sha(data))
    assert not service.has("vae/v.safetensors", sha(data))  # hashed, and it is not what is asked for
    assert store.lookup("vae/v.safetensors").hashed


def test_unhashed_and_unflushed_when_the_machine_went_down_is_copied_again(
        store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    put_unhashed(store, KEY, blob("a", 64 * 1024), durability="deferred")
    put_unhashed(store, "vae/settled.safetensors", blob("s", 4096), durability="durable")
    monkeypatch.setattr(store_mod, "boot_id", lambda: "the-next-boot")
    with caplog.at_level(logging.WARNING):
        assert store.lookup(KEY) is None  # nothing to check it against: removed, warmup copies it again
    assert not store.path_for(KEY).exists() and store.unsettled() == []
    assert KEY in caplog.text and "never hashed" in caplog.text
    assert store.lookup("vae/settled.safetensors") is not None  # on disk before the crash: still served


def test_verify_hashes_unhashed_entries_and_flags_the_unverifiable(store: Store,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    data = blob("a", 64 * 1024)
    put_unhashed(store, KEY, data)
    report = store.verify(fix=True)
    assert report.ok and report.rehashed == 1 and store.lookup(KEY).sha256 == sha(data)

    put_unhashed(store, "vae/lost.safetensors", blob("l", 4096), durability="deferred")
    flip_one_byte(store.path_for("vae/lost.safetensors"))
    monkeypatch.setattr(store_mod, "boot_id", lambda: "the-next-boot")
    report = store.verify(fix=False)
    [finding] = [f for f in report.findings if f.problem]
    assert finding.kind == "unverifiable" and finding.key == "vae/lost.safetensors"
    assert "never" in finding.reason or "nothing to check" in finding.reason


def test_commit_refuses_a_malformed_hash_but_takes_none(store: Store, tmp_path: Path) -> None:
    part = store.partial_path(KEY)
    part.write_bytes(blob("a", 4096))
    with pytest.raises(Exception, match="sha256"):
        store.commit(KEY, part, size=4096, sha256="", source="file:///x")
    assert store.commit(KEY, part, size=4096, sha256=None, source="file:///x").sha256 == ""
