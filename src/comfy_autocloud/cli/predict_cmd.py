"""`autocloud predict`: what disk prefetch would fetch next and why, and how well it would have done.

`--evaluate TRACE` replays a `timestamp,key,size` CSV (the format `simulate-eviction` reads): learns
from the first 70%, scores the rest (still learning), and compares the context model with a
first-order Markov chain and "most popular", and prefetching with each against no prefetch. Without
it, the node's own predictor (saved in the store's private directory, updated from the access log)
says what is likely next right now; `--explain` adds which context gave each guess.
"""

from __future__ import annotations

import time
from pathlib import Path

import click
from rich.table import Table

from comfy_autocloud.cli.context import AppContext, pass_app
from comfy_autocloud.cli.output import console, emit_json
from comfy_autocloud.units import human_size, parse_size


@click.command("predict")
@click.option("--evaluate", "trace_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, metavar="TRACE", help="Replay a CSV trace (timestamp,key,size) and score the predictor.")
@click.option("--train-fraction", type=click.FloatRange(0.05, 0.95), default=0.7, show_default=True,
              help="Share of the trace learned from before scoring starts.")
@click.option("--capacity", default=None, metavar="SIZE",
              help="Cache size for the prefetch replay (default: a tenth of the trace's distinct bytes).")
@click.option("--policy", default="default", show_default=True, help="Eviction policy of the replayed cache.")
@click.option("--prefetch", type=click.IntRange(0, 10), default=2, show_default=True,
              help="Guesses planned for prefetch after each load.")
@click.option("--bandwidth", default="200M", show_default=True, metavar="RATE",
              help="Bytes per second of the replayed node's link (loader waits are bytes missing / this).")
@click.option("--top", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Without --evaluate: how many predictions to show.")
@click.option("--explain", is_flag=True, help="Without --evaluate: say which context gave each guess.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@pass_app
def predict_cmd(app: AppContext, trace_path: Path | None, train_fraction: float, capacity: str | None, policy: str,
                prefetch: int, bandwidth: str, top: int, explain: bool, as_json: bool) -> None:
    """Score the predictor and disk prefetch on a trace (--evaluate), or show this node's likely next models."""
    from comfy_autocloud.store.eviction import POLICY_NAMES

    if policy not in POLICY_NAMES:
        raise click.BadParameter(f"unknown policy {policy!r} (known: {', '.join(POLICY_NAMES)})",
                                 param_hint="--policy")
    if trace_path is not None:
        _evaluate(trace_path, train_fraction, capacity, policy, prefetch, bandwidth, as_json)
        return
    from comfy_autocloud.prefetch.prefetcher import learn_from_store

    model = learn_from_store(app.store())
    if model.seen == 0:
        raise click.UsageError("the access log is empty (it fills as models are fetched and used)")
    guesses = model.explain(time.time(), top)
    if as_json:
        emit_json({"after": model.prev, "history": model.seen, "session_gap": model.gap,
                   "next": [{"key": g.key, "score": g.score, "size": model.sizes.get(g.key),
                             **({"why": g.why} if explain else {})} for g in guesses]})
        return
    console.print(f"after [bold]{model.prev}[/bold] ({model.seen:g} loads learned, session gap "
                  f"{model.gap:.0f}s):", soft_wrap=True)
    for g in guesses:
        console.print(f"  {g.score:.3f}  {g.key}" + (f"  [dim]({g.why})[/dim]" if explain else ""), soft_wrap=True)


def _evaluate(trace_path: Path, train_fraction: float, capacity: str | None, policy: str, prefetch: int,
              bandwidth: str, as_json: bool) -> None:
    from comfy_autocloud.prefetch.evaluate import evaluate
    from comfy_autocloud.store.simulate import read_trace
    from comfy_autocloud.units import parse_rate

    cap = None
    if capacity is not None:
        try:
            cap = parse_size(capacity)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--capacity") from None
    try:
        rate = parse_rate(bandwidth)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--bandwidth") from None
    if not rate:
        raise click.BadParameter("must be a positive rate, e.g. 200M", param_hint="--bandwidth")
    trace = list(read_trace(trace_path))
    if len(trace) < 10:
        raise click.UsageError(f"{trace_path}: {len(trace)} requests is too few to train and score")
    r = evaluate(trace, train_fraction=train_fraction, capacity=cap, policy=policy, prefetch=prefetch,
                 bandwidth=float(rate))
    if as_json:
        emit_json(r)  # one line; top1 and top3 are its last keys
        return
    markov, base, none = r["markov"], r["baseline"], r["no_prefetch"]
    assert isinstance(markov, dict) and isinstance(base, dict) and isinstance(none, dict)
    t = Table(title=f"{trace_path.name}: learned from {r['requests_train']}, scored on {r['requests_test']} "
                    f"loads, cache {human_size(int(str(r['capacity'])))}", show_edge=False, header_style="bold")
    for col in ("predictor", "top-1", "top-3", "wait", "removed", "prefetched", "for nothing", "hits"):
        t.add_column(col, justify="left" if col == "predictor" else "right", no_wrap=col == "predictor")
    ours = {"top1": r["top1"], "top3": r["top3"], "wait_seconds": r["wait_seconds"],
            "waits_removed": r["waits_removed"], "prefetched_bytes": r["prefetched_bytes"],
            "wasted_bytes": r["wasted_bytes"], "byte_hit_ratio": r["byte_hit_ratio"]}
    for name, row in (("context model", ours), ("markov-1", markov), ("most popular", base),
                      ("no prefetch", none)):
        t.add_row(name, f"{row['top1']:.3f}", f"{row['top3']:.3f}", f"{row['wait_seconds']:.0f}s",
                  f"{row['waits_removed']:.3f}" if "waits_removed" in row else "-",
                  human_size(int(row["prefetched_bytes"])), human_size(int(row["wasted_bytes"])),
                  f"{row['byte_hit_ratio']:.3f}")
    console.print(t)
    console.print("wait: seconds loaders waited for downloads; removed: share of the no-prefetch wait removed; "
                  "for nothing: prefetched bytes never loaded; hits: byte hit ratio", soft_wrap=True)
