"""Zip bundles: five LoRAs in one real zip from nginx, verified, extracted atomically, hostile zips refused."""

from __future__ import annotations

import hashlib
import json
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from comfy_autocloud.errors import IntegrityError, ManifestError
from comfy_autocloud.fetch import FetchService
from comfy_autocloud.manifest import load_manifest, load_manifests
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.store import Store
from servers import NginxOrigin, nginx_running, safetensors_bytes

MiB = 2**20
pytestmark = pytest.mark.skipif(not NginxOrigin.available(), reason="nginx is not installed (./dev test installs it)")


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxOrigin]:
    base = tmp_path_factory.mktemp("bundle-origin")
    with nginx_running(base / "www", base / "nginx") as o:
        yield o


LORAS = {f"style/lora{i}.safetensors": safetensors_bytes(MiB + i * 1000, seed=i) for i in range(5)}


def _zip(path: Path, members: dict[str, bytes], *, method: int = zipfile.ZIP_DEFLATED,
         raw: list[zipfile.ZipInfo] | None = None) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns about the duplicate name we write on purpose
        with zipfile.ZipFile(path, "w", compression=method) as zf:
            for name, data in members.items():
                zf.writestr(name, data)
            for info in raw or []:
                zf.writestr(info, b"x" if not info.filename.endswith("link") else b"/etc/passwd")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _manifest(tmp_path: Path, origin: NginxOrigin, zip_name: str, zip_sha: str | None,
              bundle: dict[str, Any], name: str = "m.json") -> Path:
    entry: dict[str, Any] = {"url": origin.url(zip_name), "bundle": bundle}
    if zip_sha:
        entry["sha256"] = zip_sha
    path = tmp_path / name
    path.write_text(json.dumps({"loras": {zip_name: entry}}))
    return path


def _members_map() -> dict[str, str]:
    return {m: f"loras/{Path(m).name}" for m in LORAS}


def _get_bytes(origin: NginxOrigin, uri: str) -> int:
    return sum(e.body_bytes for e in origin.entries() if e.uri == uri and e.method == "GET")


def test_five_loras_in_one_download(tmp_path: Path, origin: NginxOrigin) -> None:
    zsha = _zip(origin.data_dir / "pack.zip", LORAS)
    specs = load_manifest(_manifest(tmp_path, origin, "pack.zip", zsha, _members_map()))
    assert sorted(s.key for s in specs) == sorted(f"loras/lora{i}.safetensors" for i in range(5))
    assert all(s.bundle is not None and s.bundle.name == "loras/pack.zip" for s in specs)

    store = Store(tmp_path / "cache")
    svc = FetchService(store)
    before = _get_bytes(origin, "/pack.zip")
    results = svc.fetch_many(specs, parallel=5)  # five loaders asking at once
    for spec, res in zip(specs, results, strict=True):
        assert not isinstance(res, Exception), res
        member = next(m for m in LORAS if m.endswith(spec.filename))
        assert res.path.read_bytes() == LORAS[member]
        assert res.sha256 == hashlib.sha256(LORAS[member]).hexdigest()
    zip_size = (origin.data_dir / "pack.zip").stat().st_size
    assert _get_bytes(origin, "/pack.zip") - before == zip_size  # the zip was downloaded exactly once
    assert sum(not r.cached for r in results if not isinstance(r, Exception)) == 1  # counted as one download
    assert not list((tmp_path / "cache").rglob("*.zip"))  # the zip itself is not kept
    assert not list(store.private.joinpath("partial").iterdir())
    assert svc.fetch(specs[0]).cached


def test_member_sha256_without_zip_sha(tmp_path: Path, origin: NginxOrigin) -> None:
    members = dict(list(LORAS.items())[:2])
    _zip(origin.data_dir / "two.zip", members, method=zipfile.ZIP_STORED)
    bundle = {m: {"to": f"loras/{Path(m).name}", "sha256": hashlib.sha256(d).hexdigest(), "size": len(d)}
              for m, d in members.items()}
    specs = load_manifest(_manifest(tmp_path, origin, "two.zip", None, bundle))
    store = Store(tmp_path / "cache")
    res = FetchService(store).fetch(specs[1])
    assert res.path.read_bytes() == members[list(members)[1]]
    assert store.lookup(specs[0].key) is not None  # the other member came along

    # A member whose bytes differ from the manifest: nothing of the bundle is committed.
    first = next(iter(members))
    bad = dict(bundle)
    bad[first] = {**bundle[first], "sha256": "0" * 64}
    specs = load_manifest(_manifest(tmp_path, origin, "two.zip", None, bad, name="bad.json"))
    store2 = Store(tmp_path / "cache2")
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        FetchService(store2).fetch(specs[1])
    assert store2.entries() == []
    assert not [p for p in (tmp_path / "cache2").rglob("*") if p.is_file() and ".autocloud" not in p.parts]
    assert not list(store2.private.joinpath("partial").iterdir())


def test_wrong_zip_sha256_is_refused(tmp_path: Path, origin: NginxOrigin) -> None:
    _zip(origin.data_dir / "pack2.zip", LORAS)
    specs = load_manifest(_manifest(tmp_path, origin, "pack2.zip", "a" * 64, _members_map()))
    store = Store(tmp_path / "cache")
    with pytest.raises(IntegrityError, match="sha256 mismatch"):
        FetchService(store).fetch(specs[0])
    assert store.entries() == []


def _symlink(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.external_attr = (0o120777 << 16)
    return info


HOSTILE = {
    "dot-dot": ({"../../evil.safetensors": b"evil"}, None),
    "absolute": ({"/tmp/abs.safetensors": b"evil"}, None),
    "backslash": ({"..\\evil.safetensors": b"evil"}, None),
    "symlink": ({}, [_symlink("loras/link")]),
    "duplicate": ({"style/lora0.safetensors": b"second copy"}, None),
    "bomb": ({"zeros.bin": bytes(64 * MiB)}, None),
    "missing member": ({}, None),
}


EXPECT = {"dot-dot": "'..' component", "absolute": "is absolute", "backslash": "backslash",
          "symlink": "symbolic link", "duplicate": "appears twice", "bomb": "zip bomb",
          "missing member": "not in the zip"}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_zips_are_refused(tmp_path: Path, origin: NginxOrigin, case: str) -> None:
    extra, raw = HOSTILE[case]
    good = {"style/lora0.safetensors": LORAS["style/lora0.safetensors"]}
    members = {**good, **extra} if case != "duplicate" else good
    name = f"hostile-{case.replace(' ', '-')}.zip"
    path = origin.data_dir / name
    if case == "duplicate":
        _zip(path, good)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with zipfile.ZipFile(path, "a") as zf:
                zf.writestr("style/lora0.safetensors", extra["style/lora0.safetensors"])
        zsha = hashlib.sha256(path.read_bytes()).hexdigest()
    else:
        zsha = _zip(path, members, raw=raw)
    bundle = {"style/lora0.safetensors": "loras/lora0.safetensors"}
    if case == "missing member":
        bundle["style/nope.safetensors"] = "loras/nope.safetensors"
    specs = load_manifest(_manifest(tmp_path, origin, name, zsha, bundle))
    cache = tmp_path / "cache"
    store = Store(cache)
    with pytest.raises(IntegrityError) as err:
        FetchService(store).fetch(specs[0])
    assert f"bundle loras/{name}" in str(err.value)
    assert EXPECT[case] in err.value.reason
    assert store.entries() == []
    assert not (tmp_path / "evil.safetensors").exists() and not Path("/tmp/abs.safetensors").exists()
    assert not [p for p in cache.rglob("*") if p.is_file() and ".autocloud" not in p.parts]
    assert not list(store.private.joinpath("partial").iterdir())


@pytest.mark.parametrize("entry, reason", [
    ({"url": "https://x/p.zip", "bundle": {"a.safetensors": "loras/a.safetensors"}}, "sha256 for every member"),
    ({"url": "https://x/p.zip", "sha256": "a" * 64, "bundle": {"../a.safetensors": "loras/a.safetensors"}},
     "zip member"),
    ({"url": "https://x/p.zip", "sha256": "a" * 64, "bundle": {"a.safetensors": "../a.safetensors"}}, "folder"),
    ({"url": "https://x/p.zip", "sha256": "a" * 64, "bundle": {"a": "loras/x", "b": "loras/x"}}, "twice"),
    ({"url": "https://x/p.zip", "sha256": "a" * 64, "bundle": {"a": {"to": "loras/x", "md5": "1"}}}, "unknown key"),
    ({"url": "https://x/p.zip", "sha256": "a" * 64, "bundle": {}}, "non-empty"),
])
def test_bundle_entries_are_validated_strictly(tmp_path: Path, entry: dict[str, Any], reason: str) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"loras": {"p.zip": entry}}))
    with pytest.raises(ManifestError, match=reason) as err:
        load_manifest(path)
    assert str(path) in str(err.value)


def test_bundle_member_never_merges_with_a_plain_entry(tmp_path: Path) -> None:
    (tmp_path / "a.json").write_text(json.dumps({"loras": {"p.zip": {
        "url": "https://x/p.zip", "sha256": "a" * 64, "bundle": {"a.safetensors": "loras/a.safetensors"}}}}))
    (tmp_path / "b.json").write_text(json.dumps({"loras": {"a.safetensors": "https://x/a.safetensors"}}))
    with pytest.raises(ManifestError, match="zip bundle"):
        load_manifests([tmp_path / "a.json", tmp_path / "b.json"])
    # A workflow naming the file (no source) merges fine and keeps the bundle.
    spec = ModelSpec(folder="loras", filename="a.safetensors")
    merged = load_manifests([tmp_path / "a.json"])[0]
    from comfy_autocloud.manifest.merge import merge_pair

    assert merge_pair(merged, spec).bundle is not None


def test_fleet_downloads_a_bundle_once_for_all_nodes(tmp_path: Path, origin: NginxOrigin) -> None:
    """Two nodes ask for members at once: one downloads the zip, the other takes the members from it."""
    from comfy_autocloud.fleet.client import Fleet, FleetConfig
    from comfy_autocloud.fleet.peer_server import PeerServer, PeerServerThread
    from redis_server import TOKEN, RedisServer, redis_running

    if not RedisServer.available():
        pytest.skip("redis-server is not installed (./dev test installs it)")
    zsha = _zip(origin.data_dir / "fleetpack.zip", LORAS)
    specs = load_manifest(_manifest(tmp_path, origin, "fleetpack.zip", zsha, _members_map()))
    before = _get_bytes(origin, "/fleetpack.zip")
    with redis_running(tmp_path / "redis") as redis:
        services, servers = [], []
        try:
            for name in ("a", "b"):
                store = Store(tmp_path / name)
                fleet = Fleet(FleetConfig(redis_url=redis.url, token=TOKEN, node_id=name, downloads_per_minute=None))
                srv = PeerServerThread(PeerServer(store, TOKEN, node_id=name)).start()
                fleet.registry.heartbeat(srv.url)
                servers.append(srv)
                services.append(FetchService(store, fleet=fleet))
            with ThreadPoolExecutor(2) as pool:  # each node asks for a different member at the same time
                futures = [pool.submit(svc.fetch, specs[i]) for i, svc in enumerate(services)]
                results = [f.result(timeout=120) for f in futures]
            for svc in services:  # and then every member is on both nodes
                for spec in specs:
                    res = svc.fetch(spec)
                    member = next(m for m in LORAS if m.endswith(spec.filename))
                    assert res.path.read_bytes() == LORAS[member]
            peer_bytes = sum(s.server.metrics.bytes_served["files"] for s in servers)
        finally:
            for srv in servers:
                srv.stop()
    zip_size = (origin.data_dir / "fleetpack.zip").stat().st_size
    assert _get_bytes(origin, "/fleetpack.zip") - before == zip_size  # once for the whole fleet
    sources = sorted(r.source for r in results)
    assert sources[0].startswith("http://") and sources[1].startswith("peer"), sources
    members = sum(len(d) for d in LORAS.values())  # every member crossed from node to node once
    assert members <= peer_bytes <= 1.1 * members  # (+ the tail of a request cut short by a steal, if any)
