"""Background disk prefetch: keep pinned and popular models on disk, and fetch the predicted next ones.

Downloads go through a FetchService on the same Store (same files, same single-flight locks) whose
options carry its own `RateLimiter` (the transfer engine's), and it yields: while any other download
runs it waits, and a prefetch that is running when one starts is cancelled (its partial file is kept
and resumed later), so it never slows an on-demand fetch.

With `predict_top` (AUTOCLOUD_PREDICT), a few seconds after each new load (while the GPU works on the
prompt) it asks the context model (`predictor.ContextPredictor`, learned online from the store's
access log and saved as `predictor.json` in the store's private directory) what comes next, and
fetches the guesses that are likely enough and worth what the store would evict for them
(`plan.worth_prefetching`), after pinned and popular files, at the same low priority. Its own
commits are not loads: they are left out of what the model learns.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from comfy_autocloud.errors import AutoCloudError, Cancelled
from comfy_autocloud.fetch.service import FetchResult, FetchService
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.prefetch.plan import PAUSE_MIN_SCORE, PAUSE_PREFETCH, worth_prefetching
from comfy_autocloud.prefetch.popularity import merge_history, plan_popular, read_history, write_history
from comfy_autocloud.prefetch.predictor import MIN_SCORE, ContextPredictor, top
from comfy_autocloud.progress import CancelToken, ProgressCallback
from comfy_autocloud.store import Store
from comfy_autocloud.store.index import ACCESS_LOG_MAX
from comfy_autocloud.transfer import BothLimiter, RateLimiter

log = logging.getLogger(__name__)

PREDICTOR_FILE = "predictor.json"
REPEAT_WINDOW = 5.0  # a download's commit and the loader's touch a moment later are one load


def learn_from_store(store: Store, model: ContextPredictor | None = None, path: Path | None = None, *,
                     skip: dict[str, float] | None = None, save: bool = True) -> ContextPredictor:
    """The context model saved at `path` (default: the store's predictor.json; a fresh one if absent or
    unreadable, with a warning naming the file), updated with the access-log rows it has not seen and
    saved back. Rows of keys in `skip` logged after the given time are prefetches, not loads (each is
    skipped once)."""
    path = path or store.private / PREDICTOR_FILE
    if model is None:
        if path.is_file():
            try:
                model = ContextPredictor.load(path)
            except ValueError as exc:
                log.warning("autocloud: starting a new predictor: %s", exc)
        model = model or ContextPredictor()
    newest = store.last_access_id()
    fresh = newest - model.learned_until
    if fresh <= 0:
        return model
    skip = skip if skip is not None else {}
    for ts, key, size in store.access_history(min(fresh, ACCESS_LOG_MAX)):
        since = skip.get(key)
        if since is not None and ts >= since:
            del skip[key]
            continue
        if key == model.prev and model.last_ts is not None and 0 <= ts - model.last_ts <= REPEAT_WINDOW:
            continue
        model.observe(ts, key, size)
    model.learned_until = newest
    if save:
        try:
            model.save(path)
        except OSError as exc:
            log.warning("autocloud: cannot save the predictor to %s: %s", path, exc)
    return model


class BackgroundPrefetcher:
    """Background thread: every `interval` seconds, make the planned models present (rate-limited, yielding);
    with `predict_top`, also within seconds of each new load, the guesses for what comes next."""

    def __init__(self, store: Store, fetch: FetchService, specs: Callable[[], list[ModelSpec]], *,
                 rate: float, top: int = 10, interval: float = 3600.0, busy: Callable[[], bool] = lambda: False,
                 progress: ProgressCallback | None = None,
                 on_done: Callable[[ModelSpec, FetchResult | None, AutoCloudError | None], None] | None = None,
                 on_start: Callable[[ModelSpec], None] | None = None,
                 history_path: Path | None = None, poll: float = 0.2, predict_top: int = 0,
                 predict_poll: float = 2.0, min_score: float | None = None,
                 predictor_path: Path | None = None) -> None:
        self.store = store
        self.limiter = RateLimiter(rate)
        # Same store and locks as on-demand fetches; a tighter byte budget inside the process-wide one.
        shared = fetch.options.limiter
        limiter = self.limiter if shared is None else BothLimiter(shared, self.limiter)
        self.fetch = FetchService(store, options=replace(fetch.options, limiter=limiter),
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
        self.yielded = 0  # how many times a running prefetch stepped aside for another download
        # After each new access in the store's access log, fetch the `predict_top` models most likely to
        # be loaded next (the context model, learned from that log), at the same low priority.
        self.predict_top = max(0, predict_top)
        self.predict_poll = predict_poll
        self.min_score = MIN_SCORE if min_score is None else min_score
        self.predictor_path = predictor_path or store.private / PREDICTOR_FILE
        self._model: ContextPredictor | None = None
        self._own: dict[str, float] = {}  # guesses this prefetcher committed -> when it started (not loads)
        self._seen_access = -1
        self._pause_planned = -1  # the access id after which the pause plan already ran

    def model(self) -> ContextPredictor:
        """The predictor, brought up to date with the access log (see `learn_from_store`)."""
        self._model = learn_from_store(self.store, self._model, self.predictor_path, skip=self._own)
        return self._model

    def predicted(self) -> list[str]:
        """Keys likely to be loaded next that are worth fetching now (`plan.worth_prefetching`: the
        expected saving beats the expected cost of what the store would evict for them)."""
        if not self.predict_top:
            return []
        model = self.model()
        if model.seen == 0:
            return []
        now = time.time()
        scores = model.scores(now)
        k, min_score = self.predict_top, self.min_score
        if model.new_session(now):  # the session is over: what starts the next one (see plan.PAUSE_*)
            k, min_score = max(k, PAUSE_PREFETCH), min(min_score, PAUSE_MIN_SCORE)
        total = sum(model.overall.values()) or 1.0
        out: list[str] = []
        for key in top(scores, k):
            size = model.sizes.get(key)
            if size is None or scores[key] < min_score or self.store.lookup(key) is not None:
                continue
            victims = self.store.would_evict(size, protect=(key,))
            if victims is None:
                continue  # does not fit even if everything unpinned went
            if worth_prefetching(scores[key], size, [(v.size, model.overall.get(v.key, 0) / total) for v in victims]):
                out.append(key)
        return out

    def plan(self, *, predicted_only: bool = False) -> list[ModelSpec]:
        entries = self.store.entries()
        history = merge_history(read_history(self.history_path), entries)
        with contextlib.suppress(OSError):
            write_history(self.history_path, history)
        predicted = self.predicted()
        if predicted_only:  # a quick pass between full ones: only the guesses (pinned/popular are done)
            return plan_popular(self.specs(), entries, {}, self.store.max_size, 0, predicted=predicted)
        return plan_popular(self.specs(), entries, history, self.store.max_size, self.top, predicted=predicted)

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

            watcher = threading.Thread(target=watch, name="autocloud-prefetch-watch", daemon=True)
            watcher.start()
            try:
                return self.fetch.fetch(spec, progress=self.progress, cancel=token)
            except Cancelled:
                self.yielded += 1
                log.info("autocloud: prefetch of %s paused for another download", spec.key)
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
            self._own[spec.key] = time.time() - 1.0
            try:
                result = self._fetch_yielding(spec)
            except AutoCloudError as exc:
                log.warning("autocloud: prefetch of %s failed: %s", spec.key, exc)
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
                elif self.predict_top and self._session_just_ended():
                    made = self.run_once(predicted_only=True)  # a pause: prefetch what starts the next session
                else:
                    made = []
                if made:
                    log.info("autocloud: prefetched %s", ", ".join(made))
            except Exception:
                log.exception("autocloud: prefetch pass failed")
            wait = min(self.interval, self.predict_poll) if self.predict_top else self.interval
            if self._stop.wait(wait):
                return

    def _session_just_ended(self) -> bool:
        """True once per pause: the session gap has passed since the newest load (planned for already)."""
        model = self._model
        if model is None or model.last_ts is None or self._pause_planned == self._seen_access:
            return False
        if not model.new_session(time.time()):
            return False
        self._pause_planned = self._seen_access
        return True

    def start(self) -> BackgroundPrefetcher:
        self._thread = threading.Thread(target=self._loop, name="autocloud-prefetcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
