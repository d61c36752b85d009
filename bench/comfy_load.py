"""Benchmark the ComfyUI adapter against the alternatives, inside a real ComfyUI (COMFYUI_PATH).

    COMFYUI_PATH=/path/to/ComfyUI python bench/comfy_load.py [--rate 2m] [--reps 3]

Case 1, checkpoint load: ComfyUI's stock loader (`comfy.sd.load_checkpoint_guess_config`, tensors
touched) on a ~445 MiB SD1.5-architecture checkpoint read from the "volume" with the page cache
dropped (when /proc/sys/vm/drop_caches is writable; otherwise said so) vs the same file after warmup
copied it to the local cache (warmup's `run_warmup` when present, else the FetchService with a
file:// source, which is what warmup does), median of `--reps`.
Case 2, three missing models (two LoRAs and a VAE) from a throttled origin (nginx `limit_rate` per
connection): seconds from POST /prompt to done with workflow prefetch (ours) vs the same server with
AUTOCLOUD_PREFETCH=0, where each loader fetches its model when execution reaches it, one after another.
Both servers have already run the checkpoint once, so only the three models differ.
Prints one line per case, ratio last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from comfy_autocloud.fetch.service import FetchService  # noqa: E402
from comfy_autocloud.manifest.spec import ModelSpec  # noqa: E402
from comfy_autocloud.store import Store  # noqa: E402
from comfy_env import ComfyServer, TimedNginx, comfy_python, comfyui_path, tiny_models, txt2img  # noqa: E402

CKPT = "tiny-sd15.safetensors"
MISSING = ("tiny-lora-a.safetensors", "tiny-lora-b.safetensors", "tiny-taesd.safetensors")

LOAD_SCRIPT = r'''
import sys, time, json
comfy_path, path = sys.argv[1], sys.argv[2]
sys.path.insert(0, comfy_path)
sys.argv = [sys.argv[0], "--cpu"]
import comfy.options
comfy.options.enable_args_parsing()
import comfy.sd, torch
t0 = time.perf_counter()
out = comfy.sd.load_checkpoint_guess_config(path, output_vae=True, output_clip=True)
total = 0.0
for sd in (out[0].model.state_dict(), out[1].cond_stage_model.state_dict(), out[2].first_stage_model.state_dict()):
    for t in sd.values():
        total += float(t.view(-1)[0])
print(json.dumps({"seconds": time.perf_counter() - t0}))
'''


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def load_seconds(python: str, comfy: Path, path: Path, script: Path) -> float:
    out = subprocess.run([python, str(script), str(comfy), str(path)], capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        raise SystemExit(f"checkpoint load failed:\n{out.stderr[-2000:]}")
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


def warm_copy(volume_comfy: Path, cache: Path) -> tuple[Path, str]:
    """Warm the checkpoint into `cache` the way `autocloud warmup` does; returns (path, how)."""
    try:
        from comfy_autocloud.warmup import WarmupPaths, load_plan, run_warmup

        conf = cache.parent / "warmup_models.conf"
        conf.write_text(f"checkpoints/{CKPT}\n")
        paths = WarmupPaths(volume_comfy, cache)
        with Store(cache) as store:
            run_warmup(store, load_plan(conf, paths))
        how = "autocloud warmup"
    except (ImportError, TypeError, AttributeError):
        src = volume_comfy / "models" / "checkpoints" / CKPT
        with Store(cache) as store:
            FetchService(store).fetch(ModelSpec(folder="checkpoints", filename=CKPT, sources=(f"file://{src}",)))
        how = "FetchService file://"
    return cache / "checkpoints" / CKPT, how


def case_load(comfy: Path, models: Path, work: Path, reps: int) -> None:
    python = comfy_python(comfy)
    work.mkdir(parents=True)
    script = work / "load.py"
    script.write_text(LOAD_SCRIPT)
    volume = work / "volume" / "ComfyUI"
    (volume / "models" / "checkpoints").mkdir(parents=True)
    shutil.copy(models / CKPT, volume / "models" / "checkpoints" / CKPT)
    src = volume / "models" / "checkpoints" / CKPT
    cold, warm = [], []
    dropped = False
    for _ in range(reps):
        dropped = drop_caches()
        cold.append(load_seconds(python, comfy, src, script))
    cache = work / "fast_cache"
    if cache.exists():
        shutil.rmtree(cache)
    dropped_before_warmup = drop_caches()
    t0 = time.perf_counter()
    fast, how = warm_copy(volume, cache)
    warm_s = time.perf_counter() - t0
    for _ in range(reps):
        warm.append(load_seconds(python, comfy, fast, script))
    c, w = statistics.median(cold), statistics.median(warm)
    label = "cold page cache" if dropped else "page cache NOT dropped (no permission)"
    print(f"checkpoint load ({(models / CKPT).stat().st_size / 2**20:.0f} MiB, stock loader): "
          f"volume ({label}) {c:.2f} s | after warmup ({how}, {warm_s:.2f} s copy"
          f"{' from cold' if dropped_before_warmup else ''}) {w:.2f} s | ratio {c / w:.2f}x", flush=True)


def _prompt_time(comfy: Path, models: Path, work: Path, origin: TimedNginx, prefetch: bool) -> float:
    base = work / ("prefetch" if prefetch else "serial")
    (base / "comfyui" / "models" / "checkpoints").mkdir(parents=True)
    shutil.copy(models / CKPT, base / "comfyui" / "models" / "checkpoints" / CKPT)
    manifest = {"loras": {n: origin.url(f"/slow/{n}") for n in MISSING[:2]},
                "vae": {MISSING[2]: origin.url(f"/slow/{MISSING[2]}")}}
    (base / "manifest.json").write_text(json.dumps(manifest))
    env = {"AUTOCLOUD_CACHE": str(base / "cache"), "AUTOCLOUD_MANIFEST": str(base / "manifest.json"),
           "AUTOCLOUD_PREFETCH": "1" if prefetch else "0", "AUTOCLOUD_CONNECTIONS": "2"}
    with ComfyServer(comfy, base / "comfyui", env=env, extra_args=("--force-fp32",)) as srv:
        first = srv.run(txt2img(CKPT, seed=1), timeout=300)  # checkpoint in ComfyUI's execution cache
        if first.status != "success":
            raise SystemExit(f"warm-up prompt failed: {first.error()}")
        t0 = time.perf_counter()
        done = srv.run(txt2img(CKPT, loras=MISSING[:2], vae=MISSING[2], seed=2), timeout=300)
        took = time.perf_counter() - t0
        if done.status != "success":
            raise SystemExit(f"prompt failed: {done.error()}")
    return took


def case_prefetch(comfy: Path, models: Path, work: Path, rate: str) -> None:
    www = work / "www"
    www.mkdir(parents=True)
    for n in MISSING:
        shutil.copy(models / n, www / n)
    with TimedNginx(www, work / "nginx", limit_rate=rate) as origin:
        serial = _prompt_time(comfy, models, work, origin, prefetch=False)
        ours = _prompt_time(comfy, models, work, origin, prefetch=True)
    total = sum((models / n).stat().st_size for n in MISSING) / 2**20
    print(f"prompt with 3 missing models ({total:.0f} MiB, origin {rate}/s per connection, 2 connections): "
          f"one after another (loader fetch) {serial:.2f} s | prefetch (ours) {ours:.2f} s | "
          f"ratio {serial / ours:.2f}x", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rate", default="2m", help="nginx limit_rate per connection for the missing models")
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each checkpoint load")
    args = ap.parse_args()
    comfy = comfyui_path()
    if comfy is None:
        print("COMFYUI_PATH is not set (or has no main.py): this benchmark runs a real ComfyUI; "
              "set COMFYUI_PATH to a ComfyUI checkout (and COMFYUI_PYTHON to its interpreter)", file=sys.stderr)
        return 2
    if not TimedNginx.available():
        print("nginx not found: apt-get install -y nginx-light", file=sys.stderr)
        return 2
    models = tiny_models(comfy)
    with tempfile.TemporaryDirectory(prefix="autocloud-bench-comfy-") as tmp:
        work = Path(tmp)
        case_load(comfy, models, work / "load", args.reps)
        case_prefetch(comfy, models, work / "prefetch", args.rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
