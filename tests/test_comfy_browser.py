"""The ComfyUI user's path in a real browser: the real ComfyUI frontend (COMFYUI_PATH) driven by headless
Chromium through selenium. The AutoCloud tab opens; a fetch shows live progress (rows updated in place)
then Cached; cancel keeps the partial and resume finishes it; pin, evict (after a confirmation); a failed
URL fetch is named, wrapped, dismissable and leaves the loaders' lists; a workflow whose VAE is only a
download hint in its top-level `models[]` and whose LoRA is only in the manifest loads without a
missing-models row for the VAE (one nobody can provide is still listed) and with a toast, and Run
downloads both on the server and makes the image; the counters agree; our script logs no console errors.
Set AUTOCLOUD_SCREENSHOT=path to keep the panel's screenshot (the README's)."""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from browser import Browser, chromium_or_skip
from comfy_env import ComfyServer, TimedNginx, comfyui_and_nginx_or_skip, tiny_models
from servers import write_random_file

pytestmark = pytest.mark.slow
CKPT = "tiny-sd15.safetensors"
TAESD = "tiny-taesd.safetensors"
HINTED = "hinted-taesd.safetensors"  # only in the workflow's models[] hints
NOWHERE = "nowhere-lora.safetensors"  # a hint whose host is not allowed: nobody can provide it
SLOW = "slow-upscaler.pth"  # 12 MiB at 2 x 1 MB/s: slow enough to watch, cancel and resume
LORA = "manifest-lora.safetensors"  # random bytes: fetched, pinned and filtered in the tab, never loaded
LATE = "late-lora.safetensors"  # in the manifest, missing at the origin until the test puts it there
RUN_LORA = "tiny-lora-a.safetensors"  # only in the manifest: the workflow's LoraLoader downloads it on Run


@dataclass
class Env:
    server: ComfyServer
    origin: TimedNginx
    cache: Path
    browser: Browser


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    comfy = comfyui_and_nginx_or_skip()
    binary, driver = chromium_or_skip()
    models = tiny_models(comfy)
    base = tmp_path_factory.mktemp("browser")
    www = base / "www"
    www.mkdir()
    shutil.copy(models / TAESD, www / HINTED)
    shutil.copy(models / RUN_LORA, www / RUN_LORA)
    write_random_file(www / SLOW, 12 * 2**20, seed=19)
    write_random_file(www / LORA, 3 * 2**20, seed=20)
    origin = TimedNginx(www, base / "nginx", limit_rate="1m")
    origin.start()
    comfy_base = base / "comfyui"
    (comfy_base / "models" / "checkpoints").mkdir(parents=True)
    target = comfy_base / "models" / "checkpoints" / CKPT
    try:
        os.link(models / CKPT, target)
    except OSError:
        shutil.copy(models / CKPT, target)
    manifest = {"upscale_models": {SLOW: origin.url(f"/slow/{SLOW}")},
                "loras": {LORA: origin.url(LORA), RUN_LORA: origin.url(RUN_LORA), LATE: origin.url(LATE)}}
    (base / "manifest.json").write_text(json.dumps(manifest))
    cache = base / "cache"
    server = ComfyServer(comfy, comfy_base, extra_args=("--force-fp32",), env={
        "AUTOCLOUD_CACHE": str(cache), "AUTOCLOUD_MANIFEST": str(base / "manifest.json"),
        "AUTOCLOUD_ALLOWED_HOSTS": "127.0.0.1", "AUTOCLOUD_CONNECTIONS": "2"})
    browser = None
    try:
        server.start()
        browser = Browser(binary, driver, base / "profile")
        browser.open(server.url)
        browser.wait("return !!(window.app && window.app.extensionManager && window.app.graph"
                     " && document.querySelector('.side-tool-bar-container, .side-bar-button'))",
                     timeout=90, what="the ComfyUI frontend")
        yield Env(server, origin, cache, browser)
    finally:
        if browser is not None:
            browser.close()
        server.stop()
        origin.stop()


def open_panel(b: Browser) -> None:
    if not b.js("return !!document.querySelector('.autocloud-panel')"):
        b.js_async("await window.app.extensionManager.command.execute('Workspace.ToggleSidebarTab.autocloud');")
    b.wait("return document.querySelector('.autocloud-panel .autocloud-usage')?.textContent.includes('used')"
           " || document.querySelector('.autocloud-panel .autocloud-usage')?.textContent.includes(' of ')",
           what="the AutoCloud panel")


def row(section: str, key: str) -> str:
    return f"document.querySelector('.autocloud-panel {section}[data-key=\"{key}\"]')"


def click(b: Browser, selector_js: str, button: str) -> None:
    b.wait(f"const r = {selector_js}; const btn = r && r.querySelector('{button}');"
           " if (btn) { btn.click(); return true; } return false;", what=f"{button} in {selector_js}")


def type_filter(b: Browser, text: str) -> None:
    b.js("const i = document.querySelector('.autocloud-filter'); i.value = arguments[0];"
         " i.dispatchEvent(new Event('input'))", text)


def our_console_errors(b: Browser) -> list[dict]:
    b.logs()
    return [e for e in b.console if e["level"] == "SEVERE" and ("autocloud" in e["message"].lower())]


def test_fetch_progress_in_place_cancel_resume_pin_evict(env: Env) -> None:
    b, key = env.browser, f"upscale_models/{SLOW}"
    open_panel(b)
    assert b.js("return document.querySelector('.autocloud-panel').innerText").count(SLOW) == 1
    click(b, row(".autocloud-available", key), ".autocloud-fetch")
    b.wait(f"return {row('.autocloud-download', key)}?.innerText.includes('%)')", what="progress")
    b.js(f"{row('.autocloud-download', key)}.__mark = 1")
    text = b.wait(f"const t = {row('.autocloud-download', key)}?.innerText || '';"
                  " return /downloading [0-9.]+ (KiB|MiB) of 12\\.0 MiB \\([0-9]+%\\) · .*\\/s"
                  " · \\d\\d:\\d\\d left/.test(t)"
                  " && t", what="size, speed and mm:ss ETA")
    assert "for a queued prompt" not in text and "requested here" in text, text
    # one row per model: while downloading it is not also offered under "Not downloaded yet"
    assert b.js("return document.querySelector('.autocloud-panel').innerText").count(SLOW) == 1
    time.sleep(1.0)  # several progress messages later the row is the same element, updated in place
    assert b.js(f"return {row('.autocloud-download', key)}.__mark") == 1
    width1 = b.js(f"return {row('.autocloud-download', key)}.querySelector('.autocloud-bar > div').style.width")

    click(b, row(".autocloud-download", key), ".autocloud-cancel")
    kept = b.wait(f"const t = {row('.autocloud-cancelled', key)}?.innerText || '';"
                  " return /cancelled, \\d+% kept/.test(t) && t", what="cancelled, N% kept")
    assert "failed" not in kept and float(width1.rstrip("%")) >= 0
    assert b.js(f"return !!{row('.autocloud-cancelled', key)}.querySelector('.autocloud-resume')")
    part = list(env.cache.rglob("*.part"))
    assert part and part[0].stat().st_size > 0, "the partial file is kept"

    click(b, row(".autocloud-cancelled", key), ".autocloud-resume")
    b.wait(f"return !!{row('.autocloud-file', key)}", timeout=60, what="the file under Cached")
    assert not b.js(f"return !!{row('.autocloud-cancelled', key)}")  # the finished download replaced it
    ranges = [e.range for e in env.origin.entries(f"slow/{SLOW}") if e.status == 206]
    assert any(r and not r.startswith("bytes=0-") for r in ranges), "resumed, not restarted"

    click(b, row(".autocloud-file", key), ".autocloud-pin")
    b.wait(f"return !!{row('.autocloud-file', key)}.querySelector('.pi-thumbtack.autocloud-pinned')", what="pinned")
    assert env.server.get("/autocloud/status")["pinned"] == 1
    click(b, row(".autocloud-file", key), ".autocloud-pin")  # unpin again
    b.wait(f"return !{row('.autocloud-file', key)}.querySelector('.autocloud-pinned')", what="unpinned")

    click(b, row(".autocloud-file", key), ".autocloud-evict")
    b.wait(f"return {row('.autocloud-file', key)}.innerText.includes('delete 12.0 MiB?')", what="the confirmation")
    assert (env.cache / "upscale_models" / SLOW).exists(), "nothing is deleted before the confirmation"
    click(b, row(".autocloud-file", key), ".autocloud-evict-no")
    b.wait(f"return !!{row('.autocloud-file', key)}.querySelector('.autocloud-evict')", what="kept")
    click(b, row(".autocloud-file", key), ".autocloud-evict")
    click(b, row(".autocloud-file", key), ".autocloud-evict-yes")
    b.wait(f"return !{row('.autocloud-file', key)} && !!{row('.autocloud-available', key)}", what="evicted")
    assert not (env.cache / "upscale_models" / SLOW).exists()
    assert our_console_errors(b) == []


def test_failed_url_fetch_is_named_wrapped_dismissable_and_dropped(env: Env) -> None:
    b = env.browser
    open_panel(b)
    missing = "gone-lora.safetensors"
    key = f"loras/{missing}"
    out = b.js_async("const r = await fetch('/autocloud/fetch', {method: 'POST', headers: {'Content-Type':"
                     " 'application/json'}, body: JSON.stringify({url: arguments[0], folder: 'loras'})});"
                     " return r.status;", env.origin.url(missing))
    assert out == 202
    text = b.wait(f"return {row('.autocloud-failed', key)}?.innerText", what="the failed row")
    assert missing in text and "HTTP 404" in text, text
    reason = f"{row('.autocloud-failed', key)}.querySelector('.autocloud-reason')"
    assert b.js(f"const r = {reason}; return getComputedStyle(r).whiteSpace === 'normal'"
                " && r.scrollWidth <= r.clientWidth + 1"), "the whole reason is shown, wrapped"
    assert not b.js(f"return !!{row('.autocloud-failed', key)}.querySelector('.autocloud-retry')")  # source dropped
    lists = env.server.get("/object_info/LoraLoader")["LoraLoader"]["input"]["required"]["lora_name"][0]
    assert missing not in lists and LORA in lists
    assert key not in {a["key"] for a in env.server.get("/autocloud/status")["available"]}
    click(b, row(".autocloud-failed", key), ".autocloud-dismiss")
    b.wait(f"return !{row('.autocloud-failed', key)}", what="dismissed")

    late = f"loras/{LATE}"  # a manifest entry keeps its source: retry, which works once the origin has it
    click(b, row(".autocloud-available", late), ".autocloud-fetch")
    b.wait(f"return {row('.autocloud-failed', late)}?.innerText.includes('HTTP 404')", what="the failure")
    write_random_file(env.origin.data_dir / LATE, 2**20, seed=21)
    click(b, row(".autocloud-failed", late), ".autocloud-retry")
    b.wait(f"return !!{row('.autocloud-file', late)} && !{row('.autocloud-failed', late)}", what="retried")
    assert our_console_errors(b) == []


BUILD_WORKFLOW = """
const [ckpt, vaeName, loraName, hints] = args;
const app = window.app;
await app.loadGraphData();  // the default text-to-image graph
const g = app.graph;
const set = (type, name, value) => { g.nodes.find((n) => n.type === type).widgets.find((w) => w.name === name)
  .value = value; };
set("CheckpointLoaderSimple", "ckpt_name", ckpt);
set("EmptyLatentImage", "width", 64);
set("EmptyLatentImage", "height", 64);
set("KSampler", "steps", 1);
set("KSampler", "cfg", 1.0);
const vae = LiteGraph.createNode("VAELoader");
g.add(vae);
vae.widgets[0].value = vaeName;
const decode = g.nodes.find((n) => n.type === "VAEDecode");
vae.connect(0, decode, decode.inputs.findIndex((i) => i.name === "vae"));
const loader = g.nodes.find((n) => n.type === "CheckpointLoaderSimple");
const lora = LiteGraph.createNode("LoraLoader");
g.add(lora);
lora.widgets.find((w) => w.name === "lora_name").value = loraName;
loader.connect(0, lora, 0);
loader.connect(1, lora, 1);
const sampler = g.nodes.find((n) => n.type === "KSampler");
lora.connect(0, sampler, sampler.inputs.findIndex((i) => i.name === "model"));
for (const enc of g.nodes.filter((n) => n.type === "CLIPTextEncode")) lora.connect(1, enc, 0);
const wf = g.serialize();
wf.models = hints;
await app.loadGraphData(wf);
return true;
"""


def test_workflow_hint_counts_as_available_and_run_downloads_it(env: Env) -> None:
    b, srv = env.browser, env.server
    hints = [{"name": HINTED, "url": env.origin.url(HINTED), "directory": "vae"},
             {"name": NOWHERE, "url": f"https://example.invalid/{NOWHERE}", "directory": "loras"}]
    assert b.js_async(BUILD_WORKFLOW, CKPT, HINTED, RUN_LORA, hints) is True
    dialog = b.wait("return document.querySelector('.comfy-missing-models')?.innerText", what="the dialog")
    assert f"loras / {NOWHERE}" in dialog and HINTED not in dialog, dialog  # only what nobody can provide
    b.js("document.querySelector('.p-dialog-close-button, .p-dialog-header-close')?.click()")
    # the server heard the hints when the workflow loaded (allowlisted ones only), labelled as the workflow's
    cat = {a["key"]: a for a in srv.get("/autocloud/status")["available"]}
    assert cat[f"vae/{HINTED}"]["origin"] == "workflow" and f"loras/{NOWHERE}" not in cat
    vae_list = srv.get("/object_info/VAELoader")["VAELoader"]["input"]["required"]["vae_name"][0]
    assert HINTED not in vae_list  # opening a workflow does not add its hints to every user's lists
    open_panel(b)
    wf = b.wait("return document.querySelector('.autocloud-panel .autocloud-wf[data-key=\"vae/" + HINTED + "\"]')"
                "?.innerText", what="This workflow")
    assert "downloads on Run" in wf and "from workflow" in wf, wf
    lora = b.js("return document.querySelector('.autocloud-wf[data-key=\"loras/" + RUN_LORA + "\"]').innerText")
    assert "downloads on Run" in lora and "manifest" in lora, lora
    toast = b.wait("return [...document.querySelectorAll('.p-toast-message')].map((t) => t.innerText).join(' ')",
                   what="the toast")
    assert "2 models download on the server when you run this workflow" in toast, toast
    nowhere = b.js("return document.querySelector('.autocloud-wf[data-key=\"loras/" + NOWHERE + "\"]').innerText")
    assert "not allowed" in nowhere and "AUTOCLOUD_ALLOWED_HOSTS" in nowhere, nowhere

    queued = b.js_async("await window.app.queuePrompt(0); return true;")
    assert queued is True, queued
    deadline = time.monotonic() + 120
    done = None
    while time.monotonic() < deadline and done is None:
        hist = srv.get("/history")
        done = next((h for h in hist.values() if h.get("status", {}).get("completed") is not None), None)
        time.sleep(0.2)
    assert done is not None, srv.log()[-3000:]
    assert done["status"]["status_str"] == "success", json.dumps(done["status"])[-2000:]
    assert done["prompt"][3]["extra_pnginfo"]["workflow"]["models"][0]["name"] == HINTED  # put back by our script
    assert (env.cache / "vae" / HINTED).is_file() and (env.cache / "loras" / RUN_LORA).is_file()
    assert HINTED in srv.get("/object_info/VAELoader")["VAELoader"]["input"]["required"]["vae_name"][0]  # on disk
    assert {n["class_type"] for n in done["prompt"][2].values()} >= {"LoraLoader", "VAELoader"}
    st = srv.get("/autocloud/status")
    recent = {r["key"]: r for r in st["recent"]}
    assert recent[f"vae/{HINTED}"]["reason"] == "prefetch" and recent[f"vae/{HINTED}"]["origin"] == "workflow"
    # the counters agree: each file's loads from the cache add up to the total the tab shows
    loads = st["counters"]["hits"]
    assert sum(f["hits"] - 1 for f in st["files"]) == loads
    total = f"{loads} load{'' if loads == 1 else 's'} from cache"
    b.wait(f"return document.querySelector('.autocloud-counters').textContent.includes('{total}')"
           f" && {row('.autocloud-file', 'vae/' + HINTED)}?.innerText.includes('0 loads from cache')",
           what="counters that agree")
    assert our_console_errors(b) == []


def test_health_and_screenshot_of_the_panel(env: Env, tmp_path: Path) -> None:
    b, key = env.browser, f"upscale_models/{SLOW}"
    open_panel(b)
    health = b.wait("return document.querySelector('.autocloud-panel .autocloud-section')?.innerText.includes("
                    "'Health') && document.querySelector('.autocloud-panel').innerText", what="Health")
    assert "Health: all" in health and "checks OK" in health, health
    lora = f"loras/{LORA}"
    click(b, row(".autocloud-available", lora), ".autocloud-fetch")
    click(b, row(".autocloud-file", lora), ".autocloud-pin")
    b.wait(f"return !!{row('.autocloud-file', lora)}.querySelector('.autocloud-pinned')", what="a pinned file")
    b.js_async("await fetch('/autocloud/fetch', {method: 'POST', headers: {'Content-Type': 'application/json'},"
               " body: JSON.stringify({key: arguments[0]})});", key)
    b.wait(f"return {row('.autocloud-download', key)}?.innerText.includes('left')", what="progress")
    type_filter(b, "")
    time.sleep(0.6)
    shot = Path(os.environ.get("AUTOCLOUD_SCREENSHOT", str(tmp_path / "panel.png")))
    b.screenshot(shot)  # the whole window: the tab beside the graph it serves
    assert shot.stat().st_size > 10_000
    type_filter(b, "UPSCALE")
    b.wait(f"return !{row('.autocloud-file', lora)} && document.querySelector('.autocloud-panel').innerText"
           ".includes('nothing matches the filter')", what="the filter hiding the LoRA")
    type_filter(b, "")
    b.wait(f"return !!{row('.autocloud-file', lora)}", what="the LoRA back")
    click(b, row(".autocloud-download", key), ".autocloud-cancel")
    b.wait(f"return !!{row('.autocloud-cancelled', key)}", what="cancelled")
    assert our_console_errors(b) == []
