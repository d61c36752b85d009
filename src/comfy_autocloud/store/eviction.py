"""Eviction policies and the one victim selector shared by the Store and the simulator.

A policy ranks cached files (`rank(item)`, lowest evicted first). The textbook ones are pure
functions of one row: `priority(size, hits, now, clock) -> float` plus a rule for the aging clock; the
Store registers `priority` as an SQLite function so `touch()` is a single UPDATE. Stateful policies
also learn from the request stream (`observe(now, key, size)`): the Store feeds them its access log
before it picks victims, the simulator after each request, so a simulated byte hit ratio is the
ratio the real store would get on that trace.

* "lru": last access. "lfuda": Greedy-Dual with cost = size, H = L + hits (LFU with dynamic aging).
  "gdsf": cost = 1, H = L + hits / size (keeps many small files: object hits, not bytes).
  "gdlfu": LFU-DA plus a fixed per-download cost (`DOWNLOAD_COST_BYTES`): small files get a modest
  bonus, big ones are ranked by frequency alone (the default before the adaptive policy).
* "lrfu-1d", "lrfu-14d": exponentially decayed request frequency (half-life one day / two weeks),
  remembered for files that were evicted (a ghost history), so a model that comes back every morning
  or every Monday is known when it does, and a batch job's one-off models rank below it.
* "lrfu-tod": decayed frequency (half-life two weeks) per hour of the day, ranked by the requests in
  the next hours of the day (load follows the time of day: a model used every morning outranks one
  used every night when the morning comes) plus a share of the key's requests at any hour.
* "lrfu-next": Belady's farthest-next-request rule with the future estimated: per-hour request rates
  from the hourly decayed frequency make a daily Poisson process, whose expected wait to the next
  request ranks the files (a model used daily at 9:00 keeps its place after 9:00; a window of the
  coming hours, as in lrfu-tod, swaps big daily checkpoints in and out with the time of day).
* "default" (adaptive): a shadow cache of the same capacity per candidate (the policies above but
  lrfu-tod, which lrfu-next replaces; lrfu-next first, the choice before evidence), all
  fed every request; each shadow's byte hits decay with a half-life of `ADAPT_HALF_LIFE` requests.
  The best shadow decides which real files go: files it no longer holds first, then in its order.
  It hands over only when another shadow is `HYSTERESIS` better at an epoch boundary (no flapping).
  On the project's traces (`bench/eviction.py`) no single policy wins everywhere: LRU wins while
  habits drift fast in a small cache, decayed frequency with a long memory wins the stable
  workloads with batch scans; following the best shadow keeps up with whichever wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

# Fixed cost of one download expressed in bytes: ~1 s of setup + verification at ~128 MiB/s.
DOWNLOAD_COST_BYTES = 128 * 2**20


@dataclass
class Item:
    """What eviction needs to know about one cached file (a row of the index, or of the simulator)."""

    key: str
    size: int
    last_access: float
    hits: int = 1
    created: float = 0.0
    pinned: bool = False
    in_use: bool = False
    priority: float = 0.0
    # Files sharing one inode (hardlinked twins) free their bytes only when the last of them goes.
    group: object | None = None


Rank = tuple[float, float, str]


class Policy(Protocol):
    name: str
    stateful: bool  # learns from `observe` (the Store then feeds it its access log)

    def priority(self, size: int, hits: int, now: float, clock: float) -> float:
        """Priority of a file right after an access (or insert); lower values are evicted first."""
        ...

    def clock_after(self, clock: float, victims: Sequence[Item]) -> float:
        """The aging clock after evicting `victims` (unchanged for policies without aging)."""
        ...

    def rank(self, item: Item) -> Rank:
        """Eviction order: lowest first."""
        ...

    def observe(self, now: float, key: str, size: int) -> None:
        """One request (hit or miss) of the stream the cache sees; a no-op for row-only policies."""
        ...


class _RowPolicy:
    """A policy that ranks by the row's stored priority and learns nothing from the stream."""

    stateful = False
    local_rank = True  # a file's rank changes only when it is requested (the simulator keeps a heap)

    def rank(self, item: Item) -> Rank:
        return (item.priority, item.last_access, item.key)

    def observe(self, now: float, key: str, size: int) -> None:
        return None


class LRUPolicy(_RowPolicy):
    """Least recently used: priority is the time of the last access. The baseline."""

    name = "lru"

    def priority(self, size: int, hits: int, now: float, clock: float) -> float:
        return float(now)

    def clock_after(self, clock: float, victims: Sequence[Item]) -> float:
        return clock


class GreedyDualPolicy(_RowPolicy):
    """Greedy-Dual family: H = L + hits * cost(size) / size, L = priority of the last evicted file.

    cost(size) = size * size_weight + fixed_cost. size_weight=1, fixed_cost=0 is LFUDA; size_weight=0,
    fixed_cost=1 is classic GDSF; the default adds a per-download cost to LFUDA (see module docstring).
    """

    def __init__(self, name: str, *, size_weight: float, fixed_cost: float) -> None:
        self.name = name
        self.size_weight = size_weight
        self.fixed_cost = fixed_cost

    def priority(self, size: int, hits: int, now: float, clock: float) -> float:
        size = max(int(size), 1)
        return float(clock) + max(int(hits), 1) * (self.size_weight * size + self.fixed_cost) / size

    def clock_after(self, clock: float, victims: Sequence[Item]) -> float:
        if not victims:
            return clock
        return max(clock, max(v.priority for v in victims))


class DecayedFrequencyPolicy:
    """LRFU with a ghost history: rank = log2 of sum(2^(t_i / half_life)) over the key's requests, kept
    for evicted keys too (so it is stateful: it needs the stream, not only the row)."""

    stateful = True
    local_rank = True  # a request changes only its own key's weight; forgetting bumps `generation`
    FORGET = 40.0  # a key whose weight fell below 2^-FORGET of a fresh request is forgotten

    def __init__(self, name: str, half_life: float, max_keys: int = 100_000) -> None:
        self.name = name
        self.half_life = half_life
        self.max_keys = max_keys
        self.weight: dict[str, float] = {}  # key -> log2 sum 2^(t_i / half_life)
        self._seen = 0
        self.generation = 0  # bumped when keys are forgotten (their files' ranks drop to -inf)

    def priority(self, size: int, hits: int, now: float, clock: float) -> float:
        return float(now)  # the stored column (not used for ranking): the last access, as for LRU

    def clock_after(self, clock: float, victims: Sequence[Item]) -> float:
        return clock

    def rank(self, item: Item) -> Rank:
        return (self.weight.get(item.key, -math.inf), item.last_access, item.key)

    def state(self, keys: dict[str, int]) -> dict[str, Any]:
        """What it has learned, JSON-ready, keys as indexes into a shared key table (see `AdaptivePolicy`)."""
        return {"seen": self._seen, "weight": [[keys.setdefault(k, len(keys)), w] for k, w in self.weight.items()]}

    def load_state(self, state: dict[str, Any], keys: Sequence[str]) -> None:
        weight = {keys[int(i)]: float(w) for i, w in state["weight"]}
        self._seen, self.weight = int(state["seen"]), weight
        self.generation += 1

    def observe(self, now: float, key: str, size: int) -> None:
        x = now / self.half_life
        old = self.weight.get(key)
        self.weight[key] = x if old is None else max(old, x) + math.log2(1.0 + 2.0 ** -abs(old - x))
        self._seen += 1
        if self._seen % 1000 == 0 or len(self.weight) > self.max_keys:
            floor = x - self.FORGET
            self.generation += 1
            kept = sorted(((w, k) for k, w in self.weight.items() if w >= floor), reverse=True)
            self.weight = {k: w for w, k in kept[:self.max_keys * 3 // 4 or 1]} if len(kept) > self.max_keys \
                else {k: w for w, k in kept}


class HourlyFrequencyPolicy:
    """Decayed request frequency per hour of the day: rank = log2 of (the key's decayed requests in the
    `window` hours from the current hour on, over past days + `mix` x its decayed requests at any hour).
    Loads follow the time of day (people work at their own hours), so at 9:00 the models used in the
    mornings outrank the ones used at night even when those are as frequent; the ghost history keeps
    evicted keys. The rank moves with the clock, so the simulator sorts instead of keeping a heap."""

    stateful = True
    local_rank = False
    FORGET = 40.0  # forgotten when its total fell below 2^-FORGET of one fresh request
    RESCALE = 256.0  # half-lives after which the stored weights are scaled down (floats stay finite)

    def __init__(self, name: str, half_life: float, *, window: int = 8, mix: float = 0.3,
                 max_keys: int = 100_000) -> None:
        self.name = name
        self.half_life = half_life
        self.window = window
        self.mix = mix
        self.max_keys = max_keys
        self.weight: dict[str, list[float]] = {}  # key -> 24 sums of 2^((t_i - anchor) / half_life)
        self.anchor: float | None = None
        self.now = 0.0
        self._seen = 0

    def priority(self, size: int, hits: int, now: float, clock: float) -> float:
        return float(now)

    def clock_after(self, clock: float, victims: Sequence[Item]) -> float:
        return clock

    def rank(self, item: Item) -> Rank:
        bins = self.weight.get(item.key)
        if bins is None:
            return (-math.inf, item.last_access, item.key)
        hour = int(self.now % 86400.0 // 3600.0)
        near = sum(bins[(hour + j) % 24] for j in range(self.window))
        value = near + self.mix * sum(bins)
        return (math.log2(value) if value > 0 else -math.inf, item.last_access, item.key)

    def observe(self, now: float, key: str, size: int) -> None:
        self.now = now
        if self.anchor is None:
            self.anchor = now
        x = (now - self.anchor) / self.half_life
        if x > self.RESCALE:
            scale = 2.0 ** -x
            self.weight = {k: [w * scale for w in bins] for k, bins in self.weight.items()}
            self.anchor, x = now, 0.0
        bins = self.weight.get(key)
        if bins is None:
            bins = self.weight[key] = [0.0] * 24
        bins[int(now % 86400.0 // 3600.0)] += 2.0 ** x
        self._seen += 1
        if self._seen % 1000 == 0 or len(self.weight) > self.max_keys:
            floor = 2.0 ** (x - self.FORGET)
            kept = sorted(((sum(b), k) for k, b in self.weight.items() if sum(b) >= floor), reverse=True)
            keep = kept[:self.max_keys * 3 // 4 or 1] if len(kept) > self.max_keys else kept
            self.weight = {k: self.weight[k] for _t, k in keep}

    def state(self, keys: dict[str, int]) -> dict[str, Any]:
        """Weights as [key index, [hour, weight, hour, weight, ...]] over the hours it was requested at."""
        weight = [[keys.setdefault(k, len(keys)), [v for h, w in enumerate(b) if w for v in (h, w)]]
                  for k, b in self.weight.items()]
        return {"seen": self._seen, "anchor": self.anchor, "now": self.now, "weight": weight}

    def load_state(self, state: dict[str, Any], keys: Sequence[str]) -> None:
        weight: dict[str, list[float]] = {}
        for i, flat in state["weight"]:
            bins = weight[keys[int(i)]] = [0.0] * 24
            for h, w in zip(flat[::2], flat[1::2], strict=True):
                bins[int(h)] = float(w)
        anchor = None if state["anchor"] is None else float(state["anchor"])
        self._seen, self.anchor, self.now, self.weight = int(state["seen"]), anchor, float(state["now"]), weight


def _circular_kernel(sigma_hours: float, reach: int = 3) -> tuple[tuple[int, float], ...]:
    """(offset, weight) of a Gaussian over the hours of the day, `reach` hours each side, summing to 1."""
    raw = [(d, math.exp(-0.5 * (d / sigma_hours) ** 2)) for d in range(-reach, reach + 1)]
    total = sum(w for _d, w in raw)
    return tuple((d, w / total) for d, w in raw)


class NextRequestPolicy(HourlyFrequencyPolicy):
    """Expected time to a key's next request; the file whose next request is furthest away goes first.

    Belady's rule (evict what is needed last) with the future replaced by an estimate: the decayed
    requests per hour of the day (as `lrfu-tod`, smoothed over +-`smooth_hours`, since a user's
    sessions wander around their usual hour) divided by the days they were counted over (the key's age,
    at least `min_span`, at most the decay's mean reach half_life / ln 2) give a request rate for each
    hour of the day; plus `prior` per hour, since any model can come back. With
    those rates as a Poisson process repeating every day, the expected wait is exact and cheap (24 terms).
    Unlike a fixed window of coming hours it neither forgets a model used daily at 9:00 once 9:00 is
    past (a window does, so the cache swaps big daily checkpoints in and out with the time of day) nor
    keeps one used at this hour only now and then. Size-neutral, as a byte hit ratio asks: a file's
    bytes are worth what its requests are worth.
    """

    def __init__(self, name: str, half_life: float, *, smooth_hours: float = 1.0, prior: float = 0.01,
                 min_span: float = 3 * 86400.0, max_keys: int = 100_000) -> None:
        super().__init__(name, half_life, window=24, mix=0.0, max_keys=max_keys)
        self.kernel = _circular_kernel(smooth_hours)
        self.prior = prior  # requests per hour of the day, per day, that any known key gets
        self.min_span = min_span  # a key seen only lately: its rate is its requests over at least this
        self.first: dict[str, float] = {}  # when each remembered key was first requested
        # Smoothed hourly weights per key, valid for the weight table `_smooth_of` (rescaling, forgetting
        # and loading replace the table); a request of a key drops its entry. Ranking is then ~10 us.
        self._smooth: dict[str, list[float]] = {}
        self._smooth_of: object = None

    def rank(self, item: Item) -> Rank:
        bins = self.weight.get(item.key)
        if bins is None or self.anchor is None:
            return (-math.inf, item.last_access, item.key)
        return (-self.expected_wait(item.key, bins), item.last_access, item.key)

    def expected_wait(self, key: str, bins: Sequence[float]) -> float:
        """Hours from now to the key's next request under its per-hour rates (see the class docstring)."""
        assert self.anchor is not None
        counted = min(self.half_life / math.log(2.0), max(self.now - self.first.get(key, self.now), self.min_span))
        scale = 2.0 ** (-(self.now - self.anchor) / self.half_life) * 86400.0 / counted  # -> requests per day
        if self._smooth_of is not self.weight:
            self._smooth, self._smooth_of = {}, self.weight
        smooth = self._smooth.get(key)
        if smooth is None:
            smooth = self._smooth[key] = [sum(bins[(h - d) % 24] * w for d, w in self.kernel) for h in range(24)]
        prior = self.prior
        rate = [prior + scale * v for v in smooth]
        clock = (self.now % 86400.0) / 3600.0
        hour, into = int(clock), clock - int(clock)
        # The coming 24 hours as (hour of the day, hours of it): the rest of this hour, 23 whole hours, the
        # start of this hour tomorrow. Survival-weighted time spent in each: the expected wait in one day.
        spans = [(hour, 1.0 - into)] + [((hour + j) % 24, 1.0) for j in range(1, 24)] + [(hour, into)]
        wait = seen = 0.0  # seen: expected requests so far
        alive = 1.0  # the chance that none came so far, e^-seen
        for h, length in spans:
            lam = rate[h]
            x = lam * length
            if x > 0.0:
                came = -math.expm1(-x)
                wait += alive * came / lam
                alive -= alive * came
                seen += x
            else:
                wait += alive * length
        if seen <= 0.0:
            return math.inf
        return wait / -math.expm1(-seen)  # the day repeats: sum over days of e^(-seen) per day

    def observe(self, now: float, key: str, size: int) -> None:
        self.first.setdefault(key, now)
        super().observe(now, key, size)
        self._smooth.pop(key, None)
        if len(self.first) > len(self.weight):  # the hourly weights forgot keys: forget when they started
            self.first = {k: t for k, t in self.first.items() if k in self.weight}

    def state(self, keys: dict[str, int]) -> dict[str, Any]:
        out = super().state(keys)
        out["first"] = [[keys.setdefault(k, len(keys)), t] for k, t in self.first.items()]
        return out

    def load_state(self, state: dict[str, Any], keys: Sequence[str]) -> None:
        super().load_state(state, keys)
        self.first = {keys[int(i)]: float(t) for i, t in state["first"]}


_LEARNING = (DecayedFrequencyPolicy, HourlyFrequencyPolicy)  # policies with a `state()` to save

# The first is the choice before evidence.
ADAPT_CANDIDATES = ("lrfu-next", "lrfu-14d", "lrfu-1d", "lfuda", "gdlfu", "gdsf", "lru")
ADAPT_HALF_LIFE = 2000.0  # requests over which a shadow's byte hits count half as much
ADAPT_EPOCH = 100  # requests between decisions
HYSTERESIS = 0.03  # another shadow must be this much better (relative decayed byte hits) to take over


class SettingsChanged(ValueError):
    """A saved policy state from before the cap or the candidate policies changed: normal, relearn quietly."""


class AdaptivePolicy:
    """Shadow caches of the candidates on the same request stream; the best recent one decides."""

    stateful = True

    def __init__(self, capacity: int | None, candidates: Sequence[str] = ADAPT_CANDIDATES,
                 name: str = "default") -> None:
        from comfy_autocloud.store.simulate import Simulator  # the simulator is built on this module

        self.name = name
        self.capacity = capacity
        self.shadows = {c: Simulator(capacity, c) for c in candidates} if capacity else {}
        self.fallback = get_policy(candidates[0])  # no cap: nothing to shadow, rank by the first candidate
        self._stored = GreedyDualPolicy("gdlfu", size_weight=1.0, fixed_cost=DOWNLOAD_COST_BYTES)
        self.score = dict.fromkeys(candidates, 0.0)
        self.chosen = candidates[0]
        self.switches = 0
        self._seen = 0
        self._decay = 0.5 ** (1.0 / ADAPT_HALF_LIFE)

    def priority(self, size: int, hits: int, now: float, clock: float) -> float:
        """The stored column keeps a frequency-with-aging value (GD-LFU's) for listings; ranking is `rank`."""
        return self._stored.priority(size, hits, now, clock)

    def clock_after(self, clock: float, victims: Sequence[Item]) -> float:
        return self._stored.clock_after(clock, victims)

    def state(self, keys: dict[str, int] | None = None) -> dict[str, Any]:
        """Everything it has learned, JSON-ready and exact (floats round-trip): each shadow's table and
        clock, the decayed-frequency weights, the scores and the choice. Bounded: a shadow holds at most
        a cache's worth of files, a decayed-frequency one at most `max_keys` weights. Keys are stored once,
        as indexes into `keys`."""
        keys = {} if keys is None else keys
        shadows: dict[str, Any] = {}
        for name, sim in self.shadows.items():
            shadows[name] = {
                "used": sim.used, "clock": sim.clock, "evictions": sim.evictions,
                "table": [[keys.setdefault(it.key, len(keys)), it.size, it.last_access, it.hits, it.created,
                           it.priority] for it in sim.table.values()],
            }
            if isinstance(sim.policy, _LEARNING):
                shadows[name]["policy"] = sim.policy.state(keys)
        out: dict[str, Any] = {"policy": self.name, "capacity": self.capacity, "candidates": list(self.score),
                               "chosen": self.chosen, "switches": self.switches, "seen": self._seen,
                               "score": self.score, "shadows": shadows}
        if not self.shadows and isinstance(self.fallback, _LEARNING):
            out["fallback"] = self.fallback.state(keys)
        out["keys"] = sorted(keys, key=keys.__getitem__)
        return out

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from `state()`; SettingsChanged (a ValueError) if it was saved by a policy of another
        capacity or candidates (then nothing changes)."""
        from comfy_autocloud.store.simulate import Simulator

        if (state.get("policy"), state.get("capacity"), state.get("candidates")) != \
                (self.name, self.capacity, list(self.score)):
            raise SettingsChanged(f"saved for policy {state.get('policy')!r} with capacity {state.get('capacity')} and "
                             f"candidates {state.get('candidates')}, not {self.name!r} with {self.capacity} and "
                             f"{list(self.score)}")
        keys = [str(k) for k in state["keys"]]
        shadows = {}
        for name in self.shadows:
            saved = state["shadows"][name]
            sim = Simulator(self.capacity or 0, name)
            if isinstance(sim.policy, _LEARNING):
                sim.policy.load_state(saved["policy"], keys)
            items = [Item(key=keys[int(k)], size=int(n), last_access=float(t), hits=int(h), created=float(c),
                          priority=float(p)) for k, n, t, h, c, p in saved["table"]]
            sim.load(items, used=int(saved["used"]), clock=float(saved["clock"]), evictions=int(saved["evictions"]))
            shadows[name] = sim
        score = {name: float(state["score"][name]) for name in self.score}
        if state["chosen"] not in score:
            raise ValueError(f"chosen policy {state['chosen']!r} is not a candidate")
        if not self.shadows and isinstance(self.fallback, _LEARNING):
            self.fallback.load_state(state["fallback"], keys)
        self.shadows, self.score = shadows, score
        self.chosen, self.switches, self._seen = str(state["chosen"]), int(state["switches"]), int(state["seen"])

    def rank(self, item: Item) -> Rank:
        if not self.shadows:
            return self.fallback.rank(item)
        sim = self.shadows[self.chosen]
        shadow = sim.table.get(item.key)
        if shadow is None:  # the best policy would not hold it: it goes first, oldest first
            return (-math.inf, item.last_access, item.key)
        return sim.policy.rank(shadow)

    def observe(self, now: float, key: str, size: int) -> None:
        if not self.shadows:
            self.fallback.observe(now, key, size)
            return
        for name, sim in self.shadows.items():
            hit = sim.request(now, key, size)
            self.score[name] = self.score[name] * self._decay + (size if hit else 0)
        self._seen += 1
        if self._seen % ADAPT_EPOCH == 0:
            best = max(self.score, key=lambda n: (self.score[n], n == self.chosen))
            if self.score[best] > self.score[self.chosen] * (1.0 + HYSTERESIS):
                self.chosen = best
                self.switches += 1


_POLICIES: dict[str, Callable[[int | None], Policy]] = {
    "default": lambda cap: AdaptivePolicy(cap),
    "lfuda": lambda cap: GreedyDualPolicy("lfuda", size_weight=1.0, fixed_cost=0.0),
    "gdsf": lambda cap: GreedyDualPolicy("gdsf", size_weight=0.0, fixed_cost=1.0),
    "lru": lambda cap: LRUPolicy(),
    "gdlfu": lambda cap: GreedyDualPolicy("gdlfu", size_weight=1.0, fixed_cost=DOWNLOAD_COST_BYTES),
    "lrfu-1d": lambda cap: DecayedFrequencyPolicy("lrfu-1d", 86400.0),
    "lrfu-14d": lambda cap: DecayedFrequencyPolicy("lrfu-14d", 14 * 86400.0),
    "lrfu-tod": lambda cap: HourlyFrequencyPolicy("lrfu-tod", 14 * 86400.0),
    "lrfu-next": lambda cap: NextRequestPolicy("lrfu-next", 14 * 86400.0),
}

POLICY_NAMES: tuple[str, ...] = tuple(_POLICIES)


def get_policy(name: str, capacity: int | None = None) -> Policy:
    """Policy by name ('default', 'lru', 'lfuda', 'gdsf', ...) for a cache of `capacity` bytes (the
    adaptive default sizes its shadow caches by it); ValueError lists the known names."""
    try:
        factory = _POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown eviction policy {name!r} (known: {', '.join(POLICY_NAMES)})") from None
    return factory(capacity)


def select_victims(
    policy: Policy, items: Iterable[Item], bytes_to_free: int, *, protect: Collection[str] = ()
) -> list[Item]:
    """Cheapest-first victims (in `policy.rank` order) that free at least `bytes_to_free` unique bytes.

    Never picks pinned or in-use items or keys in `protect`, nor a hardlink twin of one (that would free
    nothing). Returns [] if nothing needs freeing and every candidate if they are not enough; the caller
    checks `bytes_freed()` and refuses rather than evicting for nothing.
    """
    items = list(items)
    if bytes_to_free <= 0:
        return []
    blocked_groups: set[object] = set()
    group_members: dict[object, int] = {}
    for it in items:
        if it.group is None:
            continue
        group_members[it.group] = group_members.get(it.group, 0) + 1
        if it.pinned or it.in_use or it.key in protect:
            blocked_groups.add(it.group)
    candidates = sorted(
        (
            it for it in items
            if not (it.pinned or it.in_use or it.key in protect)
            and (it.group is None or it.group not in blocked_groups)
        ),
        key=policy.rank,
    )
    victims: list[Item] = []
    freed = 0
    remaining = dict(group_members)
    for it in candidates:
        victims.append(it)
        if it.group is None:
            freed += it.size
        else:
            remaining[it.group] -= 1
            if remaining[it.group] == 0:
                freed += it.size
        if freed >= bytes_to_free:
            break
    return victims


def bytes_freed(victims: Iterable[Item], items: Iterable[Item]) -> int:
    """Unique bytes that evicting `victims` releases (a hardlinked inode counts once, when fully gone)."""
    victims = list(victims)
    chosen = {v.key for v in victims}
    left_in_group: dict[object, int] = {}
    for it in items:
        if it.group is not None and it.key not in chosen:
            left_in_group[it.group] = left_in_group.get(it.group, 0) + 1
    freed = 0
    seen: set[object] = set()
    for v in victims:
        if v.group is None:
            freed += v.size
        elif v.group not in seen and left_in_group.get(v.group, 0) == 0:
            seen.add(v.group)
            freed += v.size
    return freed
