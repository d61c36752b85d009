"""Issue 18: what a probe as an attacker and an unlucky user found, each against real origins.

Bad content committed as a cache hit; a full disk during a download of unknown size; failed partials
left behind; a list from the network naming local files; tokens under any query parameter name; a
42 KB error from an origin sending more than Content-Length; unlimited failed peer authentication.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_helpers import run_cli
from comfy_autocloud.config import load_settings
from comfy_autocloud.errors import NotEnoughSpace
from comfy_autocloud.fetch import FetchResult, FetchService
from comfy_autocloud.fleet.peer_server import PeerLimits, PeerServer, PeerServerThread
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.store import Store
from comfy_autocloud.transfer import RetryPolicy, TransferOptions
from mounts import tmpfs
from servers import Behaviour, ChaosOrigin, NginxOrigin, RawOrigin, nginx_running, safetensors_bytes

MiB = 2**20
HTML = b"<!DOCTYPE html>\n<html><head><title>Error</title></head><body><h1>Access denied</h1></body></html>\n"
LFS = (b"version https://git-lfs.github.com/spec/v1\n"
       b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 12345\n")
GOOD = safetensors_bytes(MiB + 123, seed=18)

pytestmark = pytest.mark.skipif(not NginxOrigin.available(), reason="nginx is not installed (./dev test installs it)")


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[NginxOrigin]:
    with nginx_running(tmp_path / "www", tmp_path / "nginx") as o:
        yield o


@pytest.fixture
def raw() -> Iterator[RawOrigin]:
    with RawOrigin() as o:
        yield o


def _options(attempts: int = 2) -> TransferOptions:
    return TransferOptions(retry=RetryPolicy(attempts=attempts, backoff_base=0.01, backoff_max=0.05))


def _leftovers(store: Store) -> list[str]:
    return sorted(p.name for d in store.partial_dirs for p in d.iterdir())


# ------------------------------------------------------------------ 1. content checks before commit
@pytest.mark.parametrize("case", ["html", "json", "lfs", "truncated", "empty", "cut_no_length"])
def test_a_body_that_is_not_the_model_is_refused(case: str, origin: NginxOrigin, raw: RawOrigin, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    name = f"{case}.safetensors"
    if case == "html":
        url = raw.add(name, f"HTTP/1.1 200 OK\nContent-Type: text/html; charset=utf-8\nContent-Length: {len(HTML)}",
                      HTML)
        arrived = f"an HTML page (text/html, {len(HTML)} bytes), not a safetensors file"
    elif case == "json":
        body = b'{"error": "Invalid credentials in Authorization header"}'
        url = raw.add(name, f"HTTP/1.1 200 OK\nContent-Type: application/json\nContent-Length: {len(body)}", body)
        arrived = f"a JSON document (application/json, {len(body)} bytes), not a safetensors file"
    elif case == "lfs":
        (origin.data_dir / name).write_bytes(LFS)
        url = origin.url(name)
        arrived = (f"a Git LFS pointer (application/octet-stream, {len(LFS)} bytes), not a safetensors file: "
                   "the URL serves the pointer, not the file")
    elif case == "truncated":  # valid header, data cut short; the origin serves what it has, honestly
        (origin.data_dir / name).write_bytes(GOOD[: len(GOOD) // 2])
        url = origin.url(name)
        arrived = "a broken safetensors file: it is truncated"
    elif case == "empty":
        (origin.data_dir / name).write_bytes(b"")
        url = origin.url(name)
        arrived = "an empty body (application/octet-stream, 0 bytes), not a safetensors file"
    else:  # no Content-Length: the connection's end is the body's end, and it came early
        url = raw.add(name, "HTTP/1.1 200 OK\nConnection: close", GOOD[: len(GOOD) // 3])
        arrived = "a broken safetensors file: it is truncated"
    cache = tmp_path / "cache"
    rc = run_cli("--cache-dir", str(cache), "fetch", url, "--folder", "checkpoints")
    err = capsys.readouterr().err
    assert rc == 1
    assert f"✗ checkpoints/{name}: {url} sent {arrived}" in " ".join(err.split()), err
    assert "Traceback" not in err
    store = Store(cache)
    assert store.entries() == [] and not store.path_for(f"checkpoints/{name}").exists()
    assert _leftovers(store) == []
    assert store.verify(rehash=True, fix=False).ok


def test_a_source_serving_an_error_page_is_skipped_for_the_next(origin: NginxOrigin, raw: RawOrigin,
                                                                tmp_path: Path) -> None:
    bad = raw.add("m.safetensors", f"HTTP/1.1 200 OK\nContent-Type: text/html\nContent-Length: {len(HTML)}", HTML)
    (origin.data_dir / "m.safetensors").write_bytes(GOOD)
    svc = FetchService(Store(tmp_path / "cache"), options=_options())
    spec = ModelSpec(folder="checkpoints", filename="m.safetensors", sources=(bad, origin.url("m.safetensors")))
    got = svc.fetch(spec)
    assert got.path.read_bytes() == GOOD and got.source == origin.url("m.safetensors")


def test_an_error_page_already_at_the_final_path_is_not_adopted(origin: NginxOrigin, tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    path = store.path_for("checkpoints/m.safetensors")
    path.parent.mkdir(parents=True)
    path.write_bytes(HTML)  # e.g. saved by `wget` from a login page
    (origin.data_dir / "m.safetensors").write_bytes(GOOD)
    got = FetchService(store, options=_options()).fetch(
        ModelSpec(folder="checkpoints", filename="m.safetensors", sources=(origin.url("m.safetensors"),)))
    assert not got.cached and got.path.read_bytes() == GOOD


def test_verify_and_rehash_find_a_cached_file_that_is_not_what_its_name_says(tmp_path: Path,
                                                                             capsys: pytest.CaptureFixture[str]
                                                                             ) -> None:
    cache = tmp_path / "cache"
    store = Store(cache)
    path = store.path_for("loras/page.safetensors")
    path.parent.mkdir(parents=True)
    path.write_bytes(HTML)  # what an older version (or a person) put there
    store.adopt("loras/page.safetensors")
    store.close()
    for flags in ((), ("--rehash",)):
        rc = run_cli("--cache-dir", str(cache), "verify", "--no-fix", "--json", *flags)
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert rc == 1
        assert [(f["kind"], f["key"]) for f in out["findings"]] == [("bad_content", "loras/page.safetensors")]
        assert f"holds an HTML page ({len(HTML)} bytes), not a safetensors file" in out["findings"][0]["reason"]
    assert run_cli("--cache-dir", str(cache), "verify", "--rehash") == 0
    assert not path.exists() and Store(cache).entries() == []
    assert any(p.name.endswith("page.safetensors") for p in (cache / ".autocloud" / "quarantine").iterdir())


# ------------------------------------------------------------------ 2 + 3. disk full, partials
def test_disk_full_on_an_unknown_size_download_fails_that_file_only(origin: NginxOrigin, raw: RawOrigin,
                                                                    tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    big = raw.add("big.safetensors", "HTTP/1.1 200 OK\nConnection: close", safetensors_bytes(64 * MiB, seed=2))
    (origin.data_dir / "small.safetensors").write_bytes(GOOD)
    with tmpfs(tmp_path / "fs", "40m") as fs:
        cache = fs / "cache"
        small = origin.url("small.safetensors")
        specs = [ModelSpec(folder="checkpoints", filename="big.safetensors", sources=(big,)),
                 ModelSpec(folder="checkpoints", filename="small.safetensors", sources=(small,))]
        store = Store(cache, min_free_disk=MiB)
        results = FetchService(store, options=_options()).fetch_many(specs, parallel=1)
        failed, done = results
        assert isinstance(failed, NotEnoughSpace) and failed.subject == "checkpoints/big.safetensors"
        assert "disk full" in failed.reason and "the partial download was removed" in failed.reason
        assert isinstance(done, FetchResult) and done.path.read_bytes() == GOOD
        assert _leftovers(store) == []  # a single stream cannot resume: its partial is gone, the disk free again
        assert [e.key for e in store.entries()] == ["checkpoints/small.safetensors"]
        assert store.verify(rehash=True, fix=False).ok
        store.close()
        # The same through the CLI: one clear line for that file, no traceback, the other file fine.
        monkeypatch.setenv("AUTOCLOUD_MIN_FREE_DISK", "1M")  # a small disk: the setting, not the 256 MiB default
        rc = run_cli("--cache-dir", str(cache), "fetch", big, origin.url("small.safetensors"), "--folder", "loras",
                     "--parallel", "1")
        out = capsys.readouterr()
        assert rc == 1 and "Traceback" not in out.err
        assert "✗ loras/big.safetensors: " in out.err and "disk full" in out.err
        assert "✓ loras/small.safetensors" in out.out


def test_failed_single_stream_partial_is_removed_at_once(tmp_path: Path) -> None:
    with ChaosOrigin() as chaos:
        url = chaos.add("s.safetensors", Behaviour(data=GOOD, ranges=False, reset_after=300_000, reset_times=99))
        store = Store(tmp_path / "cache")
        svc = FetchService(store, options=_options(attempts=2))
        results = svc.fetch_many([ModelSpec(folder="checkpoints", filename="s.safetensors", sources=(url,))])
    assert not isinstance(results[0], FetchResult)
    assert _leftovers(store) == []  # no .state: nothing could resume it, so nothing is kept


def test_a_release_on_a_full_disk_does_not_replace_the_error(tmp_path: Path) -> None:
    """SQLite cannot write the index on a full disk: releasing a reservation then must not raise (it used to
    raise 'database or disk is full' over the download's own error); the row goes at the next reservation."""
    with tmpfs(tmp_path / "fs", "8m") as fs:
        store = Store(fs / "cache", min_free_disk=0)
        reservation = store.reserve("checkpoints/a.safetensors", 0)
        filler = fs / "filler"
        with open(filler, "wb") as f, pytest.raises(OSError):
            for _ in range(64):
                f.write(b"\0" * MiB)
                f.flush()
        with pytest.raises(NotEnoughSpace, match="cache index cannot be written"):
            for i in range(200):  # until SQLite needs a page it cannot have
                store._index.execute("INSERT INTO meta(name, value) VALUES(?, ?)", (f"pad{i}", "x" * 4000))
        reservation.release()  # logged, not raised
        filler.unlink()
        with store.reserve("checkpoints/b.safetensors", 0):
            rows = store._index.conn().execute("SELECT key FROM reservations").fetchall()
            assert rows == [("checkpoints/b.safetensors",)]
        store.close()


def _stopped_partial(store: Store, key: str, size: int) -> Path:
    part = store.partial_path(key)
    with open(part, "wb") as f:
        f.write(b"\1" * size)
    part.with_name(part.name + ".state").write_text("{}")  # a resumable download that stopped
    return part


def test_stopped_partials_count_in_room_planning_and_in_the_message(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs", "64m") as fs:
        store = Store(fs / "cache", min_free_disk=MiB)
        part = _stopped_partial(store, "checkpoints/old.safetensors", 30 * MiB)
        with pytest.raises(NotEnoughSpace) as info:
            store.reserve("checkpoints/huge.safetensors", 100 * MiB)
        assert "1 stopped partial download(s) hold 30.0 MiB" in info.value.reason
        assert part.exists()  # nothing removed for nothing
        with store.reserve("checkpoints/next.safetensors", 40 * MiB):
            assert not part.exists()  # the stopped partial made room for a download that now fits
        store.close()


# ------------------------------------------------------------------ 4. lists from the network
def _publish_list(origin: NginxOrigin, doc: dict, index: str = "model_versions.json",
                  list_url: str | None = None) -> str:
    data = json.dumps(doc).encode()
    (origin.data_dir / f"list-{index}").write_bytes(data)
    import hashlib

    entry = {"url": list_url or origin.url(f"list-{index}"), "sha256": hashlib.sha256(data).hexdigest(), "version": 1}
    (origin.data_dir / index).write_text(json.dumps({"base_models": entry}))
    return origin.url(index)


def test_a_synced_list_may_not_name_local_files(origin: NginxOrigin, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "private" / "shadow.safetensors"
    secret.parent.mkdir()
    secret.write_bytes(GOOD)
    lists = tmp_path / "lists"
    url = _publish_list(origin, {"checkpoints": {"stolen.safetensors": secret.as_uri()}})
    cache = str(tmp_path / "cache")
    assert run_cli("--cache-dir", cache, "manifest", "sync", url, "--dir", str(lists)) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "checkpoints/stolen.safetensors" in err and f"names the local file {secret.as_uri()}" in err
    assert "came over the network" in err and "last good lists are kept" in err
    assert not (lists / "base_models.json").exists()
    # The list URL itself may not be a local file either.
    (tmp_path / "local.json").write_text(json.dumps({"checkpoints": {"x.safetensors": "https://h/x.safetensors"}}))
    url2 = _publish_list(origin, {}, index="idx2.json", list_url=(tmp_path / "local.json").as_uri())
    assert run_cli("--cache-dir", cache, "manifest", "sync", url2, "--dir", str(lists)) == 1
    assert "list 'base_models'" in capsys.readouterr().err
    # An operator may allow a directory (a shared volume); then the list syncs and fetches.
    monkeypatch.setenv("AUTOCLOUD_NETWORK_LIST_LOCAL_DIRS", str(secret.parent))
    assert run_cli("--cache-dir", cache, "manifest", "sync", url, "--dir", str(lists)) == 0
    assert run_cli("--cache-dir", cache, "fetch", "--manifest", str(lists)) == 0
    assert (Path(cache) / "checkpoints" / "stolen.safetensors").read_bytes() == GOOD
    # A local index is the operator's own: its lists may name local files without any setting.
    monkeypatch.delenv("AUTOCLOUD_NETWORK_LIST_LOCAL_DIRS")
    local_index = tmp_path / "index.json"
    import hashlib

    (tmp_path / "mine.json").write_text(json.dumps({"vae": {"v.safetensors": secret.as_uri()}}))
    local_index.write_text(json.dumps({"mine": {"url": (tmp_path / "mine.json").as_uri(), "version": 1,
                                                "sha256": hashlib.sha256((tmp_path / "mine.json").read_bytes())
                                                .hexdigest()}}))
    assert run_cli("--cache-dir", cache, "manifest", "sync", str(local_index), "--dir", str(tmp_path / "l2")) == 0


def test_an_adapter_list_from_a_url_may_not_name_local_files(origin: NginxOrigin, tmp_path: Path) -> None:
    from comfy_autocloud.comfy.runtime import Adapter

    (origin.data_dir / "list.json").write_text(json.dumps({"checkpoints": {"x.safetensors": "file:///etc/passwd"}}))
    adapter = Adapter.create(load_settings(env={"AUTOCLOUD_CACHE": str(tmp_path / "cache"),
                                                "AUTOCLOUD_MANIFEST": origin.url("list.json")}))
    try:
        assert adapter.manifest_error is not None and "came over the network" in adapter.manifest_error
        assert len(adapter.catalog) == 0
    finally:
        adapter.close()


# ------------------------------------------------------------------ 5. tokens under any parameter name
def test_tokens_under_any_query_name_never_appear(origin: NginxOrigin, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str],
                                                  caplog: pytest.LogCaptureFixture,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("AUTOCLOUD_RETRIES", "3")
    with ChaosOrigin() as chaos, caplog.at_level(logging.INFO):
        busy = chaos.add("busy.safetensors", Behaviour(data=GOOD, fail_first=99, fail_status=503, retry_after="0"))
        rc = run_cli("--cache-dir", str(cache), "fetch", busy + "?t=SECRETTOKEN1", "--folder", "loras",
                     "--name", "busy.safetensors", "--json")
    out = capsys.readouterr()
    assert rc == 1
    assert out.err.count("retry") >= 2  # the warnings that used to leak it (the CLI logs to stderr)
    (origin.data_dir / "signed.safetensors").write_bytes(GOOD)
    signed = origin.url("signed.safetensors") + "?hdnea=exp=1999999999~acl=/*~hmac=SECRETHMAC2"
    assert run_cli("--cache-dir", str(cache), "fetch", signed, "--folder", "loras", "--json") == 0
    out2 = capsys.readouterr()
    row = json.loads(out2.out.strip().splitlines()[-1])
    assert row["source"] == origin.url("signed.safetensors") + "?hdnea=***"
    texts = [out.out, out.err, out2.out, out2.err, *(r.getMessage() for r in caplog.records)]
    for secret in ("SECRETTOKEN1", "SECRETHMAC2"):
        assert not [t for t in texts if secret in t]
    (source,) = sqlite3.connect(cache / ".autocloud" / "index.sqlite").execute("SELECT source FROM entries").fetchone()
    assert source == row["source"]
    for f in (cache / ".autocloud").glob("index.sqlite*"):
        assert b"SECRETHMAC2" not in f.read_bytes()
    # A row an older version stored with the secret in it is redacted when the cache is next opened.
    with contextlib.closing(sqlite3.connect(cache / ".autocloud" / "index.sqlite")) as db, db:
        db.execute("UPDATE entries SET source=?", (signed,))
        db.execute("DELETE FROM meta WHERE name='sources_redacted'")
    Store(cache).close()
    assert [e.source for e in Store(cache).entries()] == [row["source"]]


# ------------------------------------------------------------------ 6. more than Content-Length
def test_an_origin_sending_more_than_content_length_gives_a_short_error(raw: RawOrigin, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    url = raw.add("over.bin", "HTTP/1.1 200 OK\nContent-Length: 1000", b"x" * 1000 + b"<html>" + b"A" * 42_000,
                  close=False)
    svc = FetchService(Store(tmp_path / "cache"), options=_options(attempts=3))
    with caplog.at_level(logging.WARNING):
        (err,) = svc.fetch_many([ModelSpec(folder="misc", filename="over.bin", sources=(url,))])
    assert not isinstance(err, FetchResult)
    messages = [str(err), *(r.getMessage() for r in caplog.records)]
    assert any("retry" in m for m in messages)
    assert all(len(m) < 1000 and m.isprintable() for m in messages), max(messages, key=len)[:2000]
    assert "more characters" in str(err)


def test_an_excerpt_is_short_printable_and_names_a_page_title() -> None:
    from comfy_autocloud.redact import excerpt

    page = "\x1b[31m<html><head>" + "x" * 5000 + "<title>407 Proxy Authentication Required</title>\n\x00"
    out = excerpt(page)
    assert len(out) < 400 and out.isprintable() and "\x1b" not in out
    assert f"({len(page) - 200} more characters)" in out
    assert out.endswith("[page title: 407 Proxy Authentication Required]")
    assert excerpt(b"short\r\nbody") == "short  body"


# ------------------------------------------------------------------ 7. failed peer authentication
def test_failed_peer_authentication_is_limited_before_the_token_check(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    store = Store(tmp_path / "cache")
    token = "peer-token-0123456789"
    limits = PeerLimits(auth_failures_per_s=2.0, auth_failure_burst=10)
    with PeerServerThread(PeerServer(store, token, limits=limits)) as srv, caplog.at_level(logging.WARNING):
        conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=10)
        codes = []
        t0 = time.monotonic()
        for i in range(2000):
            conn.request("HEAD", "/v1/files/checkpoints/x.safetensors", headers={"Authorization": f"Bearer guess{i}"})
            resp = conn.getresponse()
            resp.read()
            codes.append(resp.status)
        elapsed = time.monotonic() - t0
        # the right token is refused too while this client is blocked: no token is compared
        conn.request("HEAD", "/v1/files/checkpoints/x.safetensors", headers={"Authorization": f"Bearer {token}"})
        blocked = conn.getresponse()
        blocked.read()
        retry_after = int(blocked.headers["Retry-After"])
        time.sleep(retry_after + 0.1)
        conn.request("HEAD", "/v1/files/checkpoints/x.safetensors", headers={"Authorization": f"Bearer {token}"})
        after = conn.getresponse()
        after.read()
        conn.close()
    assert codes.count(401) <= 10 + 2 * elapsed + 1, (codes.count(401), elapsed)
    assert codes.count(429) >= 2000 - (10 + 2 * elapsed + 1)
    assert blocked.status == 429 and after.status == 404  # authenticated: just not in this store
    lines = [r.getMessage() for r in caplog.records if "failed authentication" in r.getMessage()]
    assert 1 <= len(lines) <= 2, lines


def test_auth_failures_are_counted_per_client() -> None:
    from comfy_autocloud.fleet.auth_limit import AuthFailures

    now = [0.0]
    limiter = AuthFailures(per_s=1.0, burst=3, clock=lambda: now[0])
    for _ in range(3):
        assert limiter.blocked("10.0.0.1") == 0.0
        limiter.failed("10.0.0.1", "files")
    assert limiter.blocked("10.0.0.1") == pytest.approx(1.0)
    assert limiter.blocked("10.0.0.2") == 0.0  # another client is not affected
    now[0] = 1.0
    assert limiter.blocked("10.0.0.1") == 0.0


# ------------------------------------------------------------------ min_free_disk is a setting
def test_min_free_disk_is_a_setting_shown_by_config(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from comfy_autocloud.cli.context import AppContext

    assert load_settings(env={}).min_free_disk == 256 * MiB
    monkeypatch.setenv("AUTOCLOUD_MIN_FREE_DISK", "8M")
    assert run_cli("--cache-dir", str(tmp_path / "c"), "config", "--json") == 0
    row = json.loads(capsys.readouterr().out)["settings"]["min_free_disk"]
    assert row == {"value": 8 * MiB, "from": "env AUTOCLOUD_MIN_FREE_DISK"}
    assert run_cli("--cache-dir", str(tmp_path / "c"), "config") == 0
    assert "min_free_disk" in capsys.readouterr().out
    settings = load_settings({"cache_dir": str(tmp_path / "c")})
    assert AppContext(settings).store().min_free_disk == 8 * MiB
