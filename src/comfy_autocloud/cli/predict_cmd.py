"""`autocloud predict`: what the predictive preloader would fetch next, and how well it would have done.

`--evaluate TRACE` replays a `timestamp,key,size` CSV (the format `simulate-eviction` reads): trains on
the first 70%, scores on the rest, and compares with always prefetching the most popular models.
Without it, the node's own access log (the store index) says what is likely next right now.
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
              help="Share of the trace used for training (the rest is scored).")
@click.option("--capacity", default=None, metavar="SIZE",
              help="Cache size for the prefetch simulation (default: half the trace's distinct bytes).")
@click.option("--policy", default="default", show_default=True, help="Eviction policy of the simulated cache.")
@click.option("--prefetch", type=click.IntRange(0, 10), default=1, show_default=True,
              help="Predicted models made present after each request.")
@click.option("--top", type=click.IntRange(1, 50), default=3, show_default=True,
              help="Without --evaluate: how many predictions to show.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
@pass_app
def predict_cmd(app: AppContext, trace_path: Path | None, train_fraction: float, capacity: str | None, policy: str,
                prefetch: int, top: int, as_json: bool) -> None:
    """Score predictive preloading on a trace (--evaluate), or show this node's likely next models."""
    from comfy_autocloud.predict import Predictor, collapse_repeats, evaluate
    from comfy_autocloud.store.eviction import POLICY_NAMES
    from comfy_autocloud.store.simulate import read_trace

    if policy not in POLICY_NAMES:
        raise click.BadParameter(f"unknown policy {policy!r} (known: {', '.join(POLICY_NAMES)})",
                                 param_hint="--policy")
    if trace_path is not None:
        cap = None
        if capacity is not None:
            try:
                cap = parse_size(capacity)
            except ValueError as exc:
                raise click.BadParameter(str(exc), param_hint="--capacity") from None
        trace = list(read_trace(trace_path))
        if len(trace) < 10:
            raise click.UsageError(f"{trace_path}: {len(trace)} requests is too few to train and score")
        result = evaluate(trace, train_fraction=train_fraction, capacity=cap, policy=policy, prefetch=prefetch)
        if as_json:
            emit_json(result)
            return
        base = result["baseline"]
        assert isinstance(base, dict)
        t = Table(title=f"{trace_path.name}: trained on {result['requests_train']}, scored on "
                        f"{result['requests_test']} requests, cache {human_size(int(str(result['capacity'])))}",
                  show_edge=False, header_style="bold")
        for col in ("predictor", "top-1", "top-3", "prefetched", "useful", "byte hit ratio"):
            t.add_column(col, justify="left" if col == "predictor" else "right")
        t.add_row("transitions + hour", f"{result['top1']:.3f}", f"{result['top3']:.3f}",
                  human_size(int(str(result["prefetched_bytes"]))), human_size(int(str(result["useful_bytes"]))),
                  f"{result['byte_hit_ratio']:.3f}")
        t.add_row("most popular (baseline)", f"{base['top1']:.3f}", f"{base['top3']:.3f}",
                  human_size(base["prefetched_bytes"]), human_size(base["useful_bytes"]),
                  f"{base['byte_hit_ratio']:.3f}")
        t.add_row("no prefetch", "-", "-", "-", "-", f"{result['no_prefetch_byte_hit_ratio']:.3f}")
        console.print(t)
        return
    history = collapse_repeats(app.store().access_history())
    if not history:
        raise click.UsageError("the access log is empty (it fills as models are fetched and used)")
    model = Predictor().fit(history)
    last = history[-1][1]
    now = time.time()
    scores = model.scores(last, now)
    keys = model.predict(last, now, top)
    if as_json:
        emit_json({"after": last, "history": len(history),
                   "next": [{"key": k, "score": round(scores[k], 4), "size": model.sizes.get(k)} for k in keys]})
        return
    console.print(f"after [bold]{last}[/bold] ({len(history)} accesses in the log):", soft_wrap=True)
    for k in keys:
        console.print(f"  {scores[k]:.3f}  {k}", soft_wrap=True)
