"""Benchmark the memory preload against ComfyUI's stock loaders, inside a real ComfyUI (COMFYUI_PATH).

    COMFYUI_PATH=/path/to/ComfyUI python bench/preload.py [--fresh 3] [--reps 5]

Fresh servers on the same tiny SD1.5-architecture checkpoints (~445 MiB each): stock ones, and ones
with a preload_config.json in the user dir (preloading finished before the first prompt, as after a
Modal memory-snapshot restore). The page cache is dropped before each server starts when
/proc/sys/vm/drop_caches is writable (a cold start reads its models from disk; said so when not;
`--warm` keeps it).
Case 1, first prompt: seconds from queueing the first txt2img prompt of a fresh server to its end
(ComfyUI's execution_success timestamp), median over --fresh servers of each kind:
CheckpointLoaderSimple vs the Cached Checkpoint Loader.
Case 2, switching back: A -> B -> A; the time of the prompt that loads A again (a loader plus
PreviewAny, so the loader is what is measured), median of --reps: stock vs cached loader.
Prints one line per case, ratio last (targets: <= 0.2x and <= 10 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from comfy_env import ComfyServer, comfyui_path, preload_models, prompt_seconds, txt2img  # noqa: E402

A, B = "tiny-sd15.safetensors", "tiny-sd15-b.safetensors"
CACHED = "AutoCloudCachedCheckpointLoader"
STOCK = "CheckpointLoaderSimple"


def server(comfy: Path, models: Path, work: Path, name: str, preload: bool) -> ComfyServer:
    root = work / name
    (root / "models" / "checkpoints").mkdir(parents=True)
    for f in (A, B):
        (root / "models" / "checkpoints" / f).symlink_to(models / f)
    if preload:
        (root / "user").mkdir(parents=True)
        (root / "user" / "preload_config.json").write_text(json.dumps(
            {"version": "1.0", "models": {"checkpoints": [{"name": A}, {"name": B}]}, "settings": {}}))
    return ComfyServer(comfy, root, env={"AUTOCLOUD_CACHE": str(work / f"{name}-cache")})


def wait_preloaded(srv: ComfyServer, timeout: float = 300.0) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        st = srv.get("/autocloud/preload")
        if st["counts"]["queued"] == 0 and st["counts"]["loading"] == 0:
            if st["counts"]["ready"] != 2:
                raise RuntimeError(f"preload failed: {st}")
            return time.monotonic() - t0
        time.sleep(0.05)
    raise TimeoutError("preload did not finish")


class NodeClock:
    """Arrival times of ComfyUI's websocket 'executing' messages: when each node of a prompt started."""

    def __init__(self, url: str, client_id: str) -> None:
        import aiohttp

        self.aiohttp = aiohttp
        self.url = f"{url.replace('http', 'ws', 1)}/ws?clientId={client_id}"
        self.events: list[tuple[float, str | None]] = []
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        async with self.aiohttp.ClientSession() as s, s.ws_connect(self.url) as ws:
            self._ready.set()
            while not self._stop.is_set():
                try:
                    msg = await ws.receive(timeout=0.2)
                except asyncio.TimeoutError:
                    continue
                if msg.type == self.aiohttp.WSMsgType.TEXT:
                    data = json.loads(msg.data)
                    if data.get("type") == "executing":
                        self.events.append((time.time(), data["data"].get("node")))

    def __enter__(self) -> NodeClock:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def took(self, node: str) -> float | None:
        """Seconds from `node` starting to the next node starting (its own run time, plus message latency)."""
        for (t, n), (t2, _) in zip(self.events, self.events[1:], strict=False):
            if n == node:
                return t2 - t
        return None


def first_prompt(srv: ComfyServer, loader: str) -> tuple[float, float | None]:
    """(seconds from queueing to the end of the first prompt, seconds its checkpoint loader node took)."""
    p = txt2img(A, seed=1, prefix="bench")
    p["ckpt"]["class_type"] = loader
    with NodeClock(srv.url, "bench") as clock:
        t0 = time.time()
        done = srv.wait(srv.queue(p, {"client_id": "bench"}), timeout=300)
    if done.status != "success":
        raise RuntimeError(f"first prompt failed: {done.error()}")
    end = next((d["timestamp"] for n, d in done.messages if n == "execution_success"), None)
    return ((end / 1000.0 - t0) if end is not None else done.seconds), clock.took("ckpt")


def loader_only(ckpt: str, loader: str) -> dict[str, Any]:
    return {"ckpt": {"class_type": loader, "inputs": {"ckpt_name": ckpt}},
            "show": {"class_type": "PreviewAny", "inputs": {"source": ["ckpt", 0]}}}


def switch_back(srv: ComfyServer, loader: str, reps: int) -> float:
    times = []
    for _ in range(reps):
        for ckpt in (B, A):
            done = srv.run(loader_only(ckpt, loader), timeout=300)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5, help="switch-back repetitions per server")
    ap.add_argument("--fresh", type=int, default=3, help="fresh servers of each kind (first-prompt median)")
    ap.add_argument("--warm", action="store_true", help="keep the page cache (files and libraries already in RAM)")
    args = ap.parse_args()
    comfy = comfyui_path()
    if comfy is None:
        print("bench/preload.py needs a ComfyUI checkout: set COMFYUI_PATH=/path/to/ComfyUI "
              "(and COMFYUI_PYTHON if its venv is not ../comfyui-venv)", file=sys.stderr)
        return 2
    models = preload_models(comfy)
    size = (models / A).stat().st_size
    results: dict[str, dict[str, float]] = {}
    dropped = True
    with tempfile.TemporaryDirectory(prefix="autocloud-bench-preload-") as tmp:
        for name, preload, loader in (("stock", False, STOCK), ("preloaded", True, CACHED)):
            firsts, backs, ups, pres, nodes = [], [], [], [], []
            for i in range(args.fresh):
                srv = server(comfy, models, Path(tmp), f"{name}{i}", preload)
                dropped = (not args.warm and drop_caches()) and dropped
                t0 = time.monotonic()
                with srv:
                    ups.append(time.monotonic() - t0)
                    pres.append(wait_preloaded(srv) if preload else 0.0)
                    first, node = first_prompt(srv, loader)
                    firsts.append(first)
                    nodes.append(node if node is not None else float("nan"))
                    backs.append(switch_back(srv, loader, args.reps))
            results[name] = {"first": statistics.median(firsts), "back": statistics.median(backs),
                             "node": statistics.median(nodes)}
            print(f"  {name:9s}: server up {statistics.median(ups):.2f}s, preload done "
                  f"{statistics.median(pres):.2f}s later, first prompt {', '.join(f'{f:.3f}' for f in firsts)}s "
                  f"(its loader node {', '.join(f'{n:.3f}' for n in nodes)}s), "
                  f"switch back to A {', '.join(f'{b * 1000:.1f}' for b in backs)} ms")
    if not dropped:
        why = "--warm" if args.warm else "/proc/sys/vm/drop_caches not writable"
        print(f"  (page cache not dropped ({why}): files and libraries were read from RAM)")
    s, p = results["stock"], results["preloaded"]
    print(f"first prompt of a fresh server (checkpoint {size / 2**20:.0f} MiB, median of {args.fresh}): "
          f"stock {s['first']:.3f}s, preloaded {p['first']:.3f}s, ratio {p['first'] / s['first']:.3f}x"
          " (target <= 0.2x)")
    print(f"  of which the checkpoint loader node: stock {s['node']:.3f}s, cached {p['node'] * 1000:.1f} ms")
    print(f"switch back to a checkpoint used before: stock {s['back'] * 1000:.1f} ms, cached "
          f"{p['back'] * 1000:.1f} ms (median of {args.reps} per server), ratio {p['back'] / s['back']:.4f}x "
          "(target <= 10 ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
