"""Rich progress bars fed by fetch-service events (thread-safe: rich.Progress locks internally)."""

from __future__ import annotations

import threading
from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from comfy_autocloud.progress import ProgressEvent


class FetchProgress:
    """One bar per file; hits and waits are shown as one-line notes instead of bars."""

    def __init__(self, console: Console, *, enabled: bool = True) -> None:
        self.enabled = enabled
        self._progress = Progress(
            TextColumn("[bold]{task.fields[key]}", justify="left"),
            BarColumn(bar_width=20),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[note]}"),
            console=console,
            transient=False,
            disable=not enabled,
        )
        self._tasks: dict[str, TaskID] = {}
        self._waiting: set[str] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> FetchProgress:
        self._progress.__enter__()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        self._progress.__exit__(et, ev, tb)

    def _task(self, key: str, total: int | None) -> TaskID:
        with self._lock:
            if key not in self._tasks:
                self._tasks[key] = self._progress.add_task("", key=key, note="", total=total)
            return self._tasks[key]

    def __call__(self, ev: ProgressEvent) -> None:
        if not self.enabled:
            return
        if ev.phase == "hit":
            tid = self._task(ev.key, ev.bytes_total)
            self._progress.update(tid, completed=ev.bytes_done, total=ev.bytes_total, note="[green]cached")
        elif ev.phase == "wait":
            if ev.key not in self._waiting:
                self._waiting.add(ev.key)
                tid = self._task(ev.key, None)
                self._progress.update(tid, note="[yellow]waiting for another download")
        elif ev.phase in ("start", "download"):
            tid = self._task(ev.key, ev.bytes_total)
            self._progress.update(tid, completed=ev.bytes_done, total=ev.bytes_total, note="")
        elif ev.phase == "commit":
            self._progress.update(self._task(ev.key, ev.bytes_total), note="verifying")
        elif ev.phase == "done":
            self._progress.update(self._task(ev.key, ev.bytes_total), completed=ev.bytes_done,
                                  total=ev.bytes_total, note="[green]done")
        elif ev.phase == "error":
            self._progress.update(self._task(ev.key, None), note=f"[red]failed: {ev.message}")
