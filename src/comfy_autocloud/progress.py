"""Progress events: the fetch service emits them, the CLI (rich bars) and ComfyUI (ProgressBar) render."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

Phase = Literal["hit", "wait", "start", "download", "verify", "commit", "done", "error"]


@dataclass(frozen=True)
class ProgressEvent:
    key: str  # "folder/filename"
    phase: Phase
    bytes_done: int = 0
    bytes_total: int | None = None
    message: str = ""


ProgressCallback = Callable[[ProgressEvent], None]
T = TypeVar("T")
R = TypeVar("R")


class CancelToken:
    """Cooperative cancellation shared by the CLI (Ctrl-C), ComfyUI (interrupt) and the engine."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


def map_cancellable(work: Callable[[T], R], items: Sequence[T], *, parallel: int, token: CancelToken,
                    thread_name: str) -> list[R]:
    """`work` over `items` on up to `parallel` threads, results in order. Ctrl-C (or any exception in the
    caller's thread) cancels `token`, so every running job stops promptly instead of finishing its file."""
    from concurrent.futures import ThreadPoolExecutor  # here: every command imports this module, few run jobs

    pool = ThreadPoolExecutor(max_workers=max(1, min(parallel, len(items) or 1)), thread_name_prefix=thread_name)
    try:
        futures = [pool.submit(work, item) for item in items]
        return [f.result() for f in futures]
    except BaseException:
        token.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
