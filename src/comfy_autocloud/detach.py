"""Work that outlives the command: a forked child in its own session, at a lower priority.

Forked, so nothing is imported again and the work starts at once; the child touches nothing of the
parent's (pipes, locks, atexit handlers, open database connections): it runs one function and ends
with `os._exit`. Whatever it needs (an index connection) it opens itself.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable

NICE = 10  # below the command's successor (ComfyUI starting), above idle


def run_detached(work: Callable[[], object]) -> bool:
    """Run `work` in a detached child and return at once; False where fork is not available (not run)."""
    if not hasattr(os, "fork"):
        return False
    try:
        pid = os.fork()
    except OSError:
        return False
    if pid:
        return True
    try:  # the child: stdio to /dev/null, so a pipe the parent's caller reads is not held open
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        with contextlib.suppress(OSError):
            os.nice(NICE)
        work()
    finally:
        os._exit(0)
