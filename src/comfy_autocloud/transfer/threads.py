"""The download's two helper threads: one hashes while bytes arrive, one makes progress durable.

Both work beside the event loop so neither the sha256 nor the fdatasync ever sits on the path of a
socket read: `hashlib` and `os.fdatasync` drop the GIL.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from ..fsutil import RangeHasher
from .ranges import PartState, SegmentTable, live_path, state_path

log = logging.getLogger("comfy_autocloud.transfer")

SAVE_INTERVAL = 0.5           # seconds between durable state records
LIVE_INTERVAL = 0.1           # seconds between live progress records (for peers streaming this download)


class Hasher(threading.Thread):
    """Hashes [0, prefix()) of the part file while the download goes on, from the page cache through a
    mapping (fsutil.RangeHasher: hashlib drops the GIL for a whole slice, so the busy event loop does
    not starve it)."""

    def __init__(self, fd: int, prefix: Callable[[], int]) -> None:
        super().__init__(name="autocloud-hash", daemon=True)
        self.prefix = prefix
        self.hasher = RangeHasher(fd)
        self.target: int | None = None
        self.error: BaseException | None = None
        self._stop_event = threading.Event()

    @property
    def done(self) -> int:
        return self.hasher.done

    def hexdigest(self) -> str:
        return self.hasher.hexdigest()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                limit = self.prefix()
                if self.target is not None:
                    limit = min(limit, self.target)
                if limit > self.hasher.done:
                    self.hasher.update_to(limit, self._stop_event.is_set)
                elif self.target is not None and self.hasher.done >= self.target:
                    return
                else:
                    self._stop_event.wait(0.01)
        except BaseException as e:  # reported to the engine, which raises it
            self.error = e
        finally:
            self.hasher.close()

    def finish(self, size: int) -> None:
        self.target = size

    def abort(self) -> None:
        self._stop_event.set()


class Saver(threading.Thread):
    """Every SAVE_INTERVAL: fdatasync the part, then atomically record the ranges that sync covered.

    Every LIVE_INTERVAL in between: the `.live` record (ranges pwritten so far, no fsync) for a peer
    server streaming this download to other nodes, so they trail it by ~0.1 s instead of ~0.5 s.
    """

    def __init__(self, fd: int, part_path: Path, table: SegmentTable, meta: PartState) -> None:
        super().__init__(name="autocloud-state", daemon=True)
        self.fd = fd
        self.path = state_path(part_path)
        self.live = live_path(part_path)
        self._live_last: list[tuple[int, int]] | None = None
        self.table = table
        self.meta = meta
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._last: list[tuple[int, int]] | None = None
        self.error: BaseException | None = None

    def save_now(self) -> None:
        with self._lock:
            done = self.table.done_intervals()  # snapshot first: everything in it is already pwritten
            if done == self._last:
                return
            os.fdatasync(self.fd)
            self.meta.with_done(done).save(self.path)
            self._last = done

    def save_live(self) -> None:
        done = self.table.done_intervals()
        if done != self._live_last:
            self.meta.with_done(done).save(self.live, durable=False)
            self._live_last = done

    def run(self) -> None:
        ticks = 0
        every = max(1, round(SAVE_INTERVAL / LIVE_INTERVAL))
        while not self._stop_event.wait(LIVE_INTERVAL):
            ticks += 1
            try:
                if ticks % every == 0:
                    self.save_now()
                else:
                    self.save_live()
            except OSError as e:  # a missed record only costs re-fetching; report, keep downloading
                self.error = e
                log.warning("cannot record download progress in %s: %s", self.path, e.strerror or e)

    def stop(self) -> None:
        self._stop_event.set()

    def close(self, final_save: bool) -> None:
        """Stop the thread; with `final_save`, record what is done now (a cancelled or failed download)."""
        self.stop()
        self.join()
        if final_save:
            try:
                self.save_now()
            except OSError as e:
                log.warning("cannot record download progress: %s", e.strerror or e)
