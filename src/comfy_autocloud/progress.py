"""Progress events: the fetch service emits them, the CLI (rich bars) and ComfyUI (ProgressBar) render."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

Phase = Literal["hit", "wait", "start", "download", "verify", "commit", "done", "error"]


@dataclass(frozen=True)
class ProgressEvent:
    key: str  # "folder/filename"
    phase: Phase
    bytes_done: int = 0
    bytes_total: int | None = None
    message: str = ""


ProgressCallback = Callable[[ProgressEvent], None]


class CancelToken:
    """Cooperative cancellation shared by the CLI (Ctrl-C), ComfyUI (interrupt) and the engine."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()
