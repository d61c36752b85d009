"""Popular-model disk prefetch plan: which pinned and most-used models to keep on disk.

Popularity outlives eviction: hit counts from the store index are folded into a small JSON history
next to the index, so a model that was evicted last night is fetched back before this morning's
first request. `plan_popular` turns specs, what is cached and that history (plus the predictor's
guesses, lowest priority) into the list the background prefetcher downloads, within a budget.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from comfy_autocloud.fsutil import write_atomic
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.store import Entry

BUDGET_FRACTION = 0.8  # of the cap: leave room for on-demand downloads


@dataclass(frozen=True)
class Popularity:
    hits: int
    size: int | None


def read_history(path: Path) -> dict[str, Popularity]:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out: dict[str, Popularity] = {}
    if isinstance(raw, dict):
        for key, v in raw.items():
            if isinstance(v, dict) and isinstance(v.get("hits"), int):
                size = v.get("size")
                out[str(key)] = Popularity(v["hits"], size if isinstance(size, int) else None)
    return out


def merge_history(history: dict[str, Popularity], entries: Iterable[Entry]) -> dict[str, Popularity]:
    """Fold the index's hit counts in (they only grow while a file stays; the history keeps the max)."""
    out = dict(history)
    for e in entries:
        old = out.get(e.key)
        out[e.key] = Popularity(max(e.hits, old.hits if old else 0), e.size)
    return out


def write_history(path: Path, history: dict[str, Popularity]) -> None:
    write_atomic(path, json.dumps({k: {"hits": p.hits, "size": p.size} for k, p in sorted(history.items())}))


def plan_popular(specs: Sequence[ModelSpec], cached: Iterable[Entry], history: dict[str, Popularity],
                 cap: int | None, top: int, budget_fraction: float = BUDGET_FRACTION,
                 predicted: Sequence[str] = ()) -> list[ModelSpec]:
    """Specs to download now: pinned first, then the `top` most-used, then the `predicted` keys (lowest
    priority: the predictor's guesses, already judged worth what they would evict), while all chosen
    fit the budget.

    Chosen files already cached count against the budget too; a missing file of unknown size is only
    planned when there is no cap (we cannot promise it fits).
    """
    sizes = {e.key: e.size for e in cached}
    fetchable = [s for s in specs if s.sources]
    pinned = [s for s in fetchable if s.pin]
    popular = sorted((s for s in fetchable if not s.pin and history.get(s.key, Popularity(0, None)).hits > 0),
                     key=lambda s: (-history[s.key].hits, s.key))[:max(0, top)]
    by_key = {s.key: s for s in fetchable}
    chosen = {s.key for s in pinned + popular}
    guesses = [by_key[k] for k in dict.fromkeys(predicted) if k in by_key and k not in chosen]
    budget = None if cap is None else cap * budget_fraction
    used = 0
    plan: list[ModelSpec] = []
    for spec in pinned + popular + guesses:
        size = sizes.get(spec.key)
        present = size is not None
        if size is None:
            size = spec.size if spec.size is not None else history.get(spec.key, Popularity(0, None)).size
        if budget is not None:
            if size is None or used + size > budget:
                continue
            used += size
        if not present:
            plan.append(spec)
    return plan


