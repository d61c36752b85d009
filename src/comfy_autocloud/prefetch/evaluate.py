"""Replay a trace to score prediction and disk prefetch against the baselines, in the same run.

The models learn from the first part of the trace, then from every access of the rest (online, as the
live prefetcher does); each guess is made right after the previous access (nothing is known about the
pause to come). Top-1/top-3 are scored for the context model, a first-order Markov chain and "most
popular so far".

The prefetch replay models a node: one link of `bandwidth` bytes/s; a load of a missing model waits
for it (partly prefetched bytes count); between two loads (while the GPU works) the link fetches the
plan made after the previous load, unless an on-demand download still holds it; a finished prefetch
is committed into a cache of `capacity` bytes run by the store's own eviction policy
(`store.simulate.Simulator`), and only when `plan.worth_prefetching` says it pays. It reports the
seconds loaders waited and the bytes fetched for nothing (prefetched, then evicted or never used),
for no prefetch, Markov-driven prefetch and context-driven prefetch.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

from comfy_autocloud.prefetch.plan import PAUSE_MIN_SCORE, PAUSE_PREFETCH, worth_prefetching
from comfy_autocloud.prefetch.predictor import (
    MIN_SCORE,
    ContextPredictor,
    MarkovChain,
    Model,
    MostPopular,
    Request,
    top,
)
from comfy_autocloud.store.eviction import bytes_freed, select_victims
from comfy_autocloud.store.simulate import Simulator

BANDWIDTH = 200e6  # bytes/s of a typical cloud node's link to the model origin
PREFETCH = 2  # guesses planned after each load


@dataclass(frozen=True)
class Replay:
    model: str
    top1: float
    top3: float
    wait_seconds: float  # loaders waiting for downloads, test part
    prefetched_bytes: int
    useful_bytes: int  # prefetched bytes a load then found present
    wasted_bytes: int  # prefetched bytes evicted before use, or unused at the end
    byte_hit_ratio: float  # bytes loads found present / bytes loaded

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class _Node:
    """The replayed node: its cache, its link, and what prefetch has fetched but nobody loaded yet."""

    def __init__(self, capacity: int, policy: str, bandwidth: float) -> None:
        self.sim = Simulator(capacity, policy)
        self.bandwidth = bandwidth
        self.partial: dict[str, int] = {}  # fetched ahead, not complete (kept for resuming)
        self.ahead: dict[str, int] = {}  # fetched ahead, committed, not loaded yet
        self.prefetched = self.useful = self.wasted = 0
        self.wait = 0.0
        self.busy_until = 0.0  # the link serves an on-demand download until then
        self.asked = self.found = 0

    def present(self, key: str, size: int) -> bool:
        item = self.sim.table.get(key)
        return item is not None and item.size == size

    def prefetch(self, plan: list[tuple[str, int]], start: float, end: float) -> None:
        """Spend the link's idle time between two loads on the plan, in order."""
        budget = max(0.0, end - max(start, self.busy_until)) * self.bandwidth
        for key, size in plan:
            if budget <= 0:
                return
            if self.present(key, size):
                continue
            done = self.partial.get(key, 0)
            step = int(min(size - done, budget))
            budget -= step
            self.prefetched += step
            if done + step < size:
                self.partial[key] = done + step
                continue
            self.partial.pop(key, None)
            self.sim.request(start, key, size)  # committed like any download
            if self.present(key, size):
                self.ahead[key] = size
            else:
                self.wasted += size
            self._drop_evicted()

    def load(self, ts: float, key: str, size: int) -> None:
        self.asked += size
        if self.present(key, size):
            self.found += size
            missing = 0
        else:
            done = self.partial.pop(key, 0)
            self.useful += done
            missing = size - done
        self.useful += self.ahead.pop(key, 0)
        self.wait += missing / self.bandwidth
        self.busy_until = ts + missing / self.bandwidth
        self.sim.request(ts, key, size)
        self._drop_evicted()

    def _drop_evicted(self) -> None:
        for key in [k for k in self.ahead if k not in self.sim.table]:
            self.wasted += self.ahead.pop(key)

    def plan(self, model: Model, scores: dict[str, float], after: str, sizes: dict[str, int], k: int,
             min_score: float) -> list[tuple[str, int]]:
        """The top `k` guesses worth fetching now (see `plan.worth_prefetching`)."""
        out: list[tuple[str, int]] = []
        total = sum(model.overall.values()) or 1.0
        sim = self.sim
        for cand in top(scores, k):
            size = sizes.get(cand)
            if size is None or scores[cand] < min_score or size > sim.capacity or self.present(cand, size):
                continue
            need = sim.used + size - sim.capacity
            victims = select_victims(sim.policy, sim.table.values(), need, protect=(after, cand)) if need > 0 else []
            if need > 0 and bytes_freed(victims, sim.table.values()) < need:
                continue
            shares = [(v.size, model.overall.get(v.key, 0) / total) for v in victims]
            if worth_prefetching(scores[cand], size, shares):
                out.append((cand, size))
        return out


def replay(model: Model | None, train: Sequence[Request], test: Sequence[Request], *, capacity: int,
           policy: str = "default", bandwidth: float = BANDWIDTH, prefetch: int = PREFETCH,
           min_score: float = MIN_SCORE, name: str | None = None) -> Replay:
    """Score `model` (None: no prediction, no prefetch) on `test` after learning from `train`."""
    node = _Node(capacity, policy, bandwidth)
    sizes: dict[str, int] = {}
    for ts, key, size in train:
        node.sim.request(ts, key, size)
        sizes[key] = size
        if model is not None:
            model.observe(ts, key, size)
    top1 = top3 = 0
    prev = train[-1] if train else None
    plan: list[tuple[str, int]] = []
    guess: list[str] = []
    if model is not None and prev is not None:
        scores = model.scores(prev[0])
        guess = top(scores, 3)
        plan = node.plan(model, scores, prev[1], sizes, prefetch, min_score) if prefetch else []
    for ts, key, size in test:
        top1 += guess[:1] == [key]
        top3 += key in guess
        if prev is not None:
            gap = getattr(model, "gap", None)
            if model is not None and prefetch and gap is not None and ts - prev[0] > gap:
                # the session is over: after the gap, the plan turns to what starts the next one
                node.prefetch(plan, prev[0], prev[0] + gap)
                later = prev[0] + gap + 1
                plan = node.plan(model, model.scores(later), prev[1], sizes, max(prefetch, PAUSE_PREFETCH),
                                 min(min_score, PAUSE_MIN_SCORE))
                node.prefetch(plan, later, ts)
            else:
                node.prefetch(plan, prev[0], ts)
        node.load(ts, key, size)
        sizes[key] = size
        prev = (ts, key, size)
        if model is not None:
            model.observe(ts, key, size)
            scores = model.scores(ts)
            guess = top(scores, 3)
            plan = node.plan(model, scores, key, sizes, prefetch, min_score) if prefetch else []
    node.wasted += sum(node.ahead.values()) + sum(node.partial.values())  # never used in the scored part
    n = len(test) or 1
    return Replay(name or (model.name if model is not None else "no-prefetch"), round(top1 / n, 4),
                  round(top3 / n, 4), round(node.wait, 1), node.prefetched, node.useful, node.wasted,
                  round(node.found / node.asked, 4) if node.asked else 0.0)


MODELS: dict[str, Callable[[], Model]] = {"context": ContextPredictor, "markov-1": MarkovChain,
                                          "most-popular": MostPopular}


def evaluate(trace: Sequence[Request], *, train_fraction: float = 0.7, capacity: int | None = None,
             policy: str = "default", prefetch: int = PREFETCH, min_score: float = MIN_SCORE,
             bandwidth: float = BANDWIDTH) -> dict[str, object]:
    """Learn from the first `train_fraction` of the trace, score on the rest: the context model, the
    Markov chain and most-popular, each also driving prefetch, and no prefetch at all.

    `capacity` defaults to a tenth of the trace's distinct bytes (a cache that holds the hot set).
    """
    if not 0 < train_fraction < 1:
        raise ValueError("train_fraction must be between 0 and 1")
    trace = list(trace)
    split = int(len(trace) * train_fraction)
    train, test = trace[:split], trace[split:]
    distinct = {k: s for _t, k, s in trace}
    cap = capacity if capacity is not None else max(1, sum(distinct.values()) // 10)
    kw = dict(capacity=cap, policy=policy, bandwidth=bandwidth, prefetch=prefetch, min_score=min_score)
    runs = {name: replay(make(), train, test, **kw) for name, make in MODELS.items()}  # type: ignore[arg-type]
    none = replay(None, train, test, **kw)  # type: ignore[arg-type]
    ours, markov = runs["context"], runs["markov-1"]

    def removed(r: Replay) -> float:
        return round(1 - r.wait_seconds / none.wait_seconds, 4) if none.wait_seconds else 0.0

    return {
        "prefetched_bytes": ours.prefetched_bytes, "useful_bytes": ours.useful_bytes,
        "wasted_bytes": ours.wasted_bytes, "byte_hit_ratio": ours.byte_hit_ratio,
        "wait_seconds": ours.wait_seconds, "waits_removed": removed(ours),
        "markov": {**markov.as_dict(), "waits_removed": removed(markov)},
        "baseline": runs["most-popular"].as_dict(),
        "no_prefetch": none.as_dict(), "no_prefetch_byte_hit_ratio": none.byte_hit_ratio,
        "requests_train": len(train), "requests_test": len(test), "capacity": cap, "policy": policy,
        "min_score": min_score, "bandwidth": bandwidth,
        "top1_vs_markov": round(ours.top1 / markov.top1, 3) if markov.top1 else None,
        "top1": ours.top1, "top3": ours.top3,
    }
