"""Sequence-parallel sampling step: 1 process vs N worker ranks (CPU + gloo), Flux-architecture DiT.

What is compared (same weights, same inputs, same step):
- baseline: the plain single-process forward (``flux_forward`` with no parallelism), timed with 1
  and with ``--threads`` intra-op threads (default: every core); the faster one is the baseline;
- parallel: a persistent ``WorkerGroup`` of N ranks, ``cores // N`` threads each, timed inside the
  workers (barrier to barrier, no dispatcher round trip), plus the end-to-end time of one dispatched
  call (pickle + shared-memory transfer of inputs/outputs included).
The sequence is long (default 4096 image tokens) so attention dominates the step, which is the
regime sequence parallelism is for. Per-rank bytes sent per step are printed next to the closed-form
volume of each algorithm. Ratio = baseline time / parallel time (> 1: parallel is faster).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import torch

from comfy_autocloud.parallel.attention import balanced_split
from comfy_autocloud.parallel.flux_sp import FluxDiT, flux_forward, tiny_flux_config
from comfy_autocloud.parallel.shm import SharedWeights
from comfy_autocloud.parallel.workers import WorkerGroup


def theory_bytes(strategy: str, world: int, batch: int, n_img: int, n_txt: int, hidden: int, heads: int,
                 layers: int, out_ch: int, elem: int) -> int:
    """Closed-form bytes one rank (rank 0, the largest shard) sends per step."""
    sizes = balanced_split(n_img, world)
    mine, d, hp = sizes[0], hidden // heads, heads // world if heads % world == 0 else 0
    if strategy == "ulysses":
        fwd = (world - 1) * 3 * batch * hp * mine * d
        back = sum(batch * hp * n * d for n in sizes[1:])
        txt = (world - 1) * batch * hp * n_txt * d
        per_attn = fwd + back + txt
    else:  # ring: my k/v block, then P-2 forwarded blocks of the others
        per_attn = sum(2 * batch * heads * sizes[(0 - s) % world] * d for s in range(world - 1))
    final = (world - 1) * batch * max(sizes) * out_ch
    return (layers * per_attn + final) * elem


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latent", type=int, default=128, help="latent side (tokens = (side/2)^2)")
    ap.add_argument("--txt", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--single", type=int, default=2)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of the single process")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--strategies", default="ulysses,ring")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: baseline on cuda:0, ranks on cuda:0..N-1 with NCCL (e.g. --flux-shaped)")
    ap.add_argument("--flux-shaped", action="store_true", help="FLUX.1 widths: hidden 3072, 24 heads, txt 512")
    args = ap.parse_args()
    if args.flux_shaped:
        args.hidden, args.heads, args.txt = 3072, 24, 512
    cuda = args.device == "cuda"
    dev = torch.device("cuda:0" if cuda else "cpu")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(dev)

    torch.manual_seed(0)
    extra = dict(context_in_dim=4096, vec_in_dim=768, axes_dim=[16, 56, 56], in_channels=16, out_channels=16) \
        if args.flux_shaped else {}
    cfg = tiny_flux_config(hidden=args.hidden, heads=args.heads, depth=args.depth, single=args.single, **extra)
    model = FluxDiT(cfg).eval().to(dev)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05)
    g = torch.Generator().manual_seed(1)
    n = args.latent
    inputs = dict(x=torch.randn(1, cfg.in_channels, n, n, generator=g), timestep=torch.rand(1, generator=g),
                  context=torch.randn(1, args.txt, cfg.context_in_dim, generator=g),
                  y=torch.randn(1, cfg.vec_in_dim, generator=g), guidance=torch.full((1,), 3.5))
    local = {k: v.to(dev) for k, v in inputs.items()}
    n_img = (n // 2) ** 2
    layers = args.depth + args.single
    if cuda:
        print(f"devices: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}")
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(f"model: Flux-architecture DiT hidden {args.hidden}, {args.heads} heads, {args.depth} double + "
          f"{args.single} single blocks; sequence {n_img} image + {args.txt} text tokens, batch 1, fp32, {args.device}")

    with torch.inference_mode():
        ref = flux_forward(model, **local).cpu()
    singles = {}
    per_rank_threads = max(1, (os.cpu_count() or 1) // args.world)
    for threads in sorted({1, per_rank_threads, args.threads}) if not cuda else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        with torch.inference_mode():
            flux_forward(model, **local)  # warm-up at this thread count
            times = []
            for _ in range(args.steps):
                sync()
                t0 = time.perf_counter()
                flux_forward(model, **local)
                sync()
                times.append(time.perf_counter() - t0)
        singles[threads] = sorted(times)[len(times) // 2]
        print(f"single process, {threads} thread(s): {singles[threads] * 1000:.0f} ms/step (median of {args.steps})")
    best_threads = min(singles, key=singles.__getitem__)
    base = singles[best_threads]
    print(f"baseline = the faster single process ({best_threads} thread(s)): {base * 1000:.0f} ms/step")

    shared = SharedWeights.pack(model, rebind=True, meta={"builder": "flux", "config": asdict(cfg)})
    threads = per_rank_threads
    devices = [f"cuda:{i}" for i in range(args.world)] if cuda else ["cpu"] * args.world
    group = WorkerGroup(devices, threads_per_rank=None if cuda else threads)
    try:
        t0 = time.perf_counter()
        group.ensure_started()
        per = "" if cuda else f", {threads} thread(s) each"
        print(f"worker group: {args.world} ranks on {', '.join(devices)}{per}, started in "
              f"{time.perf_counter() - t0:.1f} s (once; reused by every later call)")
        group.register("bench", shared)
        results: dict[str, float] = {}
        for strategy in [s.strip() for s in args.strategies.split(",") if s.strip()]:
            replies = group.bench("bench", inputs, strategy, args.steps)
            step = max(r["step_s"] for r in replies)
            err = (replies[0]["out"] - ref).abs().max().item()
            t0 = time.perf_counter()
            group.forward("bench", inputs, strategy)
            e2e = time.perf_counter() - t0
            sent = replies[0]["sent"]
            attn = replies[0]["plan"].split()[0]
            theory = theory_bytes(attn, args.world, 1, n_img, args.txt, args.hidden, args.heads, layers,
                                  cfg.out_channels * 4, 4)
            print(f"{replies[0]['plan']:>12}: {step * 1000:.0f} ms/step in workers (median), "
                  f"{e2e * 1000:.0f} ms dispatched; "
                  f"max |diff| vs single {err:.1e}; rank 0 sent {sum(sent.values()) / 2**20:.2f} MiB/step "
                  f"({', '.join(f'{k} {v / 2**20:.2f}' for k, v in sent.items())}), theory {theory / 2**20:.2f} MiB; "
                  f"ratio {base / step:.2f}x (dispatched {base / e2e:.2f}x)")
            results[replies[0]["plan"]] = e2e
    finally:
        group.close()
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    # One line: the best strategy, end to end (dispatched), against one rank (a single process with one
    # rank's share of the machine: the "1 vs N ranks") and against the strongest alternative (a
    # single process using every core, or one GPU).
    plan = min(results, key=results.__getitem__)
    one_rank = base if cuda else singles[per_rank_threads]
    print(f"parallel world={args.world} tokens={n_img} best={plan.replace(' ', '')} ms={results[plan] * 1000:.0f} "
          f"one_rank_ms={one_rank * 1000:.0f} best_single_ms={base * 1000:.0f} "
          f"ratio_vs_one_rank={one_rank / results[plan]:.2f} ratio_vs_best_single={base / results[plan]:.2f}")


if __name__ == "__main__":
    main()
