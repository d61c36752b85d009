"""The ComfyUI adapter without ComfyUI: catalog, allowlist, prefetch planning, the Adapter's downloads
against a real Store/FetchService and nginx, the /autocloud routes on a real aiohttp server, metrics,
settings from ComfyUI's user directory, URL manifests, and the background disk prefetch."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfy_autocloud.comfy.catalog import Catalog, comfy_folder, merge_names
from comfy_autocloud.comfy.metrics import render_metrics
from comfy_autocloud.comfy.prompt_prefetch import host_allowed, plan_prefetch, workflow_hints
from comfy_autocloud.comfy.runtime import MANIFEST_FOLDER, Adapter, ModelUnavailable
from comfy_autocloud.comfy.settings import load_comfy_settings
from comfy_autocloud.config import load_settings
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.prefetch.popularity import Popularity, plan_popular
from comfy_autocloud.store import Store
from comfy_autocloud.transfer.ranges import PartState, state_path
from comfy_env import TimedNginx, limited_origin, serve_adapter_routes

MiB = 2**20


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TimedNginx]:
    yield from limited_origin(tmp_path_factory, "adapter-origin")


def _settings(tmp_path: Path, **values: Any):
    env = {"AUTOCLOUD_CACHE": str(tmp_path / "cache"), "AUTOCLOUD_ALLOWED_HOSTS": "127.0.0.1"}
    env.update({f"AUTOCLOUD_{k.upper()}": str(v) for k, v in values.items()})
    return load_settings(env=env)


def _adapter(tmp_path: Path, specs: list[ModelSpec], **values: Any) -> Adapter:
    a = Adapter.create(_settings(tmp_path, **values))
    a.catalog.add(specs)
    return a


def _spec(folder: str, name: str, url: str, sha: str | None = None) -> ModelSpec:
    return ModelSpec(folder=folder, filename=name, sources=(url,), sha256=sha, defined_in="test")


def _api_prompt(*loaders: tuple[str, str, str]) -> dict[str, Any]:
    return {"prompt": {str(i): {"class_type": c, "inputs": {inp: v}} for i, (c, inp, v) in enumerate(loaders)}}


# ------------------------------------------------------------------ pure functions

def test_catalog_maps_legacy_folders_and_merges_lists() -> None:
    cat = Catalog([ModelSpec(folder="clip", filename="t5.safetensors", sources=("https://h/t5",)),
                   ModelSpec(folder="checkpoints", filename="sd/a.safetensors", sources=("https://h/a",)),
                   ModelSpec(folder="checkpoints", filename="notes.txt", sources=("https://h/n",))])
    assert comfy_folder("unet") == "diffusion_models"
    assert cat.lookup("text_encoders", "t5.safetensors").key == "clip/t5.safetensors"
    assert cat.lookup("clip", "t5.safetensors") is not None
    assert cat.lookup("checkpoints", "sd\\a.safetensors") is not None  # Windows front ends send backslashes
    assert cat.names("checkpoints") == ["notes.txt", "sd/a.safetensors"]
    exts = {".safetensors", ".ckpt"}
    assert merge_names(["b.ckpt", "sd/a.safetensors"], cat.names("checkpoints"), exts) == ["b.ckpt",
                                                                                           "sd/a.safetensors"]
    assert merge_names([], ["x.yaml"], set()) == ["x.yaml"]  # empty set: every extension (ComfyUI's rule)


def test_catalog_keeps_the_manifest_when_a_workflow_contradicts_it() -> None:
    sha = "a" * 64
    cat = Catalog([ModelSpec(folder="loras", filename="x.safetensors", sources=("https://m/x",), sha256=sha)])
    cat.add([ModelSpec(folder="loras", filename="x.safetensors", sources=("https://evil/x",), sha256="b" * 64)])
    assert cat.lookup("loras", "x.safetensors").sources == ("https://m/x",)
    cat.add([ModelSpec(folder="loras", filename="x.safetensors", sources=("https://mirror/x",), sha256=sha)])
    assert cat.lookup("loras", "x.safetensors").sources == ("https://m/x", "https://mirror/x")


@pytest.mark.parametrize(("url", "ok"), [
    ("https://huggingface.co/a/b/resolve/main/x.safetensors", True),
    ("https://cdn-lfs.huggingface.co/x", True),
    ("https://HUGGINGFACE.CO:443/x", True),
    ("https://huggingface.co.evil.com/x", False),
    ("https://evilhuggingface.co/x", False),
    ("http://127.0.0.1:8080/x", False),
    ("ftp://huggingface.co/x", False),
    ("file:///etc/passwd", False),
    ("https://user:pw@civitai.com/api/download/1", True),
])
def test_allowlist(url: str, ok: bool) -> None:
    assert host_allowed(url, ("huggingface.co", "civitai.com")) is ok
    assert host_allowed("https://anything.example/x", ("*",))


def test_prefetch_plan_uses_only_api_loaders_and_allowlisted_hints() -> None:
    cat = Catalog([ModelSpec(folder="checkpoints", filename="base.safetensors", sources=("https://m/base",)),
                   ModelSpec(folder="vae", filename="v.safetensors", sources=("https://m/v",))])
    present = {("vae", "v.safetensors")}
    data = _api_prompt(("CheckpointLoaderSimple", "ckpt_name", "base.safetensors"),
                       ("VAELoader", "vae_name", "v.safetensors"),
                       ("LoraLoader", "lora_name", "style.safetensors"),
                       ("UpscaleModelLoader", "model_name", "up.pth"),
                       ("ControlNetLoader", "control_net_name", "cn.safetensors"),
                       ("VAELoader", "vae_name", "taesd"))
    data["extra_data"] = {"extra_pnginfo": {"workflow": {"nodes": [], "models": [
        {"name": "style.safetensors", "directory": "loras", "url": "https://huggingface.co/o/r/resolve/main/s"},
        {"name": "up.pth", "directory": "upscale_models", "url": "https://evil.example/up.pth?token=SECRET"},
        {"name": "unused.safetensors", "directory": "loras", "url": "https://huggingface.co/o/r/unused"},
    ]}}}
    plan = plan_prefetch(data, cat, lambda f, n: (f, n) in present, ["huggingface.co"])
    assert [s.key for s in plan.fetch] == ["checkpoints/base.safetensors", "loras/style.safetensors"]
    assert plan.present == ["vae/v.safetensors"]
    assert sorted(plan.unknown) == ["controlnet/cn.safetensors", "upscale_models/up.pth"]
    assert len(plan.refused) == 1 and "SECRET" not in plan.refused[0]
    assert cat.lookup("loras", "unused.safetensors") is not None  # a hint is a source, not a download
    # a prompt ComfyUI will reject is not our business: nothing planned, nothing raised
    assert plan_prefetch({"prompt": {"1": {"class_type": 3}}}, cat, lambda f, n: False, ["*"]).fetch == []
    assert plan_prefetch({"no": "prompt"}, cat, lambda f, n: False, ["*"]).fetch == []
    assert workflow_hints({"extra_data": {"extra_pnginfo": {"workflow": {"models": "bad"}}}}, ["*"]) == ([], [])


def test_metrics_text_format() -> None:
    status = {"bytes": 3 * MiB, "cap": None, "entries": 2, "pinned": 1, "reserved_bytes": 0, "disk_free": 10,
              "downloads": [{}], "catalog_entries": 5,
              "counters": {"hits": 4, "misses": 2, "downloads": 2, "bytes_downloaded": 3 * MiB,
                           "download_seconds": 1.5, "errors": 1}}
    text = render_metrics(status)
    samples = {}
    for line in text.splitlines():
        if not line.startswith("#"):
            name, value = line.split(" ")
            samples[name] = float(value)
    assert samples["autocloud_cache_bytes"] == 3 * MiB
    assert samples["autocloud_cache_hits_total"] == 4
    assert samples["autocloud_download_seconds_total"] == 1.5
    assert samples["autocloud_downloads_in_flight"] == 1
    assert "autocloud_cache_cap_bytes" not in samples  # no cap: left out rather than a fake number
    for name in samples:
        assert f"# TYPE {name} " in text and f"# HELP {name} " in text


def test_settings_from_comfy_user_directory(tmp_path: Path) -> None:
    user = tmp_path / "user"
    user.mkdir()
    (user / "autocloud.yaml").write_text(
        "manifest: [lists/base.json, /abs/other.json, https://example.com/m.json]\n"
        "max_size: 200G\nallowed_hosts: [huggingface.co, cdn.example.com]\n"
        "prefetch_background: true\nprefetch_rate: 10M\n")
    env = {"AUTOCLOUD_CONFIG": str(tmp_path / "none.yaml"), "AUTOCLOUD_MAX_SIZE": "100G"}
    s = load_comfy_settings(user, env=env)
    assert s.manifest == (str(user / "lists/base.json"), "/abs/other.json", "https://example.com/m.json")
    assert s.max_size == 100 * 2**30 and s.origins["max_size"] == "env AUTOCLOUD_MAX_SIZE"
    assert s.allowed_hosts == ("huggingface.co", "cdn.example.com")
    assert s.prefetch_background is True and s.prefetch_rate == 10 * MiB
    assert s.origins["prefetch_background"] == str(user / "autocloud.yaml")
    (user / "autocloud.yaml").write_text("prefetch: maybe\n")
    with pytest.raises(Exception, match="prefetch"):
        load_comfy_settings(user, env=env)
    (user / "autocloud.yaml").write_text("cache: /x\n")
    with pytest.raises(Exception, match="unknown setting"):
        load_comfy_settings(user, env=env)


# ------------------------------------------------------------------ Adapter against nginx

def test_prefetch_downloads_in_parallel_and_loader_joins_it(origin: TimedNginx, tmp_path: Path,
                                                            random_file) -> None:
    names = [f"pf{i}.safetensors" for i in range(3)]
    for i, n in enumerate(names):
        random_file(origin.data_dir / n, 3 * MiB, seed=100 + i)
    specs = [_spec("loras", n, origin.url(f"/slow/{n}")) for n in names]
    a = _adapter(tmp_path, specs, connections=1)
    try:
        plan = a.prefetch(_api_prompt(*[("LoraLoader", "lora_name", n) for n in names]))
        assert [s.key for s in plan.fetch] == [s.key for s in specs]
        time.sleep(0.3)
        busy = a.status()["downloads"]
        assert {d["key"] for d in busy} == {s.key for s in specs} and {d["reason"] for d in busy} == {"prefetch"}
        seen: list[tuple[int, int]] = []
        path = a.resolve_missing("loras", names[0], lambda done, total: seen.append((done, total)))
        assert path is not None and path.stat().st_size == 3 * MiB
        assert seen and seen[-1][1] == 3 * MiB  # the loader saw the prefetch's progress
        for n in names[1:]:
            assert a.resolve_missing("loras", n) is not None
        spans = [origin.span(f"/slow/{n}") for n in names]
        assert max(s for s, _ in spans) < min(e for _, e in spans), f"downloads did not overlap: {spans}"
        for n in names:
            assert sum(e.body_bytes for e in origin.entries(f"/slow/{n}") if e.method == "GET") == 3 * MiB
        st = a.status()
        assert st["counters"]["misses"] == 3 and st["counters"]["downloads"] == 3
        assert {r["key"] for r in st["recent"]} == {s.key for s in specs}
        # a second prompt with the same models: nothing to fetch
        assert a.prefetch(_api_prompt(*[("LoraLoader", "lora_name", n) for n in names])).fetch == []
    finally:
        a.close()


def test_rate_limit_is_shared_by_parallel_downloads(origin: TimedNginx, tmp_path: Path, random_file) -> None:
    """AUTOCLOUD_RATE_LIMIT is process-wide: two downloads at once share it (not one bucket each)."""
    names = [f"rl{i}.safetensors" for i in range(2)]
    for i, n in enumerate(names):
        random_file(origin.data_dir / n, 3 * MiB, seed=300 + i)
    specs = [_spec("loras", n, origin.url(n)) for n in names]  # unthrottled origin: only our limit applies
    a = _adapter(tmp_path, specs, rate_limit="2M")
    try:
        t0 = time.monotonic()
        futures = [a.submit(s, "prefetch") for s in specs]
        time.sleep(0.3)
        assert {d["key"] for d in a.status()["downloads"]} == {s.key for s in specs}  # both at once
        for f in futures:
            assert f.result(timeout=60).size == 3 * MiB
        took = time.monotonic() - t0
        # 6 MiB at 2 MiB/s together take ~3 s; one bucket per download would take ~1.5 s (2x the limit).
        assert took >= 2.3, f"6 MiB in {took:.2f}s: {6 / took:.1f} MiB/s together, over the 2 MiB/s limit"
    finally:
        a.close()


def test_corrupt_origin_is_a_clear_error_and_not_refetched_at_once(origin: TimedNginx, tmp_path: Path,
                                                                   random_file) -> None:
    random_file(origin.data_dir / "bad.safetensors", 1 * MiB, seed=7)
    spec = _spec("checkpoints", "bad.safetensors", origin.url("bad.safetensors"), sha="0" * 64)
    a = _adapter(tmp_path, [spec])
    try:
        with pytest.raises(ModelUnavailable, match=r"checkpoints/bad.safetensors: .*sha256 mismatch"):
            a.resolve_missing("checkpoints", "bad.safetensors")
        served = len(origin.entries("bad.safetensors"))
        with pytest.raises(ModelUnavailable, match="IntegrityError"):
            a.resolve_missing("checkpoints", "bad.safetensors")  # the prefetch's error, reused for its loader
        assert len(origin.entries("bad.safetensors")) == served
        assert not (tmp_path / "cache" / "checkpoints" / "bad.safetensors").exists()
        st = a.status()
        assert st["counters"]["errors"] == 1 and "sha256 mismatch" in st["recent"][0]["error"]
        assert a.resolve_missing("checkpoints", "unknown.safetensors") is None
    finally:
        a.close()


def test_url_manifest_is_fetched_into_the_cache_and_survives_an_outage(tmp_path: Path, random_file) -> None:
    www = tmp_path / "www"
    random_file(www / "m.safetensors", 64 * 1024, seed=3)
    (www / "models.json").parent.mkdir(parents=True, exist_ok=True)
    with TimedNginx(www, tmp_path / "nginx") as o:
        (www / "models.json").write_text(json.dumps({"checkpoints": {"m.safetensors": o.url("m.safetensors")}}))
        s = _settings(tmp_path, manifest=o.url("models.json"))
        a = Adapter.create(s)
        assert a.catalog.lookup("checkpoints", "m.safetensors") is not None
        first = [e.key for e in a.store.entries() if e.key.startswith(MANIFEST_FOLDER + "/")]
        assert len(first) == 1
        a.close()
        time.sleep(1.1)  # a new Last-Modified second
        (www / "models.json").write_text(json.dumps({"checkpoints": {"m.safetensors": o.url("m.safetensors"),
                                                                     "n.safetensors": o.url("n.safetensors")}}))
        a = Adapter.create(s)
        assert a.catalog.lookup("checkpoints", "n.safetensors") is not None
        second = [e.key for e in a.store.entries() if e.key.startswith(MANIFEST_FOLDER + "/")]
        assert len(second) == 1 and second != first  # the new version replaced the old one
        a.close()
    a = Adapter.create(s)  # origin gone: the cached copy serves
    try:
        assert a.manifest_error is None and a.catalog.lookup("checkpoints", "n.safetensors") is not None
        assert all(not x["key"].startswith(MANIFEST_FOLDER) for x in a.status()["available"])
    finally:
        a.close()
    bad = Adapter.create(_settings(tmp_path / "b", manifest=str(tmp_path / "missing.json")))
    try:
        assert "missing.json" in (bad.manifest_error or "")  # reported, ComfyUI still starts
    finally:
        bad.close()


# ------------------------------------------------------------------ routes on a real aiohttp server

def test_routes_status_fetch_pin_evict_metrics(origin: TimedNginx, tmp_path: Path, random_file) -> None:
    random_file(origin.data_dir / "r.safetensors", 2 * MiB, seed=11)
    random_file(origin.data_dir / "u.safetensors", 1 * MiB, seed=12)
    a = _adapter(tmp_path, [_spec("checkpoints", "r.safetensors", origin.url("r.safetensors"))], max_size="1G")

    async def body(http: aiohttp.ClientSession) -> None:
        async def call(method: str, path: str, payload: Any = None) -> tuple[int, Any]:
            async with http.request(method, path, json=payload) as r:
                ctype = r.headers.get("Content-Type", "")
                return r.status, await (r.json() if "json" in ctype else r.text())

        status, st = await call("GET", "/autocloud/status")
        assert status == 200 and st["entries"] == 0 and st["cap"] == 2**30
        assert [x["key"] for x in st["available"]] == ["checkpoints/r.safetensors"]
        assert (await call("POST", "/autocloud/fetch", {"key": "checkpoints/r.safetensors"}))[0] == 202
        for _ in range(100):
            st = (await call("GET", "/autocloud/status"))[1]
            if st["entries"] == 1 and not st["downloads"]:
                break
            await asyncio.sleep(0.05)
        assert st["files"][0]["key"] == "checkpoints/r.safetensors" and st["bytes"] == 2 * MiB
        url_req = {"url": origin.url("u.safetensors"), "folder": "loras", "name": "mine.safetensors"}
        assert (await call("POST", "/autocloud/fetch", url_req))[1]["key"] == "loras/mine.safetensors"
        assert (await call("POST", "/autocloud/pin", {"key": "checkpoints/r.safetensors"}))[0] == 200
        status, err = await call("POST", "/autocloud/evict", {"key": "checkpoints/r.safetensors"})
        assert status == 409 and "pinned" in err["error"]
        await call("POST", "/autocloud/pin", {"key": "checkpoints/r.safetensors", "pinned": False})
        status, out = await call("POST", "/autocloud/evict", {"key": "checkpoints/r.safetensors"})
        assert status == 200 and out["evicted"]["size"] == 2 * MiB
        assert (await call("POST", "/autocloud/evict", {"key": "checkpoints/r.safetensors"}))[0] == 404
        for bad in ({"key": "../etc/passwd"}, {"key": "loras/nope.safetensors"}, {"url": "https://evil.example/x",
                                                                                    "folder": "loras"}, {}):
            status, err = await call("POST", "/autocloud/fetch", bad)
            assert status == 400 and err["error"], bad
        async with http.post("/autocloud/pin", data=b"not json") as r:
            assert r.status == 400
        for _ in range(100):
            if not (await call("GET", "/autocloud/status"))[1]["downloads"]:
                break
            await asyncio.sleep(0.05)
        status, text = await call("GET", "/autocloud/metrics")
        assert status == 200 and "autocloud_downloads_total 2" in text
        assert "autocloud_cache_cap_bytes 1073741824" in text

    try:
        serve_adapter_routes(a, body)
    finally:
        a.close()



def test_cancel_route_stops_a_download_and_keeps_its_partial(origin: TimedNginx, tmp_path: Path,
                                                             random_file) -> None:
    random_file(origin.data_dir / "c.safetensors", 6 * MiB, seed=13)
    spec = _spec("checkpoints", "c.safetensors", origin.url("/slow/c.safetensors"))
    a = _adapter(tmp_path, [spec], connections=1)

    async def body(http: aiohttp.ClientSession) -> None:
        async def call(method: str, path: str, payload: Any = None) -> tuple[int, Any]:
            async with http.request(method, path, json=payload) as r:
                return r.status, await r.json()

        assert (await call("POST", "/autocloud/cancel", {"key": spec.key}))[0] == 404  # nothing running
        assert (await call("POST", "/autocloud/fetch", {"key": spec.key}))[0] == 202
        for _ in range(200):
            downloads = (await call("GET", "/autocloud/status"))[1]["downloads"]
            if downloads and downloads[0].get("bytes_done", 0) >= MiB:
                break
            await asyncio.sleep(0.05)
        status, out = await call("POST", "/autocloud/cancel", {"key": spec.key})
        assert status == 200 and out == {"key": spec.key, "cancelled": True}
        for _ in range(100):
            if not (await call("GET", "/autocloud/status"))[1]["downloads"]:
                break
            await asyncio.sleep(0.05)
        assert not (await call("GET", "/autocloud/status"))[1]["downloads"]

    try:
        serve_adapter_routes(a, body)
        assert not (tmp_path / "cache" / "checkpoints" / "c.safetensors").exists()
        state = PartState.load(state_path(a.store.partial_path(spec.key)))
        kept = state.done_bytes() if state else 0
        assert kept >= MiB  # the partial file and its record are kept for resuming
        before = -1
        for _ in range(50):  # nginx logs the cancelled request when it notices the closed connection
            if before == (before := len(origin.entries("/slow/c.safetensors"))):
                break
            time.sleep(0.1)
        # asked for again at once (a cancel is not remembered as a failure) and resumed, not restarted
        path = a.resolve_missing("checkpoints", "c.safetensors")
        assert path is not None and path.stat().st_size == 6 * MiB
        again = sum(e.body_bytes for e in origin.entries("/slow/c.safetensors")[before:] if e.method == "GET")
        assert again <= 6 * MiB - kept + MiB, (again, kept)
    finally:
        a.close()


def test_interrupting_the_waiting_loader_cancels_its_download(origin: TimedNginx, tmp_path: Path,
                                                              random_file) -> None:
    """ComfyUI's ProgressBar raises on interrupt: the loader stops waiting and the download stops too."""
    random_file(origin.data_dir / "i.safetensors", 6 * MiB, seed=14)
    spec = _spec("checkpoints", "i.safetensors", origin.url("/slow/i.safetensors"))
    a = _adapter(tmp_path, [spec], connections=1)

    class Interrupted(Exception):
        pass

    def progress(done: int, total: int) -> None:
        if done >= MiB:
            raise Interrupted("user pressed cancel")

    try:
        with pytest.raises(Interrupted):
            a.resolve_missing("checkpoints", "i.safetensors", progress)
        deadline = time.monotonic() + 10
        while a.status()["downloads"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not a.status()["downloads"], "the download kept running after the interrupt"
        assert not (tmp_path / "cache" / "checkpoints" / "i.safetensors").exists()
        state = PartState.load(state_path(a.store.partial_path(spec.key)))
        assert state is not None and state.done_bytes() >= MiB  # kept for resuming
        path = a.resolve_missing("checkpoints", "i.safetensors")  # the next prompt resumes it
        assert path is not None and path.stat().st_size == 6 * MiB
    finally:
        a.close()

# ------------------------------------------------------------------ background disk prefetch (popular models)

def test_plan_popular_pinned_first_then_most_used_within_budget(tmp_path: Path) -> None:
    def s(name: str, size: int, pin: bool = False) -> ModelSpec:
        return ModelSpec(folder="checkpoints", filename=name, sources=(f"https://h/{name}",), size=size, pin=pin)

    specs = [s("pinned", 30, pin=True), s("hot", 40), s("warm", 20), s("cold", 10), s("huge", 500)]
    hist = {"checkpoints/hot": Popularity(9, 40), "checkpoints/warm": Popularity(5, 20),
            "checkpoints/huge": Popularity(50, 500)}
    plan = plan_popular(specs, [], hist, cap=100, top=10)
    assert [p.filename for p in plan] == ["pinned", "hot"]  # 30 + 40 + 20 > 0.8 * 100; huge never fits
    assert [p.filename for p in plan_popular(specs, [], hist, cap=None, top=2)] == ["pinned", "huge", "hot"]


def test_preloader_rate_limited_and_yields_to_on_demand(origin: TimedNginx, tmp_path: Path, random_file) -> None:
    random_file(origin.data_dir / "pop.safetensors", 4 * MiB, seed=21)
    random_file(origin.data_dir / "need.safetensors", 1 * MiB, seed=22)
    pop = ModelSpec(folder="checkpoints", filename="pop.safetensors", sources=(origin.url("pop.safetensors"),),
                    pin=True)
    need = _spec("loras", "need.safetensors", origin.url("need.safetensors"))
    a = _adapter(tmp_path, [pop, need], prefetch_rate="2M")  # 4 MiB take ~2 s: long enough to interrupt
    from comfy_autocloud.comfy.background_prefetch import prefetcher_for

    pre = prefetcher_for(a)
    pre.poll = 0.05
    try:
        t0 = time.monotonic()
        th = threading.Thread(target=pre.run_once)
        th.start()
        time.sleep(0.5)
        assert [d["reason"] for d in a.status()["downloads"]] == ["background"]
        t1 = time.monotonic()
        assert a.resolve_missing("loras", "need.safetensors") is not None
        on_demand = time.monotonic() - t1
        th.join(30)
        took = time.monotonic() - t0
        assert pre.yielded >= 1, "the preload did not step aside"
        assert on_demand < 1.0, f"on-demand fetch took {on_demand:.2f}s behind a preload"
        assert took >= 1.5, f"4 MiB at 2 MiB/s finished in {took:.2f}s: not rate limited"
        e = a.store.lookup("checkpoints/pop.safetensors")
        assert e is not None and e.pinned
        assert pre.run_once() == []  # already present
        assert (Store(tmp_path / "cache").private / "popularity.json").is_file()
    finally:
        pre.stop()
        a.close()
