"""Cache-hit latency: `FetchService.ensure()` on a cached 1 GiB file vs huggingface_hub's offline cache hit.

Both answer "give me the local path of this model" without touching the network. Target: ours <= 5 ms.
Prints one line, ratio last (alternative time / ours: >1 means ours is faster).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from comfy_autocloud.fetch import FetchService
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.store import Store
from comfy_autocloud.units import human_size, parse_size


def _write(path: Path, size: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(8 << 20)
    with open(path, "wb") as fh:
        left = size
        while left:
            fh.write(block[: min(left, len(block))])
            left -= min(left, len(block))


def _timed(fn, n: int) -> tuple[float, float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    samples.sort()
    return statistics.median(samples) * 1000, samples[int(len(samples) * 0.99) - 1] * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--n", type=int, default=2000)
    args = ap.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="autocloud-bench-hit-") as tmp:
        root = Path(tmp)
        cache = root / "cache"
        _write(cache / "checkpoints" / "big.safetensors", size)
        store = Store(cache)
        store.adopt("checkpoints/big.safetensors")
        svc = FetchService(store)
        spec = ModelSpec(folder="checkpoints", filename="big.safetensors",
                         sources=("https://origin.invalid/big.safetensors",))
        ours_med, ours_p99 = _timed(lambda: svc.ensure(spec), args.n)

        alt = "none"
        alt_med = float("nan")
        try:
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
            from huggingface_hub import hf_hub_download

            hub = root / "hub"
            repo = hub / "models--bench--model"
            blob = repo / "blobs" / ("0" * 64)
            blob.parent.mkdir(parents=True)
            os.link(cache / "checkpoints" / "big.safetensors", blob)
            snap = repo / "snapshots" / ("a" * 40)
            snap.mkdir(parents=True)
            (snap / "big.safetensors").symlink_to(os.path.relpath(blob, snap))
            (repo / "refs").mkdir()
            (repo / "refs" / "main").write_text("a" * 40)

            def hf_hit() -> None:
                hf_hub_download("bench/model", "big.safetensors", cache_dir=str(hub))

            alt_med, _ = _timed(hf_hit, max(200, args.n // 10))
            alt = "hf_hub_download(offline)"
        except ImportError:
            pass
        ratio = alt_med / ours_med if alt != "none" else float("nan")
        print(f"cache_hit size={human_size(size)} ours_median={ours_med:.3f}ms ours_p99={ours_p99:.3f}ms "
              f"{alt}={alt_med:.3f}ms target<=5ms ratio_vs_hf={ratio:.2f}")
        store.close()


if __name__ == "__main__":
    main()
