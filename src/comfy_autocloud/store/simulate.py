"""Replay an access trace through an eviction policy to compare policies before changing a node's cache.

The replay uses the Store's own `Policy.priority`, `Policy.clock_after`, `Policy.observe` and
`select_victims`; only the table of items lives in memory instead of SQLite. A miss is admitted the
way `Store.reserve()` admits a download: evict just enough to fit, never the key itself; a file
larger than the cache is not cached.

For a policy whose rank of a file changes only when that file is requested (`local_rank`: the
textbook ones and the decayed-frequency ones), the simulator keeps its files in a heap with lazy
deletion instead of sorting the table at each miss: the same victims in the same order (the rank is a
total order), in O(log n) per request. That is what makes the adaptive default's shadow caches cheap
to replay (`eviction.AdaptivePolicy`).
"""

from __future__ import annotations

import csv
import heapq
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from comfy_autocloud.errors import ManifestError
from comfy_autocloud.store.eviction import Item, get_policy, select_victims

Request = tuple[float, str, int]


@dataclass(frozen=True)
class SimResult:
    policy: str
    byte_hit_ratio: float
    object_hit_ratio: float
    evictions: int
    requests: int
    bytes_requested: int
    bytes_hit: int
    hits: int
    capacity: int

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Simulator:
    """An in-memory cache driven by the Store's policy code; `request()` returns True on a hit."""

    def __init__(self, capacity: int, policy: str = "default") -> None:
        self.capacity = capacity
        self.policy = get_policy(policy, capacity)
        self.table: dict[str, Item] = {}
        self.used = 0
        self.clock = 0.0
        self.evictions = 0
        # (rank, stamp) per file, lowest first; an entry whose stamp is not the file's current one is stale.
        self._heap: list[tuple[tuple[float, float, str], int]] | None = \
            [] if getattr(self.policy, "local_rank", False) else None
        self._stamp: dict[str, int] = {}
        self._tick = 0
        self._generation = getattr(self.policy, "generation", 0)

    def request(self, now: float, key: str, size: int) -> bool:
        hit = self._request(now, key, size)
        if self.policy.stateful:  # after the request, as the Store's access log records it
            self.policy.observe(now, key, size)
        if self._heap is not None:
            item = self.table.get(key)
            if item is not None:  # its rank changed (or it is new): a fresh entry, the old one goes stale
                self._tick += 1
                self._stamp[key] = self._tick
                heapq.heappush(self._heap, (self.policy.rank(item), self._tick))
        return hit

    def load(self, items: Iterable[Item], *, used: int, clock: float, evictions: int) -> None:
        """Restore a saved table (see `AdaptivePolicy.state`): the same cache as the one saved."""
        self.table = {it.key: it for it in items}
        self.used, self.clock, self.evictions = used, clock, evictions
        self._stamp = {}
        if self._heap is not None:
            self._rebuild()

    def _rebuild(self) -> None:
        """Every file's current rank, no stale entries (after the policy forgot keys, or to bound the heap)."""
        heap: list[tuple[tuple[float, float, str], int]] = []
        for key, item in self.table.items():
            self._tick += 1
            self._stamp[key] = self._tick
            heap.append((self.policy.rank(item), self._tick))
        heapq.heapify(heap)
        self._heap = heap
        self._generation = getattr(self.policy, "generation", 0)

    def _victims(self, need: int) -> list[Item]:
        """Lowest-ranked files first until `need` bytes are free (what `select_victims` picks here)."""
        if self._heap is None:
            return select_victims(self.policy, self.table.values(), need)
        if self._generation != getattr(self.policy, "generation", 0) or len(self._heap) > 2 * len(self.table) + 64:
            self._rebuild()
        heap, stamp, table = self._heap, self._stamp, self.table
        victims: list[Item] = []
        freed = 0
        while freed < need and heap:
            rank, tick = heapq.heappop(heap)
            key = rank[2]
            if stamp.get(key) != tick:
                continue
            del stamp[key]
            item = table[key]
            victims.append(item)
            freed += item.size
        return victims

    def _request(self, now: float, key: str, size: int) -> bool:
        pol, table = self.policy, self.table
        item = table.get(key)
        if item is not None and item.size == size:
            item.hits += 1
            item.last_access = now
            item.priority = pol.priority(item.size, item.hits, now, self.clock)
            return True
        if item is not None:  # same key, new content: the download replaces it
            self.used -= item.size
            del table[key]
            self._stamp.pop(key, None)
        if size > self.capacity:
            return False
        need = self.used + size - self.capacity
        if need > 0:  # `key` is not in the table: nothing to protect
            victims = self._victims(need)
            if sum(v.size for v in victims) < need:  # no hardlinks here; cannot happen as size <= capacity
                return False
            for v in victims:
                del table[v.key]
                self.used -= v.size
            self.evictions += len(victims)
            self.clock = pol.clock_after(self.clock, victims)
        table[key] = Item(key=key, size=size, last_access=now, hits=1, created=now,
                          priority=pol.priority(size, 1, now, self.clock))
        self.used += size
        return False


def simulate(trace: Iterable[Request], capacity: int, policy: str = "default") -> SimResult:
    """Replay `(timestamp, key, size)` requests against a cache of `capacity` bytes."""
    sim = Simulator(capacity, policy)
    requests = hits = bytes_requested = bytes_hit = 0
    for now, key, size in trace:
        requests += 1
        bytes_requested += size
        if sim.request(now, key, size):
            hits += 1
            bytes_hit += size
    return SimResult(
        policy=sim.policy.name,
        byte_hit_ratio=bytes_hit / bytes_requested if bytes_requested else 0.0,
        object_hit_ratio=hits / requests if requests else 0.0,
        evictions=sim.evictions,
        requests=requests,
        bytes_requested=bytes_requested,
        bytes_hit=bytes_hit,
        hits=hits,
        capacity=capacity,
    )


def held_out_byte_hit_ratio(trace: Sequence[Request], capacity: int, policy: str = "default"
                            ) -> tuple[float, Simulator]:
    """Byte hit ratio on the second half of `trace`, the cache warmed by the first (how the policies are
    compared on requests they have not learned from), and the simulator, to look at what it learned."""
    sim = Simulator(capacity, policy)
    split = len(trace) // 2
    asked = hit = 0
    for i, (now, key, size) in enumerate(trace):
        h = sim.request(now, key, size)
        if i >= split:
            asked += size
            hit += size if h else 0
    return (hit / asked if asked else 0.0), sim


def read_trace(path: str | Path) -> Iterator[Request]:
    """Stream a CSV trace with header `timestamp,key,size`; bad rows raise ManifestError 'file:line'."""
    path = Path(path)
    try:
        fh = path.open(newline="", encoding="utf-8")
    except OSError as exc:
        raise ManifestError(str(path), f"cannot read trace: {exc.strerror or exc}") from exc
    with fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ManifestError(f"{path}:1", "empty trace (expected header 'timestamp,key,size')")
        if [h.strip().lower() for h in header] != ["timestamp", "key", "size"]:
            raise ManifestError(f"{path}:1", f"header must be 'timestamp,key,size', got {','.join(header)!r}")
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) != 3:
                raise ManifestError(f"{path}:{line}",
                                    f"expected 3 columns (timestamp,key,size), got {len(row)}")
            ts_text, key, size_text = (c.strip() for c in row)
            try:
                ts = float(ts_text)
            except ValueError:
                raise ManifestError(f"{path}:{line}", f"timestamp {ts_text!r} is not a number") from None
            if not math.isfinite(ts):
                raise ManifestError(f"{path}:{line}", f"timestamp {ts_text!r} is not finite")
            if not key:
                raise ManifestError(f"{path}:{line}", "key is empty")
            try:
                size = int(size_text)
            except ValueError:
                raise ManifestError(f"{path}:{line}",
                                    f"size {size_text!r} is not a whole number of bytes") from None
            if size < 0:
                raise ManifestError(f"{path}:{line}", f"size {size} is negative")
            yield ts, key, size


def write_trace(path: str | Path, trace: Iterable[Request]) -> None:
    with Path(path).open("w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "key", "size"])
        for ts, key, size in trace:
            w.writerow([f"{ts:.3f}", key, size])
