"""One download per key, however many threads, processes (and later fleet nodes) ask at once.

In-process: a lock per key. Across processes: an fcntl lock file on local disk (never on NFS, where
flock is unreliable); the kernel drops it when a holder is killed, so a kill -9 never wedges a key.
"""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from comfy_autocloud.errors import Cancelled
from comfy_autocloud.progress import CancelToken

_registry_lock = threading.Lock()
_key_locks: dict[str, tuple[threading.Lock, int]] = {}


@contextmanager
def _thread_lock(key: str) -> Iterator[threading.Lock]:
    with _registry_lock:
        lock, users = _key_locks.get(key, (threading.Lock(), 0))
        _key_locks[key] = (lock, users + 1)
    try:
        yield lock
    finally:
        with _registry_lock:
            lock, users = _key_locks[key]
            if users <= 1:
                del _key_locks[key]
            else:
                _key_locks[key] = (lock, users - 1)


@contextmanager
def single_flight(
    key: str,
    lock_path: Path,
    *,
    cancel: CancelToken | None = None,
    on_wait: Callable[[], None] | None = None,
    poll: float = 0.05,
) -> Iterator[bool]:
    """Hold the key exclusively. Yields True if we had to wait for another holder (re-check the cache)."""
    waited = False
    with _thread_lock(key) as tlock:
        while not tlock.acquire(timeout=poll):
            waited = True
            if on_wait:
                on_wait()
            if cancel is not None and cancel.cancelled:
                raise Cancelled(key, "cancelled while waiting for another download of the same file")
        try:
            lock_path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                while True:
                    try:
                        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                        break
                    except OSError as exc:
                        if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                            raise
                    waited = True
                    if on_wait:
                        on_wait()
                    if cancel is not None and cancel.cancelled:
                        raise Cancelled(key, "cancelled while waiting for another process downloading it")
                    time.sleep(poll)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
                yield waited
            finally:
                os.close(fd)  # closing releases the flock
        finally:
            tlock.release()
