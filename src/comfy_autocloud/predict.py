"""Predictive preloading (seed 004 §6): which model comes next, learned from the access history.

Two signals, both cheap to learn and to explain: first-order transitions (after `a`, `b` followed so
often: workflows load their checkpoint, LoRAs and VAE in a stable order) and popularity by hour of day
(UTC; the seed's 9 a.m. rush). A prediction blends them, trusting the transitions of a model in
proportion to how often it was seen (`n / (n + TRUST)`), and falls back to hour, then overall
popularity. `evaluate` replays a trace: it trains on the first part, then scores top-1/top-3 on the rest
and simulates prefetching the top prediction into a cache of the given capacity (the store's own
eviction policy via `store.simulate.Simulator`), against the "most popular overall" baseline.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Protocol

from comfy_autocloud.store.simulate import Request, Simulator

TRUST = 3.0  # transitions seen this often from a model weigh as much as the hour/overall popularity
HOUR_WEIGHT = 0.7  # of the fallback: hour-of-day popularity vs overall popularity
SESSION_GAP = 6 * 3600.0  # a pause this long breaks the chain: the next model does not "follow"


def hour_of(ts: float) -> int:
    return time.gmtime(ts).tm_hour


MIN_SCORE = 0.4  # prefetch only predictions at least this likely: a wrong guess evicts something useful


class Model(Protocol):
    def predict(self, prev: str | None, ts: float, k: int) -> list[str]: ...

    def scores(self, prev: str | None, ts: float) -> dict[str, float]: ...


@dataclass
class Predictor:
    """First-order transition counts + hour-of-day and overall popularity."""

    transitions: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    by_hour: list[Counter[str]] = field(default_factory=lambda: [Counter() for _ in range(24)])
    overall: Counter[str] = field(default_factory=Counter)
    sizes: dict[str, int] = field(default_factory=dict)
    _prev: tuple[float, str] | None = None

    def observe(self, ts: float, key: str, size: int) -> None:
        if self._prev is not None and ts - self._prev[0] <= SESSION_GAP:
            self.transitions[self._prev[1]][key] += 1
        self.by_hour[hour_of(ts)][key] += 1
        self.overall[key] += 1
        self.sizes[key] = size
        self._prev = (ts, key)

    def fit(self, requests: Iterable[Request]) -> Predictor:
        for ts, key, size in requests:
            self.observe(ts, key, size)
        return self

    def scores(self, prev: str | None, ts: float) -> dict[str, float]:
        """trust * P(next | prev) + (1 - trust) * (HOUR_WEIGHT * P(next | hour) + rest * P(next))."""
        t = self.transitions.get(prev) if prev is not None else None
        nt = sum(t.values()) if t else 0
        trust = nt / (nt + TRUST)
        out: dict[str, float] = defaultdict(float)
        if t:
            for key, c in t.items():
                out[key] += trust * c / nt
        for scale, counts in ((HOUR_WEIGHT, self.by_hour[hour_of(ts)]), (1 - HOUR_WEIGHT, self.overall)):
            total = sum(counts.values())
            for key, c in counts.items():
                out[key] += (1 - trust) * scale * c / total
        return out

    def predict(self, prev: str | None, ts: float, k: int) -> list[str]:
        """The `k` most likely next keys after `prev` at time `ts` (ties: more popular, then by name)."""
        s = self.scores(prev, ts)
        return sorted(s, key=lambda key: (-s[key], -self.overall[key], key))[:max(0, k)]


@dataclass
class MostPopular:
    """The baseline: always the models most popular in training, whatever came before."""

    overall: Counter[str] = field(default_factory=Counter)

    def fit(self, requests: Iterable[Request]) -> MostPopular:
        for _ts, key, _size in requests:
            self.overall[key] += 1
        return self

    def predict(self, prev: str | None, ts: float, k: int) -> list[str]:
        return [key for key, _ in sorted(self.overall.items(), key=lambda kv: (-kv[1], kv[0]))[:max(0, k)]]

    def scores(self, prev: str | None, ts: float) -> dict[str, float]:
        total = sum(self.overall.values()) or 1
        return {key: c / total for key, c in self.overall.items()}


@dataclass(frozen=True)
class Score:
    model: str
    top1: float
    top3: float
    prefetched_bytes: int
    useful_bytes: int
    byte_hit_ratio: float  # with prefetching, on the test part

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _replay(model: Model, name: str, train: Sequence[Request], test: Sequence[Request], capacity: int,
            policy: str, prefetch: int, sizes: dict[str, int], min_score: float) -> Score:
    sim = Simulator(capacity, policy)
    for ts, key, size in train:  # the cache as it stands when the test part starts
        sim.request(ts, key, size)
    top1 = top3 = 0
    prefetched = useful = 0
    pending: dict[str, int] = {}  # prefetched, not yet asked for
    bytes_req = bytes_hit = 0
    prev_key, prev_ts = (train[-1][1], train[-1][0]) if train else (None, test[0][0] if test else 0.0)
    for ts, key, size in test:
        guess = model.predict(prev_key, prev_ts, 3)
        top1 += bool(guess[:1] == [key])
        top3 += key in guess
        bytes_req += size
        hit = sim.request(ts, key, size)
        if hit:
            bytes_hit += size
        was = pending.pop(key, None)
        if was is not None and hit:
            useful += was
        if prefetch:  # after serving it: make the next `prefetch` predictions present (within the cap)
            likely = model.scores(key, ts)
            for cand in model.predict(key, ts, prefetch):
                if cand in sim.table or cand not in sizes or sizes[cand] > capacity or likely[cand] < min_score:
                    continue
                sim.request(ts, cand, sizes[cand])  # admitted like a download, evicting by the policy
                if cand in sim.table:
                    prefetched += sizes[cand]
                    pending[cand] = sizes[cand]
            pending = {k: v for k, v in pending.items() if k in sim.table}  # evicted before use: wasted
        prev_key, prev_ts = key, ts
    n = len(test) or 1
    return Score(name, round(top1 / n, 4), round(top3 / n, 4), prefetched, useful,
                 round(bytes_hit / bytes_req, 4) if bytes_req else 0.0)


def evaluate(trace: Sequence[Request], *, train_fraction: float = 0.7, capacity: int | None = None,
             policy: str = "default", prefetch: int = 1, min_score: float = MIN_SCORE) -> dict[str, object]:
    """Train on the first `train_fraction` of the trace, score on the rest (predictor and baseline).

    `capacity` defaults to half the trace's distinct bytes (a cache that cannot hold everything).
    `prefetch`: how many of the top predictions are made present after each request, each only when its
    score is at least `min_score` (both models get the same rule).
    """
    if not 0 < train_fraction < 1:
        raise ValueError("train_fraction must be between 0 and 1")
    trace = list(trace)
    split = int(len(trace) * train_fraction)
    train, test = trace[:split], trace[split:]
    sizes: dict[str, int] = {}
    for _ts, key, size in train:
        sizes[key] = size
    distinct = {k: s for _t, k, s in trace}
    cap = capacity if capacity is not None else max(1, sum(distinct.values()) // 2)
    ours = _replay(Predictor().fit(train), "transitions+hour", train, test, cap, policy, prefetch, sizes, min_score)
    base = _replay(MostPopular().fit(train), "most-popular", train, test, cap, policy, prefetch, sizes, min_score)
    none = _replay(MostPopular().fit(train), "no-prefetch", train, test, cap, policy, 0, sizes, min_score)
    return {
        "top1": ours.top1, "top3": ours.top3,
        "prefetched_bytes": ours.prefetched_bytes, "useful_bytes": ours.useful_bytes,
        "byte_hit_ratio": ours.byte_hit_ratio,
        "requests_train": len(train), "requests_test": len(test), "capacity": cap, "policy": policy,
        "min_score": min_score,
        "baseline": base.as_dict(),
        "no_prefetch_byte_hit_ratio": none.byte_hit_ratio,
        "top1_vs_baseline": round(ours.top1 / base.top1, 3) if base.top1 else None,
    }


def collapse_repeats(history: Iterable[Request], window: float = 5.0) -> list[Request]:
    """One access per use: a download's commit and the loader's touch a moment later are one request."""
    out: list[Request] = []
    for ts, key, size in history:
        if out and out[-1][1] == key and ts - out[-1][0] <= window:
            continue
        out.append((ts, key, size))
    return out
