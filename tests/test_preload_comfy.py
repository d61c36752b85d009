"""Memory preload inside a real ComfyUI (COMFYUI_PATH): preloaded at start from the user dir's
preload_config.json (a broken entry reported, a missing file fetched from the origin), cached loaders
that take milliseconds and give the stock loaders' exact images, A -> B -> A without a reload, a LoRA
that leaves the cached base untouched, a miss that is loaded and kept, the snapshot routes, the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from comfy_env import (
    ComfyServer,
    Finished,
    TimedNginx,
    cached_nodes,
    comfyui_and_nginx_or_skip,
    preload_models,
    prompt_seconds,
    txt2img,
)

pytestmark = pytest.mark.slow
A, B = "tiny-sd15.safetensors", "tiny-sd15-b.safetensors"
CLIP, UNET, TAESD = "tiny-clip-l.safetensors", "tiny-unet.safetensors", "tiny-taesd.safetensors"
LORA = "tiny-lora-a.safetensors"
FETCHED = "fetched-taesd.safetensors"  # configured, only on the origin: fetched at start-up, then preloaded
GONE = "gone-taesd.safetensors"  # preloaded, then deleted by a test: still served from memory
LATE = "tiny-sd15-late.safetensors"  # not configured: preloaded by a probe node in the middle of a prompt
CACHED_CKPT = "AutoCloudCachedCheckpointLoader"

PROBE_NODE = r'''
import time


class StartPreloadInPrompt:
    """Test node: starts a background preload of `ckpt_name` while the prompt runs and gives it `wait` seconds
    to begin (without the gate it begins at once), then passes the model on to the sampler."""

    CATEGORY = "testing"
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "run"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"model": ("MODEL",), "ckpt_name": ("STRING", {"default": ""}),
                             "wait": ("FLOAT", {"default": 1.5})}}

    def run(self, model, ckpt_name, wait):
        from comfy_autocloud.comfy import nodes_preload
        from comfy_autocloud.preload import load_requests

        reg = nodes_preload.registry()
        reg.start([load_requests.checkpoint_request(ckpt_name)])
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            e = reg.entry("checkpoint:" + ckpt_name)
            if e is not None and e.state.value != "queued":
                break
            time.sleep(0.02)
        return (model,)


NODE_CLASS_MAPPINGS = {"AutoCloudTestStartPreloadInPrompt": StartPreloadInPrompt}
'''


@dataclass
class Env:
    server: ComfyServer
    base: Path
    cache: Path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    comfy = comfyui_and_nginx_or_skip()
    models = preload_models(comfy)
    base = tmp_path_factory.mktemp("preload")
    root = base / "comfyui"
    for folder, name in (("checkpoints", A), ("checkpoints", B), ("text_encoders", CLIP),
                         ("diffusion_models", UNET), ("vae", TAESD), ("loras", LORA)):
        (root / "models" / folder).mkdir(parents=True, exist_ok=True)
        (root / "models" / folder / name).symlink_to(models / name)
    shutil.copy(models / TAESD, root / "models" / "vae" / GONE)
    (root / "models" / "checkpoints" / LATE).symlink_to(models / A)
    (root / "custom_nodes" / "autocloud_test_probe").mkdir(parents=True)
    (root / "custom_nodes" / "autocloud_test_probe" / "__init__.py").write_text(PROBE_NODE)
    www = base / "www"
    www.mkdir()
    shutil.copy(models / TAESD, www / FETCHED)
    origin = TimedNginx(www, base / "nginx", limit_rate="100m")
    origin.start()
    (base / "manifest.json").write_text(json.dumps({"vae": {FETCHED: origin.url(FETCHED)}}))
    (root / "user").mkdir(parents=True, exist_ok=True)
    (root / "user" / "preload_config.json").write_text(json.dumps({
        "version": "1.0", "description": "preload test",
        "models": {
            "checkpoints": [{"name": A, "cache_key": "ckpt-a", "enabled": True}, {"name": B, "cache_key": ""},
                            {"name": "disabled.safetensors", "enabled": False}],
            "text_encoders": [{"clip_names": [CLIP], "type": "stable_diffusion", "device": "default"}],
            "diffusion_models": [{"model_name": UNET, "weight_dtype": "default"},
                                 {"model_name": UNET, "weight_dtype": "fp16"}],  # broken: not a weight_dtype
            "vaes": [{"vae_name": TAESD}, {"vae_name": FETCHED}, {"vae_name": GONE}],
        },
        "settings": {"auto_gpu_load": True, "verbose": True}}))
    cache = base / "cache"
    server = ComfyServer(comfy, root, extra_args=("--disable-metadata",), env={
        "AUTOCLOUD_CACHE": str(cache), "AUTOCLOUD_MANIFEST": str(base / "manifest.json"),
        "AUTOCLOUD_ALLOWED_HOSTS": "127.0.0.1", "AUTOCLOUD_PRELOAD_FINGERPRINT": "1"})
    try:
        server.start()
        wait_preloaded(server)
        yield Env(server, root, cache)
    finally:
        server.stop()
        origin.stop()


def wait_preloaded(server: ComfyServer, timeout: float = 120.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        st = server.get("/autocloud/preload")
        if st["counts"]["queued"] == 0 and st["counts"]["loading"] == 0 and st.get("phase") in ("ready", "idle"):
            return st
        time.sleep(0.2)
    raise TimeoutError(f"preload not finished in {timeout}s:\n{server.log()[-3000:]}")


def entry(st: dict[str, Any], name: str) -> dict[str, Any]:
    return next(e for e in st["entries"] if e["name"] == name)


def image_bytes(env: Env, done: Finished) -> bytes:
    assert done.status == "success", done.error()
    images = [img for out in done.history["outputs"].values() for img in out.get("images", [])]
    assert len(images) == 1
    return (env.base / "output" / images[0]["subfolder"] / images[0]["filename"]).read_bytes()


def with_cached_loaders(prompt: dict[str, Any], ckpt_class: str = CACHED_CKPT) -> dict[str, Any]:
    p = json.loads(json.dumps(prompt))
    p["ckpt"]["class_type"] = ckpt_class
    return p


def only_loader(ckpt: str, cls: str = CACHED_CKPT) -> dict[str, Any]:
    """A prompt that runs nothing but the loader (PreviewAny is the output that pulls it)."""
    return {"ckpt": {"class_type": cls, "inputs": {"ckpt_name": ckpt}},
            "show": {"class_type": "PreviewAny", "inputs": {"source": ["ckpt", 0]}}}


def test_preloaded_at_start_broken_entry_reported_missing_file_fetched(env: Env) -> None:
    st = env.server.get("/autocloud/preload")
    assert st["config"].endswith("preload_config.json")
    names = {e["name"]: e for e in st["entries"]}
    expected = ("ckpt-a", f"checkpoint:{B}", f"text_encoder:{CLIP}[type=stable_diffusion]", f"diffusion_model:{UNET}",
                f"vae:{TAESD}", f"vae:{FETCHED}", f"vae:{GONE}")
    assert set(names) == set(expected), names
    summary = {n: (names[n]["state"], names[n]["loads"], names[n]["error"]) for n in expected}
    assert all(v[:2] == ("ready", 1) for v in summary.values()), json.dumps(summary)
    assert len(st["config_errors"]) == 1
    assert "models.diffusion_models[1].weight_dtype" in st["config_errors"][0]
    assert (env.cache / "vae" / FETCHED).is_file(), "the configured file missing on disk was not fetched"
    assert names["ckpt-a"]["bytes"] > 100 * 2**20
    # auto_gpu_load: each part put on its device and run once at start-up (the first prompt pays none of it)
    assert st["phase"] == "ready"
    assert names["ckpt-a"]["warmed"] == ["clip", "sample", "vae"], names["ckpt-a"]
    assert names[f"text_encoder:{CLIP}[type=stable_diffusion]"]["warmed"] == ["clip"]
    assert names[f"diffusion_model:{UNET}"]["warmed"] == ["model"]
    assert names[f"vae:{TAESD}"]["warmed"] == ["vae"]
    # ... and ComfyUI's own prompt path ran once on an internal no-op prompt, seen by no queue or history
    warm = st["executor_warmup"]
    assert warm is not None and warm["error"] is None and warm["execute_seconds"] > 0, warm
    assert warm["frozen_objects"] > 1000, warm  # start-up's heap is out of the prompt worker's gc.collect()
    assert env.server.get("/queue") == {"queue_running": [], "queue_pending": []}
    assert env.server.get("/history") == {}, "the warm-up prompt is visible in the history"


def test_object_info_names_category_and_tooltips(env: Env) -> None:
    info = env.server.get("/object_info")
    ours = {k: v for k, v in info.items() if v["category"] == "AutoCloud/preload"}
    assert len(ours) == 10
    assert ours[CACHED_CKPT]["display_name"].startswith("🚀 Cached Checkpoint Loader")
    assert ours["AutoCloudPreloadedCheckpointSelector"]["input"]["required"]["preloaded"][0] == ["ckpt-a",
                                                                                                 f"checkpoint:{B}"]
    assert "tooltip" in ours[CACHED_CKPT]["input"]["required"]["ckpt_name"][1]


def test_cached_checkpoint_gives_the_stock_image(env: Env) -> None:
    stock = env.server.run(txt2img(A, seed=3, prefix="stock"))
    cached = env.server.run(with_cached_loaders(txt2img(A, seed=3, prefix="cached")))
    assert image_bytes(env, stock) == image_bytes(env, cached)


def test_loader_takes_milliseconds_and_a_b_a_never_reloads(env: Env) -> None:
    before = env.server.get("/autocloud/preload")
    times = {}
    for i, ckpt in enumerate((B, A, B, A)):  # the test before ended with A: start with B
        done = env.server.run(only_loader(ckpt))
        assert done.status == "success", done.error()
        assert "ckpt" not in cached_nodes(done), "the loader did not run (ComfyUI's execution cache served it)"
        times[f"{i}:{ckpt}"] = prompt_seconds(done)
    after = env.server.get("/autocloud/preload")
    assert after["loads"] == before["loads"], "a checkpoint was read again"
    assert entry(after, "ckpt-a")["hits"] >= entry(before, "ckpt-a")["hits"] + 2
    assert max(times.values()) < 0.2, times
    stock_b = env.server.run(only_loader(B, "CheckpointLoaderSimple"))
    stock_a = env.server.run(only_loader(A, "CheckpointLoaderSimple"))
    assert prompt_seconds(stock_a) > 5 * max(times.values()), (prompt_seconds(stock_a), prompt_seconds(stock_b), times)


def test_lora_downstream_leaves_cached_base_untouched(env: Env) -> None:
    srv = env.server
    plain = image_bytes(env, srv.run(with_cached_loaders(txt2img(A, seed=5, prefix="plain1"))))
    lora = image_bytes(env, srv.run(with_cached_loaders(txt2img(A, loras=(LORA,), seed=5, prefix="lora"))))
    assert lora != plain
    verified = srv.get("/autocloud/preload?verify=1")["verified"]
    assert verified["ckpt-a"] is True, verified
    again = image_bytes(env, srv.run(with_cached_loaders(txt2img(A, seed=5, prefix="plain2"))))
    assert again == plain


def test_text_encoder_diffusion_model_vae_loaders_match_stock(env: Env) -> None:
    def prompt(cached: bool, prefix: str) -> dict[str, Any]:
        p = txt2img(A, vae=TAESD, seed=7, prefix=prefix)
        del p["ckpt"]
        if cached:
            p["unet"] = {"class_type": "AutoCloudCachedDiffusionModelLoader",
                         "inputs": {"unet_name": UNET, "weight_dtype": "default"}}
            p["clip"] = {"class_type": "AutoCloudCachedTextEncoderLoader",
                         "inputs": {"clip_name1": CLIP, "clip_name2": "None", "clip_name3": "None",
                                    "type": "stable_diffusion", "device": "default"}}
            p["vae"] = {"class_type": "AutoCloudCachedVAELoader", "inputs": {"vae_name": TAESD}}
        else:
            p["unet"] = {"class_type": "UNETLoader", "inputs": {"unet_name": UNET, "weight_dtype": "default"}}
            p["clip"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": CLIP, "type": "stable_diffusion"}}
        p["sample"]["inputs"]["model"] = ["unet", 0]
        p["pos"]["inputs"]["clip"] = p["neg"]["inputs"]["clip"] = ["clip", 0]
        return p

    before = env.server.get("/autocloud/preload")["loads"]
    stock = env.server.run(prompt(False, "stock-parts"))
    cached = env.server.run(prompt(True, "cached-parts"))
    assert image_bytes(env, stock) == image_bytes(env, cached)
    assert env.server.get("/autocloud/preload")["loads"] == before


def test_selector_and_info_nodes(env: Env) -> None:
    p = txt2img(A, seed=3, prefix="selected")
    p["ckpt"] = {"class_type": "AutoCloudPreloadedCheckpointSelector", "inputs": {"preloaded": "ckpt-a"}}
    p["info"] = {"class_type": "AutoCloudCacheModelInfo", "inputs": {"kind": "all"}}
    p["check"] = {"class_type": "AutoCloudCheckCacheStatus", "inputs": {"kind": "checkpoint", "name": B}}
    done = env.server.run(p)
    stock = env.server.run(txt2img(A, seed=3, prefix="stock-sel"))
    assert image_bytes(env, done) == image_bytes(env, stock)
    info = done.history["outputs"]["info"]["text"][0]
    assert "[ready] ckpt-a" in info and "weight_dtype" in info and "! " in info
    check = done.history["outputs"]["check"]["text"][0]
    assert check.startswith(f"checkpoint:{B}: ready")


def test_miss_loads_once_and_is_kept(env: Env) -> None:
    clip = {"class_type": "AutoCloudCachedTextEncoderLoader",
            "inputs": {"clip_name1": CLIP, "clip_name2": "None", "clip_name3": "None", "type": "sd3",
                       "device": "cpu"}}  # other options: another object, not preloaded
    name = f"text_encoder:{CLIP}[device=cpu,type=sd3]"
    for i in range(2):
        done = env.server.run({"clip": clip, "enc": {"class_type": "CLIPTextEncode",
                                                     "inputs": {"clip": ["clip", 0], "text": f"run {i}"}},
                               "show": {"class_type": "PreviewAny", "inputs": {"source": ["enc", 0]}}})
        assert done.status == "success", done.error()
        env.server.run(only_loader(B))  # evicts the loader from ComfyUI's execution cache
    e = entry(env.server.get("/autocloud/preload"), name)
    assert e["state"] == "ready" and e["loads"] == 1 and e["hits"] >= 1


def test_deleted_file_is_served_from_memory(env: Env) -> None:
    """The preloaded VAE's file is deleted: the cached loader still validates (its name stays in the list) and
    returns the held copy, unread; the status says the file is gone."""
    before = entry(env.server.get("/autocloud/preload"), f"vae:{GONE}")
    (env.base / "models" / "vae" / GONE).unlink()
    prompt = {"vae": {"class_type": "AutoCloudCachedVAELoader", "inputs": {"vae_name": GONE}},
              "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
              "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["latent", 0], "vae": ["vae", 0]}},
              "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": "gone"}}}
    image_bytes(env, env.server.run(prompt))
    after = entry(env.server.get("/autocloud/preload"), f"vae:{GONE}")
    assert after["state"] == "ready" and after["loads"] == before["loads"] == 1
    assert after["hits"] == before["hits"] + 1
    assert after["file_missing"] is True and "file gone from disk" in after["note"]
    assert env.server.log().count("file gone from disk") == 1


def test_background_preload_waits_for_the_running_prompt(env: Env) -> None:
    """ComfyUI's model management is single-threaded (see comfy_autocloud/preload/gate.py): a preload started in
    the middle of a prompt (by a probe node) must not load until the prompt is done; without the gate the
    load starts at once and overlaps the sampler. A second prompt queued behind it whose cached loader needs that
    checkpoint loads it itself, before the waiting preload, and the file is loaded once."""
    first = txt2img(A, seed=11, prefix="gate1")
    first["ckpt"]["class_type"] = CACHED_CKPT
    first["probe"] = {"class_type": "AutoCloudTestStartPreloadInPrompt",
                      "inputs": {"model": ["ckpt", 0], "ckpt_name": LATE, "wait": 1.5}}
    first["sample"]["inputs"]["model"] = ["probe", 0]
    first["sample"]["inputs"]["steps"] = 3
    second = with_cached_loaders(txt2img(LATE, seed=12, prefix="gate2"))
    ids = [env.server.queue(first), env.server.queue(second)]
    done = [env.server.wait(i, timeout=300) for i in ids]
    assert [d.status for d in done] == ["success", "success"], [d.error() for d in done]
    st = wait_preloaded(env.server)
    late = entry(st, f"checkpoint:{LATE}")
    assert late["state"] == "ready" and late["loads"] == 1, late

    def span(d: Finished) -> tuple[float, float]:
        stamps = {n: m["timestamp"] / 1000.0 for n, m in d.messages if isinstance(m, dict) and "timestamp" in m}
        return stamps["execution_start"], stamps["execution_success"]

    (s1, e1), (s2, e2) = span(done[0]), span(done[1])
    assert late["load_started"] >= e1 - 0.01, ("the preload overlapped the running prompt", late, (s1, e1))
    assert s2 - 0.01 <= late["load_started"] <= e2, ("the second prompt's loader did not load it", late, (s2, e2))
    assert st["gate"]["background_waits"] >= 1


def test_snapshot_routes_both_phases_on_cpu(env: Env) -> None:
    loads = env.server.get("/autocloud/preload")["loads"]
    status, body = env.server.request("POST", "/autocloud/preload/load_all", {"device": "cpu"})
    assert status == 200 and body["counts"]["queued"] == body["counts"]["loading"] == 0
    status, body = env.server.request("POST", "/autocloud/preload/to_gpu", {})
    assert status == 200 and set(body["devices"].values()) == {"cpu"}  # --cpu: no GPU to move to
    assert body["loads"] == loads


def test_cli_status_shows_preload(env: Env) -> None:
    out = subprocess.run([sys.executable, "-m", "comfy_autocloud.cli.main", "status", "--comfy-url",
                          env.server.url], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "AUTOCLOUD_CACHE": str(env.cache)})
    assert out.returncode == 0, out.stderr
    assert "ckpt-a" in out.stdout and "ready" in out.stdout
    js = subprocess.run([sys.executable, "-m", "comfy_autocloud.cli.main", "status", "--json"],
                        capture_output=True, text=True, timeout=60,
                        env={**os.environ, "AUTOCLOUD_CACHE": str(env.cache), "AUTOCLOUD_COMFY_URL": env.server.url})
    assert js.returncode == 0, js.stderr
    assert {e["name"] for e in json.loads(js.stdout)["preload"]["entries"]} >= {"ckpt-a"}
