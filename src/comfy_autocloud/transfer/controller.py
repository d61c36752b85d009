"""How many connections a ranged download runs, and how large each request is.

The workers report what they measure into a `Throughput`; the `Controller` reads it on every tick
and answers with a connection count (`target`) and a request size (`piece`) that the download's
workers follow. Nothing here touches sockets or the file.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

log = logging.getLogger("comfy_autocloud.transfer")

START_CONNECTIONS = 8
MIN_SPLIT = 1 << 20           # never steal less than 1 MiB per side
MIN_PIECE = 4 << 20           # a worker's request when nothing is known yet
MAX_PIECE = 64 << 20


@dataclass
class Throughput:
    """What finished requests measured: (request start, bytes/s) samples and a smoothed round trip."""

    rtt: float = 0.001
    samples: list[tuple[float, float]] = field(default_factory=list)

    def answered(self, seconds: float) -> None:
        """Time from sending a request to its answer's headers."""
        self.rtt = 0.8 * self.rtt + 0.2 * seconds

    def finished(self, started: float, nbytes: int, now: float) -> None:
        """A request sent at `started` delivered `nbytes` by `now`."""
        if now > started and nbytes > 0:
            self.samples.append((started, nbytes / (now - started)))

    def rates_since(self, t: float) -> list[float]:
        """Rates of requests started at `t` or later, older samples dropped (callers ask with growing `t`)."""
        self.samples = [s for s in self.samples if s[0] >= t]
        return [rate for _, rate in self.samples]


class Controller:
    """Adaptive connection count: grow while aggregate throughput rises, back off when it stops.

    Throughput at a level is judged from the requests that *started* at that level: each finished
    request gives bytes / (time from sending it to its last byte), which averages out the bursts of
    paced origins (nginx sends a second's worth, then pauses) and includes round trips between
    requests. Aggregate = median per-request rate x connections. The count doubles while a step
    brings near-linear gains (an origin that throttles each connection), grows by a quarter while
    gains are modest, and returns to the previous count when the last step bought less than 20% of
    its proportional gain (CPU, disk or link saturated); after a pause it probes once more.
    A fixed controller keeps `target` as given.
    """

    def __init__(self, throughput: Throughput, target: int, *, fixed: bool, cap: int, display: str = "") -> None:
        self.throughput = throughput
        self.target = max(1, target)
        self.piece = MIN_PIECE
        self.fixed = fixed
        self.cap = cap
        self.display = display
        self.level_start = time.monotonic()
        self.prev: tuple[int, float] | None = None
        self.hold_until = 0.0
        self.probing_done = False

    def tick(self, running: int, unowned: int) -> None:
        """`running` connections now, `unowned` bytes no worker holds yet: update `target` and `piece`."""
        if self.fixed:
            return
        now = time.monotonic()
        n = running
        samples = self.throughput.rates_since(self.level_start)
        if not n or len(samples) < max(3, n // 2):
            return
        samples.sort()
        per_conn = samples[len(samples) // 2]
        rate = per_conn * n
        # Requests of ~1/4 s (or 20 round trips on slow links): few requests, short tails.
        self.piece = max(MIN_PIECE, min(MAX_PIECE, int(per_conn * max(0.25, 20 * self.throughput.rtt))))
        target = self.target
        if now < self.hold_until or unowned < 2 * target * MIN_SPLIT:
            self.level_start = now  # holding, or too little left to give more connections work
            return
        if self.prev is None or n <= self.prev[0]:
            new = min(self.cap, target * 2 if not self.probing_done else math.ceil(target * 1.25))
        else:
            prev_n, prev_rate = self.prev
            gain = rate / prev_rate - 1 if prev_rate > 0 else 1.0
            efficiency = gain / (n / prev_n - 1)
            if efficiency >= 0.5 and not self.probing_done:
                new = min(self.cap, target * 2)
            elif efficiency >= 0.2:
                new = min(self.cap, math.ceil(target * 1.25))
            else:
                new = prev_n  # the last step did not pay: back off, probe again later
                self.probing_done = True
                self.hold_until = now + 5.0
        if new == target:
            self.hold_until = now + 5.0
        self.prev = (n, rate) if new > n else None
        self.target = max(1, new)
        log.debug("%s: %d connections at %.1f MB/s -> %d", self.display, n, rate / 1e6, self.target)
        self.level_start = now
