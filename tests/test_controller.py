"""The connection controller: grows while a step pays, and not while the event loop is saturated."""

from __future__ import annotations

import time

from comfy_autocloud.transfer.controller import Controller, Throughput

MiB = 2**20


def level(busy: float) -> Controller:
    """A controller at 8 connections whose first level measured 8 requests of 10 MB/s each, while the thread
    calling `tick` spent `busy` of the level's wall time on the CPU."""
    wall = {"t": 0.0}

    def cpu() -> float:
        return wall["t"] * busy

    tp = Throughput()
    ctl = Controller(tp, 8, fixed=False, cap=64, cpu_clock=cpu)
    start = ctl.level_start
    time.sleep(0.02)
    now = time.monotonic()
    for _ in range(8):
        tp.finished(start, 10 * MiB, start + 1.0)
    wall["t"] = now - start
    return ctl


def test_grows_while_the_loop_has_room() -> None:
    ctl = level(busy=0.3)
    ctl.tick(8, unowned=1 << 30)
    assert ctl.target == 16


def test_holds_while_the_event_loop_is_saturated() -> None:
    ctl = level(busy=0.97)
    ctl.tick(8, unowned=1 << 30)
    assert ctl.target == 8 and ctl.hold_until > time.monotonic()


def test_a_fixed_count_never_changes() -> None:
    tp = Throughput()
    ctl = Controller(tp, 4, fixed=True, cap=64, cpu_clock=lambda: 0.0)
    for _ in range(8):
        tp.finished(ctl.level_start, MiB, ctl.level_start + 0.1)
    ctl.tick(4, unowned=1 << 30)
    assert ctl.target == 4
