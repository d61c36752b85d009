"""The fetch service end to end against a real nginx origin: hits, single-flight, integrity, failures."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from comfy_autocloud.errors import IntegrityError, NotEnoughSpace, SourceError, TransferError
from comfy_autocloud.fetch import FetchService
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.store import Store
from comfy_autocloud.transfer import RetryPolicy, TransferOptions
from servers import AUTH_TOKEN, NginxOrigin, nginx_running, write_random_file

MiB = 2**20
pytestmark = pytest.mark.skipif(not NginxOrigin.available(), reason="nginx is not installed (./dev test installs it)")

FAST_RETRY = RetryPolicy(attempts=2, backoff_base=0.05, backoff_max=0.2)


@pytest.fixture()
def origin(tmp_path: Path):
    with nginx_running(tmp_path / "www", tmp_path / "nginx", limit_rate="8m") as o:
        yield o


def _spec(origin: NginxOrigin, rel: str, folder: str = "checkpoints", **kw) -> ModelSpec:
    return ModelSpec(folder=folder, filename=rel.rsplit("/", 1)[-1], sources=(origin.url(rel),), **kw)


def _cli(cache: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "comfy_autocloud.cli.main", "--cache-dir", str(cache), *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})


def test_miss_then_hit_touches_without_network(tmp_path: Path, origin: NginxOrigin) -> None:
    sha = write_random_file(origin.data_dir / "m.safetensors", 5 * MiB + 7, seed=1)
    store = Store(tmp_path / "cache")
    svc = FetchService(store)
    first = svc.fetch(_spec(origin, "m.safetensors", sha256=sha))
    assert not first.cached and first.sha256 == sha and first.bytes_downloaded == 5 * MiB + 7
    assert first.path == tmp_path / "cache" / "checkpoints" / "m.safetensors"
    requests_before = len(origin.entries())
    second = svc.fetch(_spec(origin, "m.safetensors", sha256=sha))
    assert second.cached and second.bytes_downloaded == 0 and second.path == first.path
    assert len(origin.entries()) == requests_before
    assert store.lookup("checkpoints/m.safetensors").hits >= 1


def test_threads_single_flight(tmp_path: Path, origin: NginxOrigin) -> None:
    sha = write_random_file(origin.data_dir / "t.bin", 12 * MiB, seed=2)
    svc = FetchService(Store(tmp_path / "cache"))
    results: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(svc.fetch(_spec(origin, "slow/t.bin")).sha256))
               for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert results == [sha] * 6
    assert origin.bytes_served("/slow/t.bin") == 12 * MiB


def test_eight_processes_origin_serves_once(tmp_path: Path, origin: NginxOrigin) -> None:
    size = 24 * MiB
    sha = write_random_file(origin.data_dir / "shared.safetensors", size, seed=3)
    cache = tmp_path / "cache"
    procs = [_cli(cache, "fetch", origin.url("slow/shared.safetensors"), "--folder", "checkpoints", "--json")
             for _ in range(8)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 8, [o[1] for o in outs]
    lines = [json.loads(o[0].strip().splitlines()[-1]) for o in outs]
    assert {ln["sha256"] for ln in lines} == {sha}
    assert sum(ln["bytes_downloaded"] for ln in lines) == size
    assert origin.bytes_served("/slow/shared.safetensors") == size


def test_hash_mismatch_keeps_older_copy(tmp_path: Path, origin: NginxOrigin) -> None:
    path = origin.data_dir / "v.safetensors"
    old_sha = write_random_file(path, 2 * MiB, seed=4)
    store = Store(tmp_path / "cache")
    svc = FetchService(store, options=TransferOptions(retry=FAST_RETRY))
    cached = svc.ensure(_spec(origin, "v.safetensors", sha256=old_sha))
    # The manifest moves to a new version, but the origin serves something else: corrupt/lying origin.
    write_random_file(path, 2 * MiB, seed=5)
    wanted = hashlib.sha256(b"the real new version").hexdigest()
    with pytest.raises(IntegrityError) as exc:
        svc.ensure(_spec(origin, "v.safetensors", sha256=wanted))
    assert "sha256 mismatch" in exc.value.reason and "v.safetensors" in str(exc.value)
    assert origin.requests("/v.safetensors") >= 3  # first fetch + two verified attempts
    assert hashlib.sha256(cached.read_bytes()).hexdigest() == old_sha
    assert store.lookup("checkpoints/v.safetensors").sha256 == old_sha
    assert not any(p.name.endswith(".part") for p in (tmp_path / "cache").rglob("*"))


def test_hash_mismatch_without_older_copy_leaves_nothing(tmp_path: Path, origin: NginxOrigin) -> None:
    write_random_file(origin.data_dir / "bad.safetensors", MiB, seed=6)
    svc = FetchService(Store(tmp_path / "cache"))
    with pytest.raises(IntegrityError):
        svc.ensure(_spec(origin, "bad.safetensors", sha256="0" * 64))
    assert not (tmp_path / "cache" / "checkpoints" / "bad.safetensors").exists()


def test_mirrors_404_then_next_source(tmp_path: Path, origin: NginxOrigin) -> None:
    sha = write_random_file(origin.data_dir / "mirror.bin", MiB, seed=7)
    spec = ModelSpec(folder="vae", filename="mirror.bin",
                     sources=(origin.url("missing/mirror.bin"), origin.url("mirror.bin")), sha256=sha)
    res = FetchService(Store(tmp_path / "cache")).fetch(spec)
    assert res.sha256 == sha and res.source.endswith("/mirror.bin")
    assert origin.requests("/missing/mirror.bin") == 1  # a 404 is not retried


def test_every_source_failing_names_them(tmp_path: Path, origin: NginxOrigin) -> None:
    spec = ModelSpec(folder="vae", filename="x.bin",
                     sources=(origin.url("s503/x.bin"), origin.url("nope/x.bin")))
    svc = FetchService(Store(tmp_path / "cache"), options=TransferOptions(retry=FAST_RETRY))
    with pytest.raises(TransferError) as exc:
        svc.ensure(spec)
    msg = str(exc.value)
    assert "vae/x.bin" in msg and "/s503/x.bin" in msg and "/nope/x.bin" in msg
    assert origin.requests("/s503/x.bin") >= 2  # 503 is retried


def test_unknown_key_without_source(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no source is known"):
        FetchService(Store(tmp_path / "cache")).ensure(ModelSpec(folder="loras", filename="a.safetensors"))


def test_file_source(tmp_path: Path) -> None:
    src = tmp_path / "volume" / "models" / "unet" / "u.safetensors"
    sha = write_random_file(src, 3 * MiB + 1, seed=8)
    spec = ModelSpec(folder="diffusion_models", filename="u.safetensors", sources=(src.as_uri(),))
    res = FetchService(Store(tmp_path / "cache")).fetch(spec)
    assert res.sha256 == sha and res.path.read_bytes() == src.read_bytes()


def test_hand_placed_file_is_adopted(tmp_path: Path, origin: NginxOrigin) -> None:
    cache = tmp_path / "cache"
    sha = write_random_file(cache / "loras" / "mine.safetensors", MiB, seed=9)
    res = FetchService(Store(cache)).fetch(_spec(origin, "mine.safetensors", folder="loras", sha256=sha))
    assert res.cached and res.sha256 == sha
    assert origin.requests("/mine.safetensors") == 0


def test_not_enough_space_fails_before_download(tmp_path: Path, origin: NginxOrigin) -> None:
    write_random_file(origin.data_dir / "small.bin", 2 * MiB, seed=10)
    write_random_file(origin.data_dir / "big.bin", 6 * MiB, seed=11)
    store = Store(tmp_path / "cache", max_size=5 * MiB)
    svc = FetchService(store)
    svc.ensure(_spec(origin, "small.bin", folder="vae", pin=True))
    with pytest.raises(NotEnoughSpace) as exc:
        svc.ensure(_spec(origin, "big.bin"))
    assert "checkpoints/big.bin" in str(exc.value)
    assert origin.bytes_served("/big.bin") == 0  # refused before any body byte
    assert store.lookup("vae/small.bin") is not None


def test_secret_never_printed(tmp_path: Path, origin: NginxOrigin) -> None:
    secret = "tok-SUPERSECRET-123"
    cache = tmp_path / "cache"
    p = _cli(cache, "fetch", origin.url(f"nope/x.bin?token={secret}"), "--folder", "vae")
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1
    assert secret not in out + err and "nope/x.bin" in out + err
    p = _cli(cache, "fetch", origin.url(f"s500/x.bin?api_key={secret}"), "--folder", "vae", "--json",
             env={"AUTOCLOUD_RETRIES": "2"})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 1 and secret not in out + err
    assert json.loads(out.strip().splitlines()[-1])["error"]


def test_auth_header_from_url_userinfo(tmp_path: Path, origin: NginxOrigin) -> None:
    write_random_file(origin.data_dir / "private.bin", MiB, seed=12)
    svc = FetchService(Store(tmp_path / "cache"),
                       options=TransferOptions(headers={"Authorization": AUTH_TOKEN}, retry=FAST_RETRY))
    res = svc.fetch(_spec(origin, "auth/private.bin"))
    assert res.size == MiB
    svc_noauth = FetchService(Store(tmp_path / "cache2"), options=TransferOptions(retry=FAST_RETRY))
    t0 = time.monotonic()
    with pytest.raises(TransferError) as exc:
        svc_noauth.ensure(_spec(origin, "auth/private.bin"))
    assert exc.value.status == 401 and time.monotonic() - t0 < 5
    assert "s3cr3t" not in str(exc.value)


def test_disk_full_refused_before_download_cached_files_intact(tmp_path: Path, origin: NginxOrigin) -> None:
    from mounts import tmpfs

    sha_small = write_random_file(origin.data_dir / "small.safetensors", 8 * MiB, seed=20)
    write_random_file(origin.data_dir / "huge.safetensors", 72 * MiB, seed=21)
    with tmpfs(tmp_path / "cache", "64m") as cache:
        store = Store(cache, min_free_disk=2 * MiB)  # no cap: only the real disk limits it
        svc = FetchService(store)
        small = svc.ensure(_spec(origin, "small.safetensors", folder="loras"))
        with pytest.raises(NotEnoughSpace) as exc:
            svc.ensure(_spec(origin, "huge.safetensors"))
        assert "checkpoints/huge.safetensors" in str(exc.value)
        assert origin.bytes_served("/huge.safetensors") == 0
        assert not (cache / "checkpoints" / "huge.safetensors").exists()
        assert hashlib.sha256(small.read_bytes()).hexdigest() == sha_small
        assert store.verify(fix=False).ok


def test_verbose_fetch_says_where_the_time_went(tmp_path: Path, origin: NginxOrigin) -> None:
    """`autocloud -v fetch` breaks the process's time down (start-up, probe, transfer, hash tail, fsync,
    rename, index) on stderr and in its JSON; without -v the JSON stays as it was."""
    want = write_random_file(origin.data_dir / "timed.bin", 3 * MiB, seed=77)
    cache = tmp_path / "cache"
    p = _cli(cache, "-v", "fetch", origin.url("timed.bin"), "--folder", "checkpoints", "--sha256", want, "--json")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert res["sha256"] == want and res["cached"] is False
    phases = res["phases"]
    assert {"probe", "reserve", "transfer", "hash_tail", "records", "fsync", "rename", "index"} <= set(phases)
    assert all(v >= 0 for v in phases.values())
    assert sum(phases.values()) <= res["seconds"] + 0.01  # steps of the fetch, inside its wall-clock time
    assert res["startup"] > 0
    line = next(ln for ln in err.splitlines() if ln.startswith("checkpoints/timed.bin: ") and " s = " in ln)
    for step in ("start-up", "probe", "transfer", "hash tail", "fsync", "rename", "index", "other"):
        assert f" {step} " in line, line
    p = _cli(cache, "fetch", origin.url("timed.bin"), "--folder", "checkpoints", "--json")
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 0 and "phases" not in json.loads(out.strip().splitlines()[-1])


def test_a_url_of_unknown_size_is_probed_once(tmp_path: Path, origin: NginxOrigin) -> None:
    """The size probe that makes room before the download is the download's probe too: one HEAD per fetch."""
    want = write_random_file(origin.data_dir / "once.bin", 5 * MiB, seed=78)
    with Store(tmp_path / "cache") as store:
        res = FetchService(store).fetch(_spec(origin, "once.bin", sha256=want))
    assert res.sha256 == want and not res.cached
    methods = [e.method for e in origin.entries("once.bin")]
    assert methods.count("HEAD") == 1 and "GET" in methods
