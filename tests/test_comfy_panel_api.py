"""What the browser panel relies on, without ComfyUI: catalog origins, POST /autocloud/workflow (a loaded
workflow's models and its allowlisted hints), failed workflow/URL entries dropped from the lists, dismiss,
a cancel reported as cancelled with its kept bytes (not as a failure), one row per model, GET
/autocloud/doctor."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfy_autocloud.comfy.catalog import Catalog
from comfy_autocloud.comfy.runtime import Adapter, ModelUnavailable
from comfy_autocloud.config import load_settings
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_env import TimedNginx, limited_origin, serve_adapter_routes

MiB = 2**20


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TimedNginx]:
    yield from limited_origin(tmp_path_factory, "panel-origin")


def _spec(folder: str, name: str, url: str) -> ModelSpec:
    return ModelSpec(folder=folder, filename=name, sources=(url,), defined_in="test")


def _adapter(tmp_path: Path, specs: list[ModelSpec] = (), present: set[tuple[str, str]] = frozenset(),
             **env: str) -> Adapter:
    settings = load_settings(env={"AUTOCLOUD_CACHE": str(tmp_path / "cache"), "AUTOCLOUD_ALLOWED_HOSTS": "127.0.0.1",
                                  **env})
    a = Adapter.create(settings, is_present=lambda f, n: (f, n) in present)
    a.catalog.add(list(specs))
    return a


async def _call(http: aiohttp.ClientSession, method: str, path: str, payload: Any = None) -> tuple[int, Any]:
    async with http.request(method, path, json=payload) as r:
        return r.status, await r.json()


def test_catalog_remembers_origins_through_a_manifest_reload() -> None:
    cat = Catalog([_spec("loras", "m.safetensors", "https://m/m")])
    cat.add([_spec("vae", "w.safetensors", "https://w/w")], "workflow")
    cat.add([_spec("loras", "m.safetensors", "https://w/m2")], "workflow")  # contradicts: ignored
    assert cat.origin("loras", "m.safetensors") == "manifest" and cat.origin("vae", "w.safetensors") == "workflow"
    cat.replace([_spec("loras", "n.safetensors", "https://m/n"), _spec("vae", "w.safetensors", "https://m/w")])
    assert cat.lookup("loras", "m.safetensors") is None  # left the manifest
    assert cat.origin("vae", "w.safetensors") == "manifest"  # now the manifest defines it
    assert cat.lookup("vae", "w.safetensors").sources == ("https://m/w",)  # an unproven other URL: manifest wins
    assert not cat.remove("vae", "w.safetensors")  # manifest entries are never dropped
    cat.add([_spec("clip", "t.safetensors", "https://r/t")], "request")
    assert cat.origin("text_encoders", "t.safetensors") == "request" and cat.remove("text_encoders", "t.safetensors")
    assert cat.lookup("text_encoders", "t.safetensors") is None


def test_workflow_hints_are_listed_only_for_the_prompt_that_names_them() -> None:
    cat = Catalog([_spec("vae", "m.safetensors", "https://m/m")])
    hint = cat.add([_spec("vae", "h.safetensors", "https://w/h")], "workflow")
    assert cat.names("vae") == ["m.safetensors"]  # opening a workflow does not grow everyone's lists
    cat.show(hint, seconds=0.3)  # a queued prompt names it: its validation finds it
    assert cat.names("vae") == ["h.safetensors", "m.safetensors"]
    time.sleep(0.4)
    assert cat.names("vae") == ["m.safetensors"]
    assert cat.lookup("vae", "h.safetensors") is not None  # still resolvable when its loader runs
    cat.replace([_spec("vae", "m.safetensors", "https://m/m"), _spec("vae", "h.safetensors", "https://w/h")])
    assert cat.names("vae") == ["h.safetensors", "m.safetensors"]  # now the manifest offers it to everyone


def test_workflow_check_reports_each_model_and_takes_allowed_hints(origin: TimedNginx, tmp_path: Path,
                                                                   random_file) -> None:
    random_file(origin.data_dir / "cached.safetensors", 64 * 1024, seed=1)
    manifest = _spec("checkpoints", "cached.safetensors", origin.url("cached.safetensors"))
    later = _spec("loras", "later.safetensors", origin.url("later.safetensors"))
    a = _adapter(tmp_path, [manifest, later], present={("vae", "local.safetensors")})
    a.resolve_missing("checkpoints", "cached.safetensors")
    workflow = {
        "models": [{"name": "hinted.safetensors", "url": origin.url("hinted.safetensors"), "directory": "clip"},
                   {"name": "far.safetensors", "url": "https://example.invalid/far.safetensors?token=s3cretTok",
                    "directory": "loras"}],
        "nodes": [{"id": 1, "type": "CheckpointLoaderSimple", "widgets_values": ["cached.safetensors"]},
                  {"id": 2, "type": "LoraLoader", "widgets_values": ["later.safetensors", 1, 1]},
                  {"id": 3, "type": "VAELoader", "widgets_values": ["local.safetensors"]},
                  {"id": 4, "type": "UNETLoader", "widgets_values": ["nobody.safetensors", "default"]}],
    }
    try:
        async def body(http: aiohttp.ClientSession) -> Any:
            ok = await _call(http, "POST", "/autocloud/workflow", {"workflow": workflow})
            bad = await _call(http, "POST", "/autocloud/workflow", {"workflow": {"nodes": "no"}})
            return ok, bad

        (status, out), (bad_status, bad) = serve_adapter_routes(a, body)
        assert status == 200
        rows = {m["key"]: m for m in out["models"]}
        assert {k: m["status"] for k, m in rows.items()} == {
            "text_encoders/hinted.safetensors": "available", "loras/far.safetensors": "refused",
            "checkpoints/cached.safetensors": "cached", "loras/later.safetensors": "available",
            "vae/local.safetensors": "on_disk", "diffusion_models/nobody.safetensors": "missing"}
        hinted = rows["text_encoders/hinted.safetensors"]
        assert hinted["origin"] == "workflow" and hinted["directories"] == ["text_encoders", "clip"]
        assert rows["loras/later.safetensors"]["origin"] == "manifest"
        far = rows["loras/far.safetensors"]["reason"]
        assert "AUTOCLOUD_ALLOWED_HOSTS (127.0.0.1)" in far and "s3cretTok" not in far
        assert a.catalog.origin("text_encoders", "hinted.safetensors") == "workflow"  # Run will find it
        assert a.catalog.lookup("loras", "far.safetensors") is None
        assert bad_status == 400 and "request.workflow" in bad["error"]
        avail = {x["key"]: x["origin"] for x in a.status()["available"]}
        assert avail == {"text_encoders/hinted.safetensors": "workflow", "loras/later.safetensors": "manifest"}
    finally:
        a.close()


def test_failed_url_or_hint_leaves_the_lists_but_a_manifest_entry_stays(origin: TimedNginx, tmp_path: Path) -> None:
    manifest = _spec("loras", "m404.safetensors", origin.url("m404.safetensors"))
    a = _adapter(tmp_path, [manifest])
    changed: list[str] = []
    a.on_commit(changed.append)
    try:
        async def body(http: aiohttp.ClientSession) -> Any:
            status, out = await _call(http, "POST", "/autocloud/fetch",
                                      {"url": origin.url("u404.safetensors"), "folder": "loras"})
            assert status == 202 and out["key"] == "loras/u404.safetensors"
            assert a.catalog.origin("loras", "u404.safetensors") == "request"
            for _ in range(200):
                if not (await _call(http, "GET", "/autocloud/status"))[1]["downloads"]:
                    break
                await asyncio.sleep(0.05)
            return (await _call(http, "GET", "/autocloud/status"))[1]

        st = serve_adapter_routes(a, body)
        failed = {r["key"]: r for r in st["recent"]}["loras/u404.safetensors"]
        assert "HTTP 404" in failed["error"] and failed["phase"] == "error" and failed["cancelled"] is False
        assert failed["origin"] is None  # no longer offered: the panel shows no retry for it
        assert a.catalog.lookup("loras", "u404.safetensors") is None and "loras/u404.safetensors" in changed
        assert [x["key"] for x in st["available"]] == ["loras/m404.safetensors"]
        with pytest.raises(ModelUnavailable):
            a.resolve_missing("loras", "m404.safetensors")
        assert a.catalog.origin("loras", "m404.safetensors") == "manifest"  # the operator's entry stays

        async def dismiss(http: aiohttp.ClientSession) -> Any:
            out = await _call(http, "POST", "/autocloud/dismiss", {"key": "loras/u404.safetensors"})
            again = await _call(http, "POST", "/autocloud/dismiss", {"key": "loras/u404.safetensors"})
            return out, again, (await _call(http, "GET", "/autocloud/status"))[1]

        out, again, st = serve_adapter_routes(a, dismiss)
        assert out == (200, {"key": "loras/u404.safetensors", "dismissed": True})
        assert again[1]["dismissed"] is False
        assert [r["key"] for r in st["recent"]] == ["loras/m404.safetensors"]
    finally:
        a.close()


def test_cancel_is_reported_as_cancelled_with_kept_bytes_and_one_row_per_model(origin: TimedNginx, tmp_path: Path,
                                                                               random_file) -> None:
    random_file(origin.data_dir / "c.safetensors", 6 * MiB, seed=13)
    spec = _spec("checkpoints", "c.safetensors", origin.url("/slow/c.safetensors"))
    a = _adapter(tmp_path, [spec], AUTOCLOUD_CONNECTIONS="1")
    seen: list[dict[str, Any]] = []
    lock = threading.Lock()

    def listen(d: dict[str, Any]) -> None:
        with lock:
            seen.append(d)

    a.tracker.add_listener(listen)
    try:
        async def body(http: aiohttp.ClientSession) -> Any:
            assert (await _call(http, "POST", "/autocloud/fetch", {"key": spec.key}))[0] == 202
            st: dict[str, Any] = {}
            for _ in range(200):
                st = (await _call(http, "GET", "/autocloud/status"))[1]
                if st["downloads"] and st["downloads"][0].get("bytes_done", 0) >= MiB:
                    break
                await asyncio.sleep(0.05)
            during = st
            await _call(http, "POST", "/autocloud/cancel", {"key": spec.key})
            for _ in range(100):
                st = (await _call(http, "GET", "/autocloud/status"))[1]
                if not st["downloads"]:
                    break
                await asyncio.sleep(0.05)
            return during, st

        during, after = serve_adapter_routes(a, body)
        assert [d["key"] for d in during["downloads"]] == [spec.key] and during["downloads"][0]["origin"] == "manifest"
        assert during["available"] == []  # downloading: listed once, under Downloads
        row = after["recent"][0]
        assert row["key"] == spec.key and row["cancelled"] is True and row["phase"] == "cancelled"
        assert MiB <= row["bytes_done"] < 6 * MiB and row["bytes_total"] == 6 * MiB
        assert after["counters"]["errors"] == 0  # the user's own cancel is not a failure
        assert [x["key"] for x in after["available"]] == [spec.key]  # still offered: resume from the panel
        assert any(d.get("cancelled") for d in seen)  # the websocket message says so too
        path = a.resolve_missing("checkpoints", "c.safetensors")  # resumed
        assert path is not None and path.stat().st_size == 6 * MiB
        assert a.status()["recent"][0]["phase"] == "done" and len(a.status()["recent"]) == 1  # replaced
    finally:
        a.close()


def test_doctor_route_reports_checks(tmp_path: Path) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text("[")
    a = _adapter(tmp_path, AUTOCLOUD_MANIFEST=str(bad))
    try:
        status, out = serve_adapter_routes(a, lambda http: _call(http, "GET", "/autocloud/doctor"))
        assert status == 200 and out["ok"] is False
        by = {c["name"]: c for c in out["checks"]}
        assert by["ComfyUI"]["status"] == "fail"  # no layout provider: not inside ComfyUI
        assert by["manifest"]["status"] == "fail" and "broken.json" in by["manifest"]["detail"]
        assert by["cache"]["status"] == "ok"
    finally:
        a.close()
