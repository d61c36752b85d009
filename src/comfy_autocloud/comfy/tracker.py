"""Downloads in flight and counters, fed by the fetch service's progress events.

One place knows what is downloading, how fast and why (prefetch, on-demand, background, api), so the
status route, the Prometheus metrics, the websocket messages and the loaders' progress bars all agree.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from comfy_autocloud.progress import ProgressCallback, ProgressEvent

log = logging.getLogger(__name__)
BACKGROUND = "background"  # the reason of the background disk prefetcher's downloads (they yield to all others)

Listener = Callable[[dict[str, Any]], None]
SPEED_WINDOW = 3.0  # seconds of samples behind the reported speed
EMIT_EVERY = 0.25  # at most this often per key for byte updates (websocket traffic)


@dataclass
class Download:
    key: str
    reason: str  # prefetch | on-demand | background (the background disk prefetcher) | api
    phase: str = "queued"
    bytes_done: int = 0
    bytes_total: int | None = None
    started: float = field(default_factory=time.time)
    finished: float | None = None
    speed: float = 0.0  # bytes/s over the last SPEED_WINDOW seconds
    error: str | None = None
    cancelled: bool = False  # stopped by the user; the partial file (bytes_done of bytes_total) is kept
    source: str = ""
    _samples: deque[tuple[float, int]] = field(default_factory=deque, repr=False)
    _emitted: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if not k.startswith("_")}
        d["speed"] = round(self.speed, 1)
        end = self.finished or time.time()
        d["seconds"] = round(end - self.started, 3)
        if self.bytes_total and self.speed > 0 and self.finished is None:
            d["eta"] = round(max(0, self.bytes_total - self.bytes_done) / self.speed, 1)
        return d


@dataclass
class Counters:
    hits: int = 0
    misses: int = 0
    bytes_downloaded: int = 0
    download_seconds: float = 0.0
    downloads: int = 0
    errors: int = 0


class Tracker:
    """Thread-safe record of active and recent downloads; listeners get throttled update dicts."""

    def __init__(self, recent: int = 20) -> None:
        self._lock = threading.Lock()
        self._active: dict[str, Download] = {}
        self._recent: deque[Download] = deque(maxlen=recent)
        self._listeners: list[Listener] = []
        self.counters = Counters()

    # ------------------------------------------------------------------ feeding
    def add_listener(self, fn: Listener) -> None:
        self._listeners.append(fn)

    def begin(self, key: str, reason: str) -> None:
        """Announce a download; a background prefetch of the same key becomes this reason (so busy() sees it)."""
        with self._lock:
            dl = self._active.get(key)
            if dl is None:
                dl = self._active[key] = Download(key, reason)
            elif dl.reason == BACKGROUND and reason != BACKGROUND:
                dl.reason = reason
            else:
                return
            d = dl.as_dict()
        self._notify(d)

    def callback(self, reason: str) -> ProgressCallback:
        """A ProgressCallback for FetchService.fetch that attributes events to `reason`."""

        def on_event(ev: ProgressEvent) -> None:
            self.on_event(ev, reason)

        return on_event

    def on_event(self, ev: ProgressEvent, reason: str) -> None:
        now = time.time()
        with self._lock:
            dl = self._active.get(ev.key)
            if dl is None:
                if ev.phase in ("hit", "done", "error"):
                    return
                dl = self._active[ev.key] = Download(ev.key, reason)
            phase_changed = ev.phase != dl.phase
            dl.phase = ev.phase
            if ev.phase == "start":
                self.counters.misses += 1
                dl.source = ev.message
                dl.started = now
                dl._samples.clear()
            if ev.bytes_total is not None:
                dl.bytes_total = ev.bytes_total
            if ev.phase in ("download", "commit", "done"):
                dl.bytes_done = ev.bytes_done
            dl._samples.append((now, dl.bytes_done))
            while len(dl._samples) > 2 and now - dl._samples[0][0] > SPEED_WINDOW:
                dl._samples.popleft()
            t0, b0 = dl._samples[0]
            if now - t0 > 0.05:
                dl.speed = (dl.bytes_done - b0) / (now - t0)
            if not phase_changed and now - dl._emitted < EMIT_EVERY:
                return
            dl._emitted = now
            d = dl.as_dict()
        self._notify(d)

    def finish(self, key: str, *, error: str | None = None, bytes_downloaded: int = 0, seconds: float = 0.0,
               cached: bool = False, cancelled: bool = False) -> None:
        """Close the record of `key` (called once per submitted fetch, success or failure); the newest
        outcome of a key replaces older ones in `recent` (a retry that works clears the failure)."""
        with self._lock:
            dl = self._active.pop(key, None) or Download(key, "unknown")
            dl.finished = time.time()
            if cancelled:
                dl.phase, dl.error, dl.cancelled = "cancelled", error, True
            elif error is not None:
                dl.phase, dl.error = "error", error
                self.counters.errors += 1
            else:
                dl.phase = "hit" if cached else "done"
                if dl.bytes_total:
                    dl.bytes_done = dl.bytes_total
            if not cached and error is None:
                self.counters.downloads += 1
                self.counters.bytes_downloaded += bytes_downloaded
                self.counters.download_seconds += seconds
                if seconds > 0:
                    dl.speed = bytes_downloaded / seconds
            if not cached:
                self._forget(key)
                self._recent.appendleft(dl)
            d = dl.as_dict()
        self._notify(d)

    def _forget(self, key: str) -> bool:
        before = len(self._recent)
        kept = [d for d in self._recent if d.key != key]
        self._recent.clear()
        self._recent.extend(kept)
        return len(kept) != before

    def dismiss(self, key: str) -> bool:
        """Drop the finished download of `key` from `recent` (the panel's dismiss button)."""
        with self._lock:
            return self._forget(key)

    def hit(self) -> None:
        with self._lock:
            self.counters.hits += 1

    # ------------------------------------------------------------------ reading
    def active(self) -> list[dict[str, Any]]:
        with self._lock:
            return [d.as_dict() for d in sorted(self._active.values(), key=lambda d: d.started)]

    def recent(self) -> list[dict[str, Any]]:
        with self._lock:
            return [d.as_dict() for d in self._recent]

    def busy(self, *, ignore: tuple[str, ...] = (BACKGROUND,)) -> bool:
        """True while a download other than `ignore`d kinds runs (the background prefetcher yields to these)."""
        with self._lock:
            return any(d.reason not in ignore for d in self._active.values())

    def state(self, key: str) -> Download | None:
        with self._lock:
            dl = self._active.get(key)
            return None if dl is None else Download(dl.key, dl.reason, dl.phase, dl.bytes_done, dl.bytes_total,
                                                    dl.started, dl.finished, dl.speed, dl.error, dl.cancelled,
                                                    dl.source)

    def counters_dict(self) -> dict[str, Any]:
        with self._lock:
            return asdict(self.counters)

    def _notify(self, payload: dict[str, Any]) -> None:
        for fn in list(self._listeners):
            try:
                fn(payload)
            except Exception:  # a broken listener (closed websocket) must not break a download
                log.debug("autocloud: progress listener failed", exc_info=True)
