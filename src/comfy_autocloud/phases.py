"""Where the time of one operation went, step by step (`autocloud fetch -v` prints it).

Each layer laps the steps it owns into the same dict (the engine: probe, transfer, hash tail; the
store: fsync, rename, index), so the breakdown of one fetch adds up to its wall-clock time.
"""

from __future__ import annotations

import time

# The steps of one fetch in the order they happen (how breakdowns are printed).
STEPS = ("startup", "probe", "reserve", "transfer", "hash_tail", "records", "fsync", "rename", "index")


def in_order(times: dict[str, float]) -> dict[str, float]:
    """`times` with the known steps first, in the order they happen."""
    rank = {name: i for i, name in enumerate(STEPS)}
    return dict(sorted(times.items(), key=lambda kv: rank.get(kv[0], len(STEPS))))


class Laps:
    """Adds the seconds since the previous lap to `times[name]` (a name lapped twice accumulates)."""

    def __init__(self, times: dict[str, float] | None = None) -> None:
        self.times: dict[str, float] = times if times is not None else {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> float:
        now = time.perf_counter()
        spent = now - self._last
        self.times[name] = self.times.get(name, 0.0) + spent
        self._last = now
        return spent

    def lap_with(self, name: str, inner: dict[str, float]) -> None:
        """Lap `name`, telling apart the steps a callee timed inside it (`inner`); the rest stays `name`."""
        self.lap(name)
        for step, secs in inner.items():
            if step != name:
                self.times[step] = self.times.get(step, 0.0) + secs
                self.times[name] -= secs

    def skip(self) -> None:
        """Start the next lap now (time since the last lap belongs to no step of ours)."""
        self._last = time.perf_counter()


def process_age() -> float | None:
    """Seconds since this process started (from /proc; None where there is no /proc)."""
    try:
        with open("/proc/self/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
    except (OSError, IndexError, ValueError):
        return None
    import os

    return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
