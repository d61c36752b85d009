"""Popular-model preloader (seed 004 §4.2): keep pinned and most-used models present, in the background.

Popularity outlives eviction: hit counts from the store index are folded into a small JSON history
next to the index, so a model that was evicted last night is fetched back before this morning's
first request. The preloader downloads through its own FetchService on the same Store (same files,
same single-flight locks) whose options carry a `RateLimiter`, and it yields: while any other download
runs it waits, and a preload that is running when one starts is cancelled (its partial file is kept
and resumed later), so it never slows an on-demand fetch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from comfy_autocloud.errors import AutoCloudError, Cancelled
from comfy_autocloud.fetch.service import FetchResult, FetchService
from comfy_autocloud.manifest.spec import ModelSpec
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
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({k: {"hits": p.hits, "size": p.size} for k, p in sorted(history.items())}),
                   encoding="utf-8")
    os.replace(tmp, path)


def plan_popular(specs: Sequence[ModelSpec], cached: Iterable[Entry], history: dict[str, Popularity],
                 cap: int | None, top: int, budget_fraction: float = BUDGET_FRACTION) -> list[ModelSpec]:
    """Specs to download now: pinned first, then the `top` most-used, while all chosen fit the budget.

    Chosen files already cached count against the budget too; a missing file of unknown size is only
    planned when there is no cap (we cannot promise it fits).
    """
    sizes = {e.key: e.size for e in cached}
    fetchable = [s for s in specs if s.sources]
    pinned = [s for s in fetchable if s.pin]
    popular = sorted((s for s in fetchable if not s.pin and history.get(s.key, Popularity(0, None)).hits > 0),
                     key=lambda s: (-history[s.key].hits, s.key))[:max(0, top)]
    budget = None if cap is None else cap * budget_fraction
    used = 0
    plan: list[ModelSpec] = []
    for spec in pinned + popular:
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


class PopularPreloader:
    """Background thread: every `interval` seconds, make the planned models present (rate-limited, yielding)."""

    def __init__(self, store: Store, fetch: FetchService, specs: Callable[[], list[ModelSpec]], *,
                 rate: float, top: int = 10, interval: float = 3600.0, busy: Callable[[], bool] = lambda: False,
                 progress: ProgressCallback | None = None,
                 on_done: Callable[[ModelSpec, FetchResult | None, AutoCloudError | None], None] | None = None,
                 on_start: Callable[[ModelSpec], None] | None = None,
                 history_path: Path | None = None, poll: float = 0.2) -> None:
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

    def plan(self) -> list[ModelSpec]:
        entries = self.store.entries()
        history = merge_history(read_history(self.history_path), entries)
        with contextlib.suppress(OSError):
            write_history(self.history_path, history)
        return plan_popular(self.specs(), entries, history, self.store.max_size, self.top)

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

    def run_once(self) -> list[str]:
        """One pass; returns the keys it made present."""
        done: list[str] = []
        for spec in self.plan():
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
        while not self._stop.is_set():
            try:
                made = self.run_once()
                if made:
                    log.info("autocloud: preloaded %s", ", ".join(made))
            except Exception:
                log.exception("autocloud: preloader pass failed")
            if self._stop.wait(self.interval):
                return

    def start(self) -> PopularPreloader:
        self._thread = threading.Thread(target=self._loop, name="autocloud-preloader", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
