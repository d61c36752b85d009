"""Detached work (detach.py): a process of its own session that outlives the caller and leaves no zombie."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from comfy_autocloud import detach


def _children_of_this_process() -> list[tuple[int, str]]:
    """(pid, state) of every process whose parent is this one."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fields = (proc / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == os.getpid():
            found.append((int(proc.name), fields[0]))
    return found


def test_detached_work_runs_in_a_session_of_its_own_and_leaves_no_zombie(tmp_path: Path) -> None:
    out = tmp_path / "done"
    before = _children_of_this_process()
    assert detach.run_detached(lambda: out.write_text(f"{os.getsid(0)} {os.getppid()} {os.getpid()}"))
    deadline = time.monotonic() + 30
    while not out.exists() or not out.read_text():
        assert time.monotonic() < deadline, "the detached work never ran"
        time.sleep(0.02)
    sid, ppid, pid = map(int, out.read_text().split())
    assert sid not in (os.getsid(0), pid) and ppid != os.getpid()  # a new session (not its leader: no terminal
    # can become its controlling one), and not this process's child
    assert _children_of_this_process() == before  # the intermediate child was reaped: no zombie is left


def test_without_fork_nothing_runs_and_the_caller_is_told(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_fork() -> int:
        raise OSError("fork refused")

    monkeypatch.setattr(os, "fork", no_fork)
    ran: list[bool] = []
    assert detach.run_detached(lambda: ran.append(True)) is False and ran == []
