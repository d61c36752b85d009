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
    """Run `work` in a detached process and return at once; False where fork is not available (not run).

    Forked twice: the intermediate child ends at once and is reaped here, so a caller that lives on (the
    `autocloud start` supervisor) is not left with a zombie; the grandchild, adopted by init, does the work.
    """
    if not hasattr(os, "fork"):
        return False
    try:
        pid = os.fork()
    except OSError:
        return False
    if pid:
        with contextlib.suppress(ChildProcessError, InterruptedError):
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status) == 0
        return True
    code = 1
    try:  # the intermediate child: a new session, then the worker, then gone
        os.setsid()
        if os.fork():
            code = 0
        else:
            _work(work)
    finally:
        os._exit(code)


def _work(work: Callable[[], object]) -> None:
    """The detached process: stdio to /dev/null (a pipe the caller's caller reads is not held open)."""
    try:
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        with contextlib.suppress(OSError):
            os.nice(NICE)
        work()
    finally:
        os._exit(0)
