"""Benchmark: predictive preloading (transitions + hour of day) vs "most popular overall", same trace.

    python bench/predict.py [--runs 3000] [--seed 0] [--capacity 16G] [--trace out.csv]

Generates a workflow trace (20 workflows, each a checkpoint -> 1-3 LoRAs -> VAE in a fixed order; a
morning crowd and an evening crowd use different workflows; 60% of runs are a crowd's four favourites),
writes it as the `timestamp,key,size` CSV that `autocloud predict --evaluate` reads, and replays it
through `comfy_autocloud.predict.evaluate`: train on the first 70%, score the rest. Prints the JSON,
then one line of ratios against the baseline (top-1, top-3) and the byte hit ratio with and without
prefetching.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from comfy_autocloud.predict import evaluate  # noqa: E402
from comfy_autocloud.units import parse_size  # noqa: E402
from traces import workflow_trace  # noqa: E402

MiB = 2**20


def trace_for(runs: int, seed: int) -> list[tuple[float, str, int]]:
    """Eight checkpoints, 30 LoRAs, 20 workflows of which four per half day are favourites (60%)."""
    return workflow_trace(runs, seed, checkpoints=8, loras=30, flows=20, start=1.7e9, max_gap=1200, favourites=0.6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--capacity", default=None, help="simulated cache size (default: half the distinct bytes)")
    ap.add_argument("--trace", type=Path, default=None, help="also write the trace CSV here")
    args = ap.parse_args()
    trace = trace_for(args.runs, args.seed)
    if args.trace is not None:
        with args.trace.open("w", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["timestamp", "key", "size"])
            w.writerows(trace)
    cap = parse_size(args.capacity) if args.capacity else None
    t0 = time.perf_counter()
    r = evaluate(trace, capacity=cap)
    took = time.perf_counter() - t0
    print(json.dumps(r, indent=1))
    base = r["baseline"]
    assert isinstance(base, dict)
    print(f"{len(trace)} requests, {took:.2f}s: top-1 {r['top1']:.3f} vs {base['top1']:.3f} most-popular "
          f"({r['top1'] / max(base['top1'], 1e-9):.1f}x), top-3 {r['top3']:.3f} vs {base['top3']:.3f} "
          f"({r['top3'] / max(base['top3'], 1e-9):.1f}x); useful/prefetched "
          f"{r['useful_bytes'] / max(1, r['prefetched_bytes']):.2f}; byte hit ratio {r['byte_hit_ratio']:.3f} "
          f"with prefetch vs {r['no_prefetch_byte_hit_ratio']:.3f} without")


if __name__ == "__main__":
    main()
