"""A real ComfyUI for the adapter's tests and `bench/comfy_load.py`, plus tiny real models for it.

`COMFYUI_PATH` points at a ComfyUI checkout (never part of this repository); `COMFYUI_PYTHON` (default:
`$COMFYUI_PATH/../comfyui-venv/bin/python` when it exists, else this interpreter) runs it. The server
gets its own `--base-directory` (models, user, output, custom_nodes with a link to this pack), so
tests never write into the checkout. Models are made once per machine and version into a temp
directory by `FACTORY`, using ComfyUI's own model classes with random weights: an SD1.5-architecture
checkpoint (tiny UNet, real-shape CLIP-L and KL VAE, ~445 MiB) that the stock
CheckpointLoaderSimple loads, a TAESD-format VAE (~5 MiB) and two CLIP LoRAs (~10 MiB each).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from servers import NginxOrigin, free_port

PACK_ROOT = Path(__file__).resolve().parents[1]
SKIP_REASON = "COMFYUI_PATH not set: real-ComfyUI adapter tests need a ComfyUI checkout"


def comfyui_path() -> Path | None:
    p = os.environ.get("COMFYUI_PATH")
    return Path(p) if p and (Path(p) / "main.py").is_file() else None


def comfyui_and_nginx_or_skip() -> Path:
    """The ComfyUI checkout for a test that also serves models from nginx; skips the test (saying why) if
    either is missing. Call it from a test or fixture (pytest is imported here only then)."""
    import pytest

    comfy = comfyui_path()
    if comfy is None:
        pytest.skip(SKIP_REASON)
    if not TimedNginx.available():
        pytest.skip("nginx is not on PATH (apt-get install -y nginx-light)")
    return comfy


def comfy_python(path: Path) -> str:
    explicit = os.environ.get("COMFYUI_PYTHON")
    if explicit:
        return explicit
    venv = path.parent / "comfyui-venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


FACTORY = r'''
import json, os, sys
comfy_path, out_dir = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_path)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
from safetensors.torch import save_file
torch.manual_seed(0)
NORMS = ("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight", "layer_norm1.weight",
         "layer_norm2.weight", "final_layer_norm.weight")

def randomize(sd, scale=0.02):
    out = {}
    for k, v in sd.items():
        if v.dtype.is_floating_point:
            if k.endswith(NORMS) or (".norm" in k and k.endswith("weight")):
                t = torch.ones(v.shape)
            elif k.endswith("bias"):
                t = torch.zeros(v.shape)
            else:
                t = torch.randn(v.shape) * scale
            out[k] = t.to(torch.float16).contiguous()
        elif k.endswith("position_ids"):
            out[k] = torch.arange(v.shape[-1]).reshape(v.shape).to(v.dtype)
        else:
            out[k] = torch.zeros(v.shape, dtype=v.dtype)
    return out

import comfy.ops, comfy.sd1_clip
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from comfy.ldm.models.autoencoder import AutoencoderKL
from comfy.taesd.taesd import TAESD
cfg = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
           adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[1], transformer_depth=[1],
           channel_mult=[1], transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768,
           num_heads=8, transformer_depth_output=[1, 1], use_temporal_resblock=False, use_temporal_attention=False)
unet = UNetModel(**cfg, device="meta", operations=comfy.ops.disable_weight_init)
sd = {"model.diffusion_model." + k: v for k, v in unet.state_dict().items()}
sd.update({"cond_stage_model." + k: v for k, v in comfy.sd1_clip.SDClipModel(device="meta").state_dict().items()})
ddconfig = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
with torch.device("meta"):
    vae = AutoencoderKL(ddconfig=ddconfig, embed_dim=4)
    taesd = TAESD()
sd.update({"first_stage_model." + k: v for k, v in vae.state_dict().items()})
os.makedirs(out_dir, exist_ok=True)
save_file(randomize(sd), os.path.join(out_dir, "tiny-sd15.safetensors"))
tsd = randomize(taesd.state_dict(), 0.05)
tsd["vae_scale"] = torch.tensor(1.0)
tsd["vae_shift"] = torch.tensor(0.0)
save_file(tsd, os.path.join(out_dir, "tiny-taesd.safetensors"))

def lora(seed, rank):
    g = torch.Generator().manual_seed(seed)
    out = {}
    shapes = {"self_attn_q_proj": (768, 768), "self_attn_k_proj": (768, 768), "self_attn_v_proj": (768, 768),
              "self_attn_out_proj": (768, 768), "mlp_fc1": (768, 3072), "mlp_fc2": (3072, 768)}
    for i in range(12):
        for name, (i_dim, o_dim) in shapes.items():
            base = f"lora_te_text_model_encoder_layers_{i}_{name}"
            out[base + ".lora_down.weight"] = (torch.randn(rank, i_dim, generator=g) * 0.01).half()
            out[base + ".lora_up.weight"] = (torch.randn(o_dim, rank, generator=g) * 0.01).half()
            out[base + ".alpha"] = torch.tensor(float(rank)).half()
    return out

save_file(lora(1, 32), os.path.join(out_dir, "tiny-lora-a.safetensors"))
save_file(lora(2, 32), os.path.join(out_dir, "tiny-lora-b.safetensors"))
print(json.dumps(sorted(os.listdir(out_dir))))
'''

MODEL_FILES = ("tiny-sd15.safetensors", "tiny-taesd.safetensors", "tiny-lora-a.safetensors",
               "tiny-lora-b.safetensors")


def tiny_models(comfy: Path, python: str | None = None) -> Path:
    """Directory with MODEL_FILES, made once per (factory, ComfyUI version) and reused across sessions."""
    version = (comfy / "comfyui_version.py").read_text() if (comfy / "comfyui_version.py").exists() else ""
    stamp = hashlib.sha256((FACTORY + version).encode()).hexdigest()[:12]
    out = Path(tempfile.gettempdir()) / f"autocloud-tiny-models-{stamp}"
    if all((out / f).is_file() for f in MODEL_FILES) and (out / "sha256.json").is_file():
        return out
    work = Path(tempfile.mkdtemp(prefix="autocloud-tiny-models-"))
    script = work / "factory.py"
    script.write_text(FACTORY)
    proc = subprocess.run([python or comfy_python(comfy), str(script), str(comfy), str(work / "models")],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"tiny model factory failed:\n{proc.stderr[-3000:]}")
    sums = {}
    for f in MODEL_FILES:
        h = hashlib.sha256()
        with open(work / "models" / f, "rb") as fh:
            while chunk := fh.read(1 << 22):
                h.update(chunk)
        sums[f] = h.hexdigest()
    (work / "models" / "sha256.json").write_text(json.dumps(sums))
    try:
        os.rename(work / "models", out)
    except OSError:  # another session made it meanwhile
        shutil.rmtree(work, ignore_errors=True)
    return out


def model_sha256(models: Path, name: str) -> str:
    return json.loads((models / "sha256.json").read_text())[name]


class TimedNginx(NginxOrigin):
    """NginxOrigin whose access log also has when each request ended and how long it took."""

    def _config(self) -> str:
        return super()._config().replace("\\t$http_if_range'", "\\t$http_if_range\\t$msec\\t$request_time'")

    def intervals(self, path: str) -> list[tuple[float, float]]:
        """(start, end) epoch seconds of every request for `path` (ranged downloads give several)."""
        self._settle()
        want = "/" + path.lstrip("/")
        out = []
        for line in self.access_log.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) >= 8 and parts[1].split("?", 1)[0] == want and parts[0] == "GET":
                end, took = float(parts[6]), float(parts[7])
                out.append((end - took, end))
        return out

    def span(self, path: str) -> tuple[float, float] | None:
        iv = self.intervals(path)
        return (min(s for s, _ in iv), max(e for _, e in iv)) if iv else None


@dataclass
class Finished:
    prompt_id: str
    status: str  # "success" | "error"
    messages: list[Any]
    history: dict[str, Any]
    seconds: float

    def error(self) -> dict[str, Any] | None:
        for name, data in self.messages:
            if name == "execution_error":
                return data
        return None


class ComfyServer:
    """`python main.py --cpu` on a free port with its own base directory and this pack installed."""

    def __init__(self, comfy: Path, base: Path, env: dict[str, str] | None = None, python: str | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.comfy = comfy
        self.base = base
        self.env = env or {}
        self.python = python or comfy_python(comfy)
        self.extra_args = extra_args
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = base / "comfyui.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> ComfyServer:
        for sub in ("custom_nodes", "user", "models", "input", "output", "temp"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        settings = self.base / "user" / "default" / "comfy.settings.json"
        if not settings.exists():  # no first-run template dialog over the page in browser checks
            settings.parent.mkdir(parents=True, exist_ok=True)
            settings.write_text(json.dumps({"Comfy.TutorialCompleted": True}))
        link = self.base / "custom_nodes" / "ComfyUI-AutoCloud"
        if not link.exists():
            link.symlink_to(PACK_ROOT, target_is_directory=True)
        self.port = free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        env.setdefault("AUTOCLOUD_CONFIG", str(self.base / "no-global-config.yaml"))
        cmd = [self.python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch", *self.extra_args]
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, cwd=self.comfy, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=1)
                return self
            except (OSError, urllib.error.URLError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"ComfyUI did not answer in {timeout}s:\n{self.log()[-4000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        if self.proc is not None:
            self._log.close()
        self.proc = None

    def __enter__(self) -> ComfyServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                raw, status, ctype = r.read(), r.status, r.headers.get("Content-Type", "")
        except urllib.error.HTTPError as e:
            raw, status, ctype = e.read(), e.code, e.headers.get("Content-Type", "")
        return status, json.loads(raw) if "json" in ctype else raw.decode()

    def get(self, path: str, timeout: float = 30) -> Any:
        status, body = self.request("GET", path, timeout=timeout)
        if status != 200:
            raise urllib.error.URLError(f"GET {path}: {status} {body}")
        return body

    def queue(self, prompt: dict[str, Any], extra: dict[str, Any] | None = None) -> str:
        status, body = self.request("POST", "/prompt", {"prompt": prompt, **(extra or {})})
        if status != 200:
            raise AssertionError(f"/prompt refused ({status}): {body}")
        return str(body["prompt_id"])

    def wait(self, prompt_id: str, timeout: float = 120.0) -> Finished:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            hist = self.get(f"/history/{prompt_id}")
            item = hist.get(prompt_id)
            if item and item.get("status", {}).get("completed") is not None and (
                    item["status"].get("status_str") in ("success", "error")):
                st = item["status"]
                return Finished(prompt_id, st["status_str"], st.get("messages", []), item, time.monotonic() - t0)
            time.sleep(0.1)
        raise TimeoutError(f"prompt {prompt_id} not finished in {timeout}s; log:\n{self.log()[-3000:]}")

    def run(self, prompt: dict[str, Any], extra: dict[str, Any] | None = None, timeout: float = 120.0) -> Finished:
        return self.wait(self.queue(prompt, extra), timeout)


class WsCollector:
    """Every websocket message ComfyUI sends to one client id (a background thread with its own loop)."""

    def __init__(self, url: str, client_id: str) -> None:
        self.url = f"{url.replace('http', 'ws', 1)}/ws?clientId={client_id}"
        self.messages: list[dict[str, Any]] = []
        self.arrivals: list[float] = []  # time.time() each message arrived (same index as `messages`)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession() as s, s.ws_connect(self.url) as ws:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if msg.type == aiohttp.WSMsgType.TEXT:
                    self.arrivals.append(time.time())
                    self.messages.append(json.loads(msg.data))
                elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                    return

    def __enter__(self) -> WsCollector:
        self._thread.start()
        assert self._ready.wait(10), "websocket did not connect"
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def of(self, kind: str) -> list[dict[str, Any]]:
        return [m["data"] for m in self.messages if m.get("type") == kind]


def txt2img(ckpt: str, *, loras: tuple[str, ...] = (), vae: str | None = None, seed: int = 0,
            prefix: str = "autocloud") -> dict[str, Any]:
    """API-format prompt: checkpoint (+ LoRAs chained, + a separate VAE) -> 64x64, one step -> SaveImage."""
    p: dict[str, Any] = {"ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}}}
    model, clip = ["ckpt", 0], ["ckpt", 1]
    for i, name in enumerate(loras):
        p[f"lora{i}"] = {"class_type": "LoraLoader", "inputs": {"model": model, "clip": clip, "lora_name": name,
                                                                "strength_model": 1.0, "strength_clip": 1.0}}
        model, clip = [f"lora{i}", 0], [f"lora{i}", 1]
    vae_out: list[Any] = ["ckpt", 2]
    if vae is not None:
        p["vae"] = {"class_type": "VAELoader", "inputs": {"vae_name": vae}}
        vae_out = ["vae", 0]
    p.update({
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cloud", "clip": clip}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": clip}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {"model": model, "positive": ["pos", 0], "negative": ["neg", 0],
                                                       "latent_image": ["latent", 0], "seed": seed, "steps": 1,
                                                       "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                                                       "denoise": 1.0}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": vae_out}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": prefix}},
    })
    return p


PRELOAD_FILES = ("tiny-sd15-b.safetensors", "tiny-clip-l.safetensors", "tiny-unet.safetensors")


def preload_models(comfy: Path, python: str | None = None) -> Path:
    """tiny_models() plus what the preload tests need, derived from tiny-sd15 without ComfyUI:
    a second checkpoint (other UNet weights) for A -> B -> A switching, its CLIP-L as a text encoder file
    (`text_model.*` keys, as clip_l.safetensors) and its UNet as a diffusion model file."""
    models = tiny_models(comfy, python)
    if all((models / f).is_file() for f in PRELOAD_FILES):
        return models
    script = r'''
import os, sys
import torch
from safetensors.torch import load_file, save_file
d = sys.argv[1]
sd = load_file(os.path.join(d, "tiny-sd15.safetensors"))
g = torch.Generator().manual_seed(11)
unet = {k[len("model.diffusion_model."):]: v for k, v in sd.items() if k.startswith("model.diffusion_model.")}
clip = {k[len("cond_stage_model.transformer."):]: v for k, v in sd.items()
        if k.startswith("cond_stage_model.transformer.")}
b = dict(sd)
for k, v in unet.items():
    if v.dtype.is_floating_point and v.ndim > 1:
        b["model.diffusion_model." + k] = (torch.randn(v.shape, generator=g) * 0.02).to(v.dtype)
for name, data in (("tiny-sd15-b", b), ("tiny-clip-l", clip), ("tiny-unet", unet)):
    tmp = os.path.join(d, f".{name}.{os.getpid()}.tmp")
    save_file(data, tmp)
    os.replace(tmp, os.path.join(d, name + ".safetensors"))
'''
    proc = subprocess.run([python or comfy_python(comfy), "-c", script, str(models)], capture_output=True,
                          text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"preload model factory failed:\n{proc.stderr[-3000:]}")
    return models


def prompt_seconds(done: Finished) -> float:
    """execution_start -> execution_success from ComfyUI's own timestamps (ms), without polling delay."""
    stamps = {name: data.get("timestamp") for name, data in done.messages if isinstance(data, dict)}
    start, end = stamps.get("execution_start"), stamps.get("execution_success") or stamps.get("execution_error")
    if start is None or end is None:
        return done.seconds
    return (end - start) / 1000.0


def cached_nodes(done: Finished) -> set[str]:
    """Ids of nodes ComfyUI served from its execution cache (they did not run in this prompt)."""
    cached: set[str] = set()
    for name, data in done.messages:
        if name == "execution_cached":
            cached.update(data.get("nodes", []))
    return cached


def limited_origin(tmp_path_factory: Any, name: str, limit_rate: str = "1m") -> Iterator[TimedNginx]:
    """Body of a module-scoped `origin` fixture: nginx throttled per connection, or a skip saying why."""
    import pytest

    if not TimedNginx.available():
        pytest.skip("nginx is not on PATH (apt-get install -y nginx-light)")
    base = tmp_path_factory.mktemp(name)
    o = TimedNginx(base / "data", base / "run", limit_rate=limit_rate)
    o.start()
    try:
        yield o
    finally:
        o.stop()


def serve_adapter_routes(adapter: Any, body: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run `body(http)` against the adapter's /autocloud routes on a real aiohttp server (loopback)."""
    import aiohttp
    from aiohttp import web

    from comfy_autocloud.comfy.routes import route_defs

    async def main() -> Any:
        app = web.Application()
        app.add_routes(route_defs(adapter))
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with aiohttp.ClientSession(base_url=f"http://127.0.0.1:{port}") as http:
                return await body(http)
        finally:
            await runner.cleanup()

    return asyncio.run(main())
