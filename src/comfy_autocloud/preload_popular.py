"""Popular-model preloader (seed 004 §4.2): keep pinned and most-used models present, in the background.

Popularity outlives eviction: hit counts from the store index are folded into a small JSON history
next to the index, so a model that was evicted last night is fetched back before this morning's
first request. The preloader downloads through its own FetchService on the same Store (same files,
same single-flight locks) whose options carry a `RateLimiter`, and it yields: while any other download
runs it waits, and a preload that is running when one starts is cancelled (its partial file is kept
and resumed later), so it never slows an on-demand fetch.

With `predict_top` (AUTOCLOUD_PREDICT), it also learns from the store's access log which model tends to
follow which and what is used at this hour (`predict.Predictor`); a few seconds after each new access
it fetches the confident guesses for what comes next, after pinned and popular files, within the same
budget (a share of the cap) and at the same low priority.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from comfy_autocloud.errors import AutoCloudError, Cancelled
from comfy_autocloud.fetch.service import FetchResult, FetchService
from comfy_autocloud.fsutil import write_atomic
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.predict import MIN_SCORE, Predictor, collapse_repeats
from comfy_autocloud.progress import CancelToken, ProgressCallback
from comfy_autocloud.store import Entry, Store
from comfy_autocloud.transfer import RateLimiter

log = logging.getLogger(__name__)

BUDGET_FRACTION = 0.8  # of the cap: leave room for on-demand downloads without evicting what we preloaded


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
                 predicted: Sequence[str] = (), guess_room: int | None = None) -> list[ModelSpec]:
    """Specs to download now: pinned first, then the `top` most-used, then the `predicted` keys (lowest
    priority: the predictive preloader's guesses), while all chosen fit the budget. Guesses must also
    fit in `guess_room` (the cap's free room): a guess never makes the store evict anything.

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
    guess_keys = {s.key for s in guesses}
    for spec in pinned + popular + guesses:
        size = sizes.get(spec.key)
        present = size is not None
        if size is None:
            size = spec.size if spec.size is not None else history.get(spec.key, Popularity(0, None)).size
        if spec.key in guess_keys and not present and guess_room is not None:
            if size is None or size > guess_room:
                continue
            guess_room -= size
        if budget is not None:
            if size is None or used + size > budget:
                continue
            used += size
        if not present:
            plan.append(spec)
    return plan


class PopularPreloader:
    """Background thread: every `interval` seconds, make the planned models present (rate-limited, yielding)."""

    def __init__(self, store: Store, fetch: FetchService, specs: Callable[[], list[ModelSpec]], *,
                 rate: float, top: int = 10, interval: float = 3600.0, busy: Callable[[], bool] = lambda: False,
                 progress: ProgressCallback | None = None,
                 on_done: Callable[[ModelSpec, FetchResult | None, AutoCloudError | None], None] | None = None,
                 on_start: Callable[[ModelSpec], None] | None = None,
                 history_path: Path | None = None, poll: float = 0.2, predict_top: int = 0,
                 predict_poll: float = 5.0, min_score: float | None = None) -> None:
        self.store = store
        self.limiter = RateLimiter(rate)
        # Same store and locks as on-demand fetches; only the byte budget differs.
        self.fetch = FetchService(store, options=replace(fetch.options, limiter=self.limiter),
                                  integrity_attempts=fetch.integrity_attempts)
        self.specs = specs
        self.top = top
        self.interval = interval
        self.busy = busy
        self.progress = progress
        self.on_done = on_done
        self.on_start = on_start
        self.history_path = history_path or store.private / "popularity.json"
        self.poll = poll
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.yielded = 0  # how many times a running preload stepped aside for another download
        # Predictive preloading: after each new access in the store's access log, fetch the `predict_top`
        # models most likely to be asked for next (learned from that log), at the same low priority.
        self.predict_top = max(0, predict_top)
        self.predict_poll = predict_poll
        self.min_score = MIN_SCORE if min_score is None else min_score
        self._seen_access = -1

    def predicted(self) -> list[str]:
        """Keys likely to be asked for next, given the newest access (empty when nothing is confident)."""
        if not self.predict_top:
            return []
        history = collapse_repeats(self.store.access_history())
        if not history:
            return []
        model = Predictor().fit(history)
        last = history[-1][1]
        now = time.time()
        scores = model.scores(last, now)
        return [k for k in model.predict(last, now, self.predict_top) if scores[k] >= self.min_score]

    def plan(self, *, predicted_only: bool = False) -> list[ModelSpec]:
        entries = self.store.entries()
        history = merge_history(read_history(self.history_path), entries)
        with contextlib.suppress(OSError):
            write_history(self.history_path, history)
        predicted = self.predicted()
        room = None
        if predicted and self.store.max_size is not None:
            usage = self.store.usage()
            room = int(self.store.max_size * BUDGET_FRACTION) - usage.bytes - usage.reserved_bytes
        if predicted_only:  # a quick pass between full ones: only the guesses (pinned/popular are done)
            return plan_popular(self.specs(), entries, {}, self.store.max_size, 0, predicted=predicted,
                                guess_room=room)
        return plan_popular(self.specs(), entries, history, self.store.max_size, self.top, predicted=predicted,
                            guess_room=room)

    def _wait_idle(self) -> bool:
        while self.busy():
            if self._stop.wait(self.poll):
                return False
        return not self._stop.is_set()

    def _fetch_yielding(self, spec: ModelSpec) -> FetchResult | None:
        """Fetch `spec`, stepping aside (cancel, keep the partial, resume later) whenever busy()."""
        while self._wait_idle():
            token = CancelToken()
            watching = threading.Event()

            def watch(token: CancelToken = token, watching: threading.Event = watching) -> None:
                while not watching.wait(self.poll):
                    if self.busy() or self._stop.is_set():
                        token.cancel()
                        return

            watcher = threading.Thread(target=watch, name="autocloud-preload-watch", daemon=True)
            watcher.start()
            try:
                return self.fetch.fetch(spec, progress=self.progress, cancel=token)
            except Cancelled:
                self.yielded += 1
                log.info("autocloud: preload of %s paused for another download", spec.key)
            finally:
                watching.set()
                watcher.join()
        return None

    def run_once(self, *, predicted_only: bool = False) -> list[str]:
        """One pass; returns the keys it made present."""
        done: list[str] = []
        if self.predict_top:
            self._seen_access = self.store.last_access_id()
        for spec in self.plan(predicted_only=predicted_only):
            if self._stop.is_set():
                break
            if self.on_start is not None:
                self.on_start(spec)
            try:
                result = self._fetch_yielding(spec)
            except AutoCloudError as exc:
                log.warning("autocloud: preload of %s failed: %s", spec.key, exc)
                if self.on_done is not None:
                    self.on_done(spec, None, exc)
                continue
            if self.on_done is not None:
                self.on_done(spec, result, None)
            if result is not None:
                done.append(spec.key)
        return done

    def _loop(self) -> None:
        next_full = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_full:
                    next_full = time.monotonic() + self.interval
                    made = self.run_once()
                elif self.predict_top and self.store.last_access_id() != self._seen_access:
                    made = self.run_once(predicted_only=True)  # something was used: prefetch what follows it
                else:
                    made = []
                if made:
                    log.info("autocloud: preloaded %s", ", ".join(made))
            except Exception:
                log.exception("autocloud: preloader pass failed")
            wait = min(self.interval, self.predict_poll) if self.predict_top else self.interval
            if self._stop.wait(wait):
                return

    def start(self) -> PopularPreloader:
        self._thread = threading.Thread(target=self._loop, name="autocloud-preloader", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
