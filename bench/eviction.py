"""Byte hit ratio of the default eviction policy against LRU (the strongest simple baseline) on seeded traces.

Usage: python bench/eviction.py [--seeds 3] [--requests 5000] [--capacities 50G,100G,200G,400G]

One line per (trace, capacity), averaged over the seeds:
  eviction trace=zipf capacity=100G lru_bhr=0.367 default_bhr=0.434 ratio=1.18 lfuda_bhr=... gdsf_bhr=...
ratio = default_bhr / lru_bhr (above 1: the default policy downloads fewer bytes than LRU would).
Trace "zipf" is the realistic mix (Zipf-popular library + one-off scans); "zipf-noscan" has no scans,
the case most favourable to LRU.
"""

from __future__ import annotations

import argparse
import sys
import time

from comfy_autocloud.store.simulate import simulate, zipf_trace
from comfy_autocloud.units import parse_size

POLICIES = ("lru", "default", "lfuda", "gdsf")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=5000)
    ap.add_argument("--capacities", default="50G,100G,200G,400G")
    args = ap.parse_args(argv)
    caps = [c.strip() for c in args.capacities.split(",") if c.strip()]
    t0 = time.perf_counter()
    for trace_name, scan_share in (("zipf", 0.15), ("zipf-noscan", 0.0)):
        traces = [zipf_trace(seed=s, requests=args.requests, scan_share=scan_share)
                  for s in range(args.seeds)]
        for cap_text in caps:
            cap = parse_size(cap_text)
            bhr = {p: sum(simulate(t, cap, p).byte_hit_ratio for t in traces) / len(traces) for p in POLICIES}
            ratio = bhr["default"] / bhr["lru"] if bhr["lru"] else float("inf")
            print(f"eviction trace={trace_name} capacity={cap_text} lru_bhr={bhr['lru']:.3f} "
                  f"default_bhr={bhr['default']:.3f} ratio={ratio:.2f} lfuda_bhr={bhr['lfuda']:.3f} "
                  f"gdsf_bhr={bhr['gdsf']:.3f} seeds={args.seeds} requests={args.requests}", flush=True)
    print(f"# {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
