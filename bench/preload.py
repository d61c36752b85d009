"""Benchmark the memory preload against ComfyUI's stock loaders, inside a real ComfyUI (COMFYUI_PATH).

    COMFYUI_PATH=/path/to/ComfyUI python bench/preload.py [--fresh 3] [--reps 5] [--tiny] [--first load|txt2img]

Models: two real-size SD1.5 checkpoints (~2 GiB each: the full 860M-parameter UNet, CLIP-L and KL VAE in
fp16, random weights, made once with ComfyUI's own classes and kept beside the test models); `--tiny` uses
the tests' ~445 MiB ones (tiny UNet) for a quick run.
Fresh servers of two kinds: stock ones, and ones with a preload_config.json in the user dir
(`auto_gpu_load`: each model also put on its device and run once on a tiny 32 px input at start-up); the
first prompt is queued once the preload reports `phase: ready`, as after a Modal memory-snapshot restore.
The page cache is dropped before each server starts when /proc/sys/vm/drop_caches is writable (a cold start
reads its models and libraries from disk; said so when not; `--warm` keeps it).
Case 1, first prompt: seconds from queueing the first prompt of a fresh server to its end reaching the
client (the websocket's final `executing` message: what its user waits), median over --fresh servers of each kind:
CheckpointLoaderSimple vs the Cached Checkpoint Loader, same workflow otherwise, with each node's share
(websocket 'executing' times). `--first load` (default): a load-only prompt (the loader plus PreviewAny),
target >= 10x; `--first txt2img`: a 64x64 one-step txt2img (a size the start-up warm-up never ran).
Case 2, switching back: A -> B -> A; the time of the prompt that loads A again (a loader plus
PreviewAny, so the loader is what is measured), median of --reps: stock vs cached loader.
With `--first txt2img` also a second prompt on each server (new seed and texts, the loader's output cached by
ComfyUI): the workflow's own compute on a warm server, which no preloader can go below.
Servers of the two kinds are interleaved (both see the same machine over time). Prints each kind's runs with
the first prompt's time per node, then one line, speed-ups last (stock time / preloaded time; targets: first
load-only prompt >= 10x, switch back >= 20x).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from comfy_env import (  # noqa: E402
    ComfyServer,
    WsCollector,
    comfy_python,
    comfyui_path,
    preload_models,
    prompt_seconds,
    txt2img,
)

TINY = ("tiny-sd15.safetensors", "tiny-sd15-b.safetensors")
FULL = ("sd15-full-a.safetensors", "sd15-full-b.safetensors")
CACHED = "AutoCloudCachedCheckpointLoader"
STOCK = "CheckpointLoaderSimple"
NODES = ("ckpt", "pos", "neg", "latent", "sample", "decode", "save")
LOAD_NODES = ("ckpt", "show")

FULL_FACTORY = r'''
import os, sys
comfy_path, models = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_path)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import torch
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import load_file, save_file
# SD1.5's UNet as ComfyUI's model_detection describes it (860M parameters)
cfg = dict(use_checkpoint=False, image_size=32, out_channels=4, use_spatial_transformer=True, legacy=False,
           adm_in_channels=None, in_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
           transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], channel_mult=[1, 2, 4, 4], transformer_depth_middle=1,
           use_linear_in_transformer=False, context_dim=768, num_heads=8,
           transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], use_temporal_resblock=False,
           use_temporal_attention=False)
shapes = UNetModel(**cfg, device="meta", operations=comfy.ops.disable_weight_init).state_dict()
tiny = load_file(os.path.join(models, "tiny-sd15.safetensors"))  # its real-shape CLIP-L and KL VAE
rest = {k: v for k, v in tiny.items() if not k.startswith("model.diffusion_model.")}
for seed, name in ((1, "sd15-full-a"), (2, "sd15-full-b")):
    g = torch.Generator().manual_seed(seed)
    sd = dict(rest)
    for k, v in shapes.items():
        if "norm" in k and k.endswith("weight"):
            t = torch.ones(v.shape)
        elif k.endswith("bias"):
            t = torch.zeros(v.shape)
        else:
            t = torch.randn(v.shape, generator=g) * 0.02
        sd["model.diffusion_model." + k] = t.to(torch.float16).contiguous()
    tmp = os.path.join(models, f".{name}.{os.getpid()}.tmp")
    save_file(sd, tmp)
    os.replace(tmp, os.path.join(models, name + ".safetensors"))
'''


def full_models(comfy: Path, models: Path) -> Path:
    """Two real-size SD1.5 checkpoints beside the test models (made once, ~2 GiB each)."""
    if not all((models / f).is_file() for f in FULL):
        print("  making two real-size SD1.5 checkpoints (once)...", flush=True)
        proc = subprocess.run([comfy_python(comfy), "-c", FULL_FACTORY, str(comfy), str(models)],
                              capture_output=True, text=True, timeout=1800)
        if proc.returncode != 0:
            raise RuntimeError(f"checkpoint factory failed:\n{proc.stderr[-3000:]}")
    return models


def server(comfy: Path, models: Path, work: Path, name: str, preload: bool, ckpts: tuple[str, str]) -> ComfyServer:
    root = work / name
    (root / "models" / "checkpoints").mkdir(parents=True)
    for f in ckpts:
        (root / "models" / "checkpoints" / f).symlink_to(models / f)
    if preload:
        (root / "user").mkdir(parents=True)
        (root / "user" / "preload_config.json").write_text(json.dumps(
            {"version": "1.0", "models": {"checkpoints": [{"name": f} for f in ckpts]},
             "settings": {"auto_gpu_load": True}}))
    return ComfyServer(comfy, root, env={"AUTOCLOUD_CACHE": str(work / f"{name}-cache")})


def wait_preloaded(srv: ComfyServer, timeout: float = 600.0) -> float:
    """Seconds until the start-up preload (loads, device load, warm-up) is done."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = srv.get("/autocloud/preload")
        if st["counts"]["queued"] == 0 and st["counts"]["loading"] == 0 and st.get("phase") == "ready":
            if st["counts"]["ready"] != 2:
                raise RuntimeError(f"preload failed: {st}")
            return time.monotonic() - t0
        time.sleep(0.05)
    raise TimeoutError("preload did not finish")


class NodeClock(WsCollector):
    """When each node of a prompt started: the arrival times of ComfyUI's websocket 'executing' messages."""

    @property
    def events(self) -> list[tuple[float, str | None]]:
        return [(t, m["data"].get("node")) for t, m in zip(self.arrivals, self.messages, strict=False)
                if m.get("type") == "executing"]

    def took(self, node: str) -> float | None:
        """Seconds from `node` starting to the next node starting (its own run time, plus message latency)."""
        events = self.events
        for (t, n), (t2, _) in itertools.pairwise(events):
            if n == node:
                return t2 - t
        return None


def first_prompt(srv: ComfyServer, loader: str, ckpt: str, kind: str) -> tuple[float, dict[str, float]]:
    """(seconds from queueing the first prompt to its end reaching the client, seconds per node + 'queued'
    before the first node + 'executed' (ComfyUI's own execution_start -> execution_success)).

    The end is the arrival of the websocket's final `executing` message (node None), what the page waits
    for: ComfyUI may hold its event loop after a prompt (its prompt worker's `gc.collect()`), and a user
    waits for that too."""
    if kind == "load":
        p = loader_only(ckpt, loader)
    else:
        p = txt2img(ckpt, seed=1, prefix="bench")
        p["ckpt"]["class_type"] = loader
    with NodeClock(srv.url, "bench") as clock:
        t0 = time.time()
        done = srv.wait(srv.queue(p, {"client_id": "bench"}), timeout=600)
        deadline = time.monotonic() + 30
        while not any(n is None for _t, n in clock.events) and time.monotonic() < deadline:
            time.sleep(0.01)
    if done.status != "success":
        raise RuntimeError(f"first prompt failed: {done.error()}")
    arrived = [t for t, n in clock.events if n is None]
    if not arrived:
        raise RuntimeError("the first prompt's end never reached the websocket")
    nodes = {n: clock.took(n) or 0.0 for n in (NODES if kind == "txt2img" else LOAD_NODES)}
    nodes["queued"] = clock.events[0][0] - t0 if clock.events else float("nan")
    nodes["executed"] = prompt_seconds(done)
    return arrived[0] - t0, nodes


def second_prompt(srv: ComfyServer, loader: str, ckpt: str) -> float:
    """The same workflow again with a new seed and new texts: every node but the loader (cached by ComfyUI)
    runs again on a warm server, so this is the workflow's own compute, the floor for any first prompt."""
    p = txt2img(ckpt, seed=2, prefix="bench")
    p["ckpt"]["class_type"] = loader
    p["pos"]["inputs"]["text"] = "another cloud, at dusk"
    p["neg"]["inputs"]["text"] = "blurry"
    done = srv.run(p, timeout=600)
    if done.status != "success":
        raise RuntimeError(f"second prompt failed: {done.error()}")
    return prompt_seconds(done)


def loader_only(ckpt: str, loader: str) -> dict[str, Any]:
    return {"ckpt": {"class_type": loader, "inputs": {"ckpt_name": ckpt}},
            "show": {"class_type": "PreviewAny", "inputs": {"source": ["ckpt", 0]}}}


def switch_back(srv: ComfyServer, loader: str, reps: int, ckpts: tuple[str, str]) -> float:
    a, b = ckpts
    times = []
    for _ in range(reps):
        for ckpt in (b, a):
            done = srv.run(loader_only(ckpt, loader), timeout=600)
            if done.status != "success":
                raise RuntimeError(f"switch prompt failed: {done.error()}")
        times.append(prompt_seconds(done))
    return statistics.median(times)


def drop_caches() -> bool:
    try:
        subprocess.run(["sync"], check=False)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def breakdown(nodes: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in sorted(nodes.items(), key=lambda kv: kv[0] != "queued"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="switch-back repetitions per server")
    ap.add_argument("--fresh", type=int, default=3, help="fresh servers of each kind (first-prompt median)")
    ap.add_argument("--warm", action="store_true", help="keep the page cache (files and libraries already in RAM)")
    ap.add_argument("--tiny", action="store_true", help="the tests' ~445 MiB checkpoints (tiny UNet): a quick run")
    ap.add_argument("--first", choices=("load", "txt2img"), default="load",
                    help="the first prompt: load-only (loader + PreviewAny, default) or a one-step txt2img")
    args = ap.parse_args()
    comfy = comfyui_path()
    if comfy is None:
        print("bench/preload.py needs a ComfyUI checkout: set COMFYUI_PATH=/path/to/ComfyUI "
              "(and COMFYUI_PYTHON if its venv is not ../comfyui-venv)", file=sys.stderr)
        return 2
    models = preload_models(comfy)
    ckpts = TINY if args.tiny else FULL
    if not args.tiny:
        full_models(comfy, models)
    size = (models / ckpts[0]).stat().st_size
    kinds = (("stock", False, STOCK), ("preloaded", True, CACHED))
    runs: dict[str, dict[str, list[Any]]] = {k[0]: {"first": [], "back": [], "up": [], "pre": [], "parts": [],
                                                 "second": []}
                                             for k in kinds}
    dropped = True
    with tempfile.TemporaryDirectory(prefix="autocloud-bench-preload-") as tmp:
        for i in range(args.fresh):
            for name, preload, loader in kinds:  # interleaved: both kinds see the same machine over time
                r = runs[name]
                srv = server(comfy, models, Path(tmp), f"{name}{i}", preload, ckpts)
                dropped = (not args.warm and drop_caches()) and dropped
                t0 = time.monotonic()
                with srv:
                    r["up"].append(time.monotonic() - t0)
                    r["pre"].append(wait_preloaded(srv) if preload else 0.0)
                    first, nodes = first_prompt(srv, loader, ckpts[0], args.first)
                    r["first"].append(first)
                    r["parts"].append(nodes)
                    if args.first == "txt2img":
                        r["second"].append(second_prompt(srv, loader, ckpts[0]))
                    r["back"].append(switch_back(srv, loader, args.reps, ckpts))
    results: dict[str, dict[str, Any]] = {}
    for name, _, _ in kinds:
        r = runs[name]
        firsts = r["first"]
        mid = sorted(range(len(firsts)), key=firsts.__getitem__)[len(firsts) // 2]
        results[name] = {"first": firsts[mid], "back": statistics.median(r["back"]),
                         "second": statistics.median(r["second"]) if r["second"] else None}
        second = f"second prompt {', '.join(f'{x:.3f}' for x in r['second'])}s, " if r["second"] else ""
        print(f"  {name:9s}: server up {statistics.median(r['up']):.2f}s, preload done "
              f"{statistics.median(r['pre']):.2f}s later, first prompt {', '.join(f'{f:.3f}' for f in firsts)}s, "
              f"{second}switch back to A {', '.join(f'{b * 1000:.1f}' for b in r['back'])} ms")
        for i, nodes in enumerate(r["parts"]):
            print(f"  {'':9s}  {'median ' if i == mid else ''}first prompt {firsts[i]:.3f}s by node (s): "
                  f"{breakdown(nodes)}")
    if not dropped:
        why = "--warm" if args.warm else "/proc/sys/vm/drop_caches not writable"
        print(f"  (page cache not dropped ({why}): files and libraries were read from RAM)")
    s, p = results["stock"], results["preloaded"]
    what = "load-only" if args.first == "load" else "txt2img"
    floor = ""
    if p["second"] is not None:
        floor = (f"; the workflow's own compute (second prompt, new seed and texts, warm): {p['second']:.3f}s = "
                 f"{p['second'] / s['first']:.3f}x of stock's first prompt, the floor for any preloader here")
    print(f"first {what} prompt of a fresh server (checkpoint {size / 2**20:.0f} MiB, median of {args.fresh}): "
          f"stock {s['first']:.3f}s, preloaded {p['first']:.3f}s; switch back to a checkpoint used before: stock "
          f"{s['back'] * 1000:.1f} ms, cached {p['back'] * 1000:.1f} ms{floor}; "
          f"speedup_first={s['first'] / p['first']:.1f}x (target >= 10x) "
          f"speedup_switch_back={s['back'] / p['back']:.1f}x (target >= 20x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
