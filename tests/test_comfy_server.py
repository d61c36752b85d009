"""The adapter inside a real ComfyUI (COMFYUI_PATH): a model that exists only in the manifest is listed,
downloaded once when a prompt needs it and the prompt completes; three missing models download together;
a corrupt origin file is a clear node error in the prompt's history; the web panel renders in Chromium."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from comfy_env import (
    MODEL_FILES,
    ComfyServer,
    TimedNginx,
    WsCollector,
    comfyui_and_nginx_or_skip,
    model_sha256,
    tiny_models,
    txt2img,
)
from servers import free_port, random_bytes

pytestmark = pytest.mark.slow
CKPT = "tiny-sd15.safetensors"
LORA_A, LORA_B, TAESD = "tiny-lora-a.safetensors", "tiny-lora-b.safetensors", "tiny-taesd.safetensors"
CORRUPT = "corrupt-lora.safetensors"
PANEL_FILE = "panel-demo.pth"


@dataclass
class Env:
    server: ComfyServer
    origin: TimedNginx
    models: Path
    cache: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    comfy = comfyui_and_nginx_or_skip()
    models = tiny_models(comfy)
    base = tmp_path_factory.mktemp("comfy")
    www = base / "www"
    www.mkdir()
    for f in MODEL_FILES:
        os.link(models / f, www / f) if os.stat(models).st_dev == os.stat(www).st_dev else shutil.copy(models / f, www)
    shutil.copy(models / LORA_B, www / CORRUPT)  # served bytes differ from the manifest's sha256 below
    with zipfile.ZipFile(www / PANEL_FILE, "w", zipfile.ZIP_STORED) as zf:  # a .pth is a zip (torch.save)
        zf.writestr("panel-demo/data/0", random_bytes(48 * 2**20, seed=5))
    origin = TimedNginx(www, base / "nginx", limit_rate="1m")
    origin.start()
    manifest = {
        "checkpoints": {CKPT: origin.url(CKPT)},
        "loras": {LORA_A: origin.url(f"/slow/{LORA_A}"), LORA_B: origin.url(f"/slow/{LORA_B}"),
                  CORRUPT: {"url": origin.url(CORRUPT), "sha256": model_sha256(models, LORA_A)}},
        "vae": {TAESD: origin.url(f"/slow/{TAESD}")},
        "upscale_models": {PANEL_FILE: origin.url(f"/slow/{PANEL_FILE}")},
    }
    (base / "manifest.json").write_text(json.dumps(manifest))
    cache = base / "cache"
    server = ComfyServer(comfy, base / "comfyui", extra_args=("--force-fp32",), env={
        "AUTOCLOUD_CACHE": str(cache), "AUTOCLOUD_MANIFEST": str(base / "manifest.json"),
        "AUTOCLOUD_ALLOWED_HOSTS": "127.0.0.1", "AUTOCLOUD_CONNECTIONS": "4"})
    try:
        server.start()
        yield Env(server, origin, models, cache)
    finally:
        server.stop()
        origin.stop()


def _get_bytes(origin: TimedNginx, path: str) -> int:
    return sum(e.body_bytes for e in origin.entries(path) if e.method == "GET")


def test_checkpoint_only_in_manifest_is_listed_downloaded_once_and_runs(env: Env) -> None:
    srv, origin = env.server, env.origin
    info = srv.get("/object_info/CheckpointLoaderSimple")["CheckpointLoaderSimple"]
    assert CKPT in info["input"]["required"]["ckpt_name"][0]
    assert not (env.cache / "checkpoints" / CKPT).exists()
    size = (env.models / CKPT).stat().st_size
    with WsCollector(srv.url, "t1") as ws:
        done = srv.run(txt2img(CKPT, seed=1), {"client_id": "t1"})
    assert done.status == "success", done.error()
    assert (env.cache / "checkpoints" / CKPT).stat().st_size == size
    assert _get_bytes(origin, CKPT) == size, "the checkpoint was not downloaded exactly once"
    ours = ws.of("autocloud.progress")
    assert any(m["key"] == f"checkpoints/{CKPT}" and m["phase"] == "done" for m in ours)
    bars = [m for m in ws.of("progress") if m["node"] == "ckpt"]
    assert bars and bars[-1]["max"] == size, "the loader node showed no download progress"
    again = srv.run(txt2img(CKPT, seed=2))  # from the cache now, no request to the origin
    assert again.status == "success" and _get_bytes(origin, CKPT) == size
    hits = srv.get("/autocloud/status")["counters"]["hits"]
    srv.request("GET", f"/view_metadata/checkpoints?filename={CKPT}")  # resolved via get_full_path (404: no metadata)
    st = srv.get("/autocloud/status")
    assert st["counters"]["hits"] == hits + 1
    assert [f["hits"] for f in st["files"] if f["key"] == f"checkpoints/{CKPT}"] == [2]


def test_three_missing_models_download_concurrently(env: Env) -> None:
    srv, origin = env.server, env.origin
    done = srv.run(txt2img(CKPT, loras=(LORA_A, LORA_B), vae=TAESD, seed=3))
    assert done.status == "success", done.error()
    spans = {n: origin.span(f"/slow/{n}") for n in (LORA_A, LORA_B, TAESD)}
    assert all(spans.values()), spans
    starts, ends = [s for s, _ in spans.values()], [e for _, e in spans.values()]
    assert max(starts) < min(ends), f"downloads did not overlap: {spans}"
    for n in (LORA_A, LORA_B, TAESD):
        assert _get_bytes(origin, f"/slow/{n}") == (env.models / n).stat().st_size
    recent = {r["key"]: r for r in srv.get("/autocloud/status")["recent"]}
    assert {recent[f"loras/{LORA_A}"]["reason"], recent[f"loras/{LORA_B}"]["reason"],
            recent[f"vae/{TAESD}"]["reason"]} == {"prefetch"}


def test_corrupt_origin_file_is_a_clear_node_error(env: Env) -> None:
    srv = env.server
    done = srv.run(txt2img(CKPT, loras=(CORRUPT,), seed=4))
    assert done.status == "error"
    err = done.error()
    assert err is not None and err["node_type"] == "LoraLoader"
    assert f"loras/{CORRUPT}" in err["exception_message"] and "sha256 mismatch" in err["exception_message"]
    assert not (env.cache / "loras" / CORRUPT).exists()
    assert srv.get("/system_stats")  # the server is alive
    metrics = srv.get("/autocloud/metrics")
    assert "autocloud_download_errors_total 1" in metrics


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _cdp(ws_url: str, steps: Any) -> Any:
    """Run `steps(call)` against one page over the Chrome DevTools Protocol."""

    async def main() -> Any:
        async with aiohttp.ClientSession() as s, s.ws_connect(ws_url, max_msg_size=64 * 2**20) as ws:
            counter = 0

            async def call(method: str, **params: Any) -> dict[str, Any]:
                nonlocal counter
                counter += 1
                await ws.send_json({"id": counter, "method": method, "params": params})
                while True:
                    msg = await ws.receive_json(timeout=60)
                    if msg.get("id") == counter:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg["result"]

            return await steps(call)

    return asyncio.run(main())


def test_web_panel_renders_in_headless_chromium(env: Env, tmp_path: Path) -> None:
    browser = _chromium()
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    srv = env.server
    port = free_port()
    proc = subprocess.Popen([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                             "--disable-component-update", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
                             f"--remote-debugging-port={port}", "--window-size=1400,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ws_url = None
        for _ in range(100):
            try:
                import urllib.request

                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=1) as r:
                    pages = [p for p in json.loads(r.read()) if p.get("type") == "page"]
                if pages:
                    ws_url = pages[0]["webSocketDebuggerUrl"]
                    break
            except OSError:
                pass
            time.sleep(0.1)
        assert ws_url, "chromium's DevTools endpoint did not come up"

        async def steps(call: Any) -> dict[str, Any]:
            async def js(expr: str) -> Any:
                r = await call("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
                return r["result"].get("value")

            await call("Page.enable")
            await call("Page.navigate", url=srv.url)
            for _ in range(300):  # the front end registers extensions after loading the graph
                if await js("!!(window.app && window.app.extensionManager && document.querySelector("
                            "'.autocloud-sidebar-ready, .side-bar-button, .p-button'))"):
                    break
                await asyncio.sleep(0.1)
            key = "upscale_models/" + PANEL_FILE
            await js("fetch('/autocloud/fetch', {method: 'POST', headers: {'Content-Type': 'application/json'},"
                     f" body: JSON.stringify({{key: '{key}'}})}})")
            opened = await js("window.app.extensionManager.command.execute('Workspace.ToggleSidebarTab.autocloud')"
                              ".then(() => true, (e) => String(e))")
            text = ""
            for _ in range(100):
                text = await js("(document.querySelector('.autocloud-panel') || {}).innerText || ''")
                if "Downloads (1 running" in text and "MiB of" in text:
                    break
                await asyncio.sleep(0.1)
            shot = await call("Page.captureScreenshot", format="png")
            return {"opened": opened, "text": text, "png": shot["data"]}

        out = _cdp(ws_url, steps)
    finally:
        proc.terminate()
        proc.wait(10)
    import base64

    png = Path(os.environ.get("AUTOCLOUD_SCREENSHOT", str(tmp_path / "panel.png")))
    png.write_bytes(base64.b64decode(out["png"]))
    assert out["opened"] is True, out["opened"]
    text = out["text"]
    assert "AutoCloud model cache" in text and "Usage" in text, text
    assert f"checkpoints/{CKPT}" in text or "Cached (" in text, text
    assert "Downloads (1 running" in text and "panel-demo.pth" in text, text
