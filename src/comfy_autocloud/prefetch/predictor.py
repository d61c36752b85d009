"""Which model is loaded next, learned online from the access history (what disk prefetch fetches).

A workflow loads its models in a stable order (checkpoint, VAE / text encoders, LoRAs), many
workflows share a checkpoint and differ after it, and a session (the loads since the last pause)
runs a few related workflows. So the best evidence for the next load is the tail of the current
session: `ContextPredictor` counts what followed each context of the last 1..`max_order` keys of a
session and blends them PPM-style (the longest context seen speaks first, its escape share goes to
shorter ones), then what starts a session at this hour, then popularity at this hour of day (UTC).

It learns from every access (`observe`), forgets slowly (every `half_life` accesses all counts halve,
so drifting habits win within days and rare contexts fall out: memory stays bounded), and persists as
JSON in the store's private directory. `explain` says which context gave each guess.

`MarkovChain` (first-order, learned the same way) and `MostPopular` are the baselines that
`prefetch.evaluate` scores against in the same run.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from comfy_autocloud.fsutil import write_atomic

Request = tuple[float, str, int]

SESSION_GAP = 30 * 60.0  # a pause this long ends a session (until enough gaps are seen to learn it)
MIN_GAP, MAX_GAP = 5 * 60.0, 6 * 3600.0  # the learned gap stays in this range
MAX_ORDER = 4  # longest context (keys of the current session) the model counts
HALF_LIFE = 8000  # accesses after which every count halves (drift, and the memory bound)
MAX_CONTEXTS = 50_000  # contexts kept; past it the rarest are pruned early
MIN_SCORE = 0.15  # prefetch only guesses at least this likely (and only when `plan.worth_prefetching`)
FORMAT = 1
END = "\x00end"  # the successor "the session ended here" (no key can contain NUL)


def hour_of(ts: float) -> int:
    return time.gmtime(ts).tm_hour


@dataclass(frozen=True)
class Guess:
    key: str
    score: float
    why: str  # which evidence gave most of the score, e.g. "after checkpoints/a -> vae/b (order 2, 14 seen)"


class Model(Protocol):
    """What evaluation and the prefetcher need from a predictor."""

    name: str
    overall: Counter[str]  # loads per key (decayed by the context model): the share of recent loads

    def observe(self, ts: float, key: str, size: int) -> None: ...

    def scores(self, ts: float) -> dict[str, float]: ...


def top(scores: dict[str, float], k: int) -> list[str]:
    """The `k` best keys (ties by name, so results are reproducible)."""
    return sorted(scores, key=lambda key: (-scores[key], key))[:max(0, k)]


class GapLearner:
    """The pause that ends a session, learned: per log2 bucket of the pause before an access, how often
    the previous key's successors (top 3) named it (and how often this hour's session starts did, which
    `predict --explain` shows). The session gap is the shortest pause (within MIN_GAP..MAX_GAP) after
    which the previous key predicts less than half as well as it does within a session."""

    def __init__(self, default: float = SESSION_GAP, buckets: list[list[float]] | None = None) -> None:
        self.default = default
        self.buckets = buckets or [[0.0, 0.0, 0.0] for _ in range(24)]  # [accesses, by successor, by start]

    def add(self, gap: float, by_successor: bool, by_start: bool) -> None:
        b = self.buckets[min(23, max(0, int(math.log2(max(gap, 1.0)))))]
        b[0] += 1
        b[1] += by_successor
        b[2] += by_start

    def decay(self) -> None:
        self.buckets = [[v / 2 for v in b] for b in self.buckets]

    @property
    def gap(self) -> float:
        lo, hi = int(math.log2(MIN_GAP)), int(math.log2(MAX_GAP))
        if sum(b[0] for b in self.buckets[lo:]) < 50:
            return self.default
        inside = [sum(b[j] for b in self.buckets[:lo]) for j in range(2)]
        if inside[0] < 50:
            return self.default
        rate = inside[1] / inside[0]
        for i in range(lo, hi + 1):
            n, succ = self.buckets[i][0], self.buckets[i][1]
            if n >= 10 and succ / n < rate / 2:
                return float(min(MAX_GAP, max(MIN_GAP, 2 ** i)))
        return MAX_GAP


class ContextPredictor:
    """Variable-order context model over the current session, with session-start and hour fallbacks."""

    name = "context"

    def __init__(self, *, max_order: int = MAX_ORDER, gap: float | None = None, half_life: int = HALF_LIFE,
                 max_contexts: int = MAX_CONTEXTS) -> None:
        self.max_order = max_order
        self.fixed_gap = gap
        self.gaps = GapLearner()
        self.half_life = half_life
        self.max_contexts = max_contexts
        self.contexts: dict[tuple[str, ...], Counter[str]] = {}
        self.starts: list[Counter[str]] = [Counter() for _ in range(24)]
        self.by_hour: list[Counter[str]] = [Counter() for _ in range(24)]
        self.all_starts: Counter[str] = Counter()  # the sums of `starts` and `by_hour` over the hours
        self.overall: Counter[str] = Counter()
        self.sizes: dict[str, int] = {}
        self.session: list[str] = []
        self.last_ts: float | None = None
        self.prev: str | None = None  # the last key, whatever the pause since
        self.seen = 0
        self.learned_until = 0  # the newest store access-log row learned from (see prefetcher.learn_from_store)

    @property
    def gap(self) -> float:
        return self.fixed_gap if self.fixed_gap is not None else self.gaps.gap

    # ------------------------------------------------------------------ learning
    def new_session(self, ts: float) -> bool:
        """Whether an access at `ts` starts a new session (the pause since the last one is long enough)."""
        return self.last_ts is None or ts - self.last_ts > self.gap

    def observe(self, ts: float, key: str, size: int) -> None:
        hour = hour_of(ts)
        if self.last_ts is not None and self.prev is not None:
            after = self.contexts.get((self.prev,))
            self.gaps.add(ts - self.last_ts, bool(after) and key in top(after, 3), key in top(self.starts[hour], 3))
        if self.new_session(ts):
            for k in range(1, min(self.max_order, len(self.session)) + 1):  # the session ended here
                self.contexts.setdefault(tuple(self.session[-k:]), Counter())[END] += 1
            self.session = []
        if not self.session:
            self.starts[hour][key] += 1
            self.all_starts[key] += 1
        for k in range(1, min(self.max_order, len(self.session)) + 1):
            self.contexts.setdefault(tuple(self.session[-k:]), Counter())[key] += 1
        self.by_hour[hour][key] += 1
        self.overall[key] += 1
        self.sizes[key] = size
        if not self.session or self.session[-1] != key:
            self.session = [*self.session, key][-self.max_order:]
        self.last_ts, self.prev = ts, key
        self.seen += 1
        if self.seen % self.half_life == 0 or len(self.contexts) > self.max_contexts:
            self._age()

    def fit(self, requests: Iterable[Request]) -> ContextPredictor:
        for ts, key, size in requests:
            self.observe(ts, key, size)
        return self

    def _age(self) -> None:
        """Halve every count and drop what falls below one (until the contexts fit their bound)."""
        while True:
            for ctx in list(self.contexts):
                c = _halve(self.contexts[ctx])
                if c:
                    self.contexts[ctx] = c
                else:
                    del self.contexts[ctx]
            self.starts = [_halve(c) for c in self.starts]
            self.by_hour = [_halve(c) for c in self.by_hour]
            self.all_starts, self.overall = _sum(self.starts), _sum(self.by_hour)
            self.gaps.decay()
            live = set(self.overall)
            self.sizes = {k: v for k, v in self.sizes.items() if k in live or k in self.session}
            if len(self.contexts) <= self.max_contexts:
                return

    # ------------------------------------------------------------------ predicting
    def _start_levels(self, hour: int) -> list[tuple[str, Counter[str]]]:
        return [(f"session start at {hour:02d}h", self.starts[hour]), ("session start, any hour", self.all_starts),
                (f"popular at {hour:02d}h", self.by_hour[hour]), ("popular overall", self.overall)]

    def _blend(self, ts: float) -> dict[str, tuple[float, str]]:
        """Score and reason per key for the next access, as if it came at `ts`.

        Within a session: the contexts of the session's tail, longest first, then popularity at this
        hour; the share of "the session ended here" (END, learned like any successor) goes to what
        starts a session at this hour. After a pause: only the session-start levels.
        """
        hour = hour_of(ts)
        if self.new_session(ts):
            return _ppm(self._start_levels(hour), set())
        levels: list[tuple[str, Counter[str]]] = []
        for k in range(min(self.max_order, len(self.session)), 0, -1):
            c = self.contexts.get(tuple(self.session[-k:]))
            if c:
                levels.append((f"after {' -> '.join(self.session[-k:])} (order {k}, {sum(c.values()):g} seen)", c))
        levels += self._start_levels(hour)[2:]
        out = _ppm(levels, set(self.session[-1:]))
        end = out.pop(END, None)
        if end is not None:
            for key, (p, why) in _ppm(self._start_levels(hour), set()).items():
                _add(out, key, end[0] * p, f"{why}, the session likely over ({end[0]:.2f})")
        return out

    def scores(self, ts: float) -> dict[str, float]:
        return {k: v[0] for k, v in self._blend(ts).items()}

    def explain(self, ts: float, k: int) -> list[Guess]:
        blend = self._blend(ts)
        keys = top({key: v[0] for key, v in blend.items()}, k)
        return [Guess(key, round(blend[key][0], 4), blend[key][1]) for key in keys]

    # ------------------------------------------------------------------ persistence
    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT, "max_order": self.max_order, "gap": self.fixed_gap, "half_life": self.half_life,
            "seen": self.seen, "learned_until": self.learned_until, "last_ts": self.last_ts,
            "session": self.session, "gaps": self.gaps.buckets,
            "contexts": [[list(ctx), dict(c)] for ctx, c in self.contexts.items()],
            "starts": [dict(c) for c in self.starts], "by_hour": [dict(c) for c in self.by_hour],
            "sizes": self.sizes,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ContextPredictor:
        """The model `to_json` wrote; ValueError names the field that does not fit."""
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"not a predictor state of format {FORMAT}")
        try:
            m = cls(max_order=int(raw["max_order"]), gap=raw["gap"], half_life=int(raw["half_life"]))
            m.seen = int(raw["seen"])
            m.learned_until = int(raw["learned_until"])
            m.last_ts = None if raw["last_ts"] is None else float(raw["last_ts"])
            m.session = [str(k) for k in raw["session"]]
            m.prev = m.session[-1] if m.session else None
            m.gaps = GapLearner(buckets=[[float(v) for v in b][:3] for b in raw["gaps"]][:24])
            m.contexts = {tuple(str(k) for k in ctx): Counter({str(k): float(v) for k, v in c.items()})
                          for ctx, c in raw["contexts"]}
            m.starts = [Counter({str(k): float(v) for k, v in c.items()}) for c in raw["starts"]][:24]
            m.by_hour = [Counter({str(k): float(v) for k, v in c.items()}) for c in raw["by_hour"]][:24]
            m.sizes = {str(k): int(v) for k, v in raw["sizes"].items()}
            m.all_starts, m.overall = _sum(m.starts), _sum(m.by_hour)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"predictor state does not fit: {exc!r}") from None
        if len(m.starts) != 24 or len(m.by_hour) != 24 or len(m.gaps.buckets) != 24:
            raise ValueError("predictor state does not have 24 hours")
        return m

    def save(self, path: Path) -> None:
        write_atomic(path, json.dumps(self.to_json(), separators=(",", ":")))

    @classmethod
    def load(cls, path: Path) -> ContextPredictor:
        """The saved model, or ValueError naming the file and what is wrong with it."""
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ValueError(f"{path}: cannot read the predictor state: {exc}") from None
        try:
            return cls.from_json(raw)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def _add(out: dict[str, tuple[float, str]], key: str, p: float, why: str) -> None:
    """Add `p` to key's score; the reason is the one that gave the larger part."""
    old = out.get(key)
    if old is None:
        out[key] = (p, why)
    else:
        out[key] = (old[0] + p, old[1] if old[0] >= p else why)


def _ppm(levels: list[tuple[str, Counter[str]]], exclude: set[str]) -> dict[str, tuple[float, str]]:
    """PPM-C blend: each level keeps n/(n+d) of what is left (n counts, d distinct successors), and
    passes its escape share d/(n+d) on to the next, less specific level."""
    left = 1.0
    out: dict[str, tuple[float, str]] = {}
    for why, counts in levels:
        n = sum(v for k, v in counts.items() if k not in exclude)
        if n <= 0:
            continue
        d = sum(1 for k in counts if k not in exclude)
        share = left * n / (n + d)
        for key, c in counts.items():
            if key not in exclude:
                _add(out, key, share * c / n, why)
        left -= share
    return out


def _halve(c: Counter[str]) -> Counter[str]:
    return Counter({k: v / 2 for k, v in c.items() if v >= 2})


def _sum(tables: Sequence[Counter[str]]) -> Counter[str]:
    out: Counter[str] = Counter()
    for c in tables:
        out.update(c)
    return out


class MarkovChain:
    """The baseline: first-order transitions from the previous access (any pause), else popularity."""

    name = "markov-1"

    def __init__(self) -> None:
        self.transitions: dict[str, Counter[str]] = {}
        self.overall: Counter[str] = Counter()
        self.prev: str | None = None

    def observe(self, ts: float, key: str, size: int) -> None:
        if self.prev is not None and self.prev != key:
            self.transitions.setdefault(self.prev, Counter())[key] += 1
        self.overall[key] += 1
        self.prev = key

    def fit(self, requests: Iterable[Request]) -> MarkovChain:
        for ts, key, size in requests:
            self.observe(ts, key, size)
        return self

    def scores(self, ts: float) -> dict[str, float]:
        t = self.transitions.get(self.prev) if self.prev is not None else None
        if t:
            n = sum(t.values())
            return {k: c / n for k, c in t.items()}
        n = sum(self.overall.values()) or 1
        return {k: c / n for k, c in self.overall.items()}


class MostPopular:
    """The weakest baseline: always the models most used so far, whatever came before."""

    name = "most-popular"

    def __init__(self) -> None:
        self.overall: Counter[str] = Counter()

    def observe(self, ts: float, key: str, size: int) -> None:
        self.overall[key] += 1

    def fit(self, requests: Iterable[Request]) -> MostPopular:
        for ts, key, size in requests:
            self.observe(ts, key, size)
        return self

    def scores(self, ts: float) -> dict[str, float]:
        n = sum(self.overall.values()) or 1
        return {k: c / n for k, c in self.overall.items()}


def collapse_repeats(history: Iterable[Request], window: float = 5.0) -> list[Request]:
    """One access per use: a download's commit and the loader's touch a moment later are one request."""
    out: list[Request] = []
    for ts, key, size in history:
        if out and out[-1][1] == key and ts - out[-1][0] <= window:
            continue
        out.append((ts, key, size))
    return out
