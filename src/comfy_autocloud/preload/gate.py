"""Keeps background preloading out of ComfyUI while a prompt runs.

Why: ComfyUI's model management is single-threaded by design. `comfy.model_management` keeps one global
`current_loaded_models` list that `load_models_gpu`, `free_memory`, `unload_all_models` and the
`cleanup_models` finalizer read by index and then `pop(i)` / `insert(0, …)` without any lock, and the
stock loaders call into it (`comfy.sd.CLIP.__init__` and `load_checkpoint_guess_config` call
`load_models_gpu(..., force_full_load=True)`; `auto_gpu_load` calls it for every entry). ComfyUI itself only
ever calls these from its one prompt-worker thread (`main.prompt_worker`). A preload thread calling the same
loaders while that worker samples can pop or detach the wrong model (an index shifted under it), or, on a GPU,
have `free_memory` unload the very model the sampler is using to make room for a preloaded one.

So every ComfyUI call of the preload registry goes through one process-wide `WorkGate`:

- *foreground* — a running prompt (the adapter wraps `PromptExecutor.execute` and `unload_all_models`) and
  a loader node's registry call; several may hold it together, and a thread that holds it may re-enter.
- *background* — the preload thread, `load_all` / `to_gpu`, `auto_gpu_load`: one at a time, only while no
  foreground holds or waits for the gate and `busy()` (prompts queued) is false. A background section is one
  model: a prompt queued meanwhile waits for that one load to end (it cannot be stopped half-way), then runs
  before the next.

A thread that holds the foreground passes through `background()` (it already excludes every other caller),
so a loader node needing an entry never waits for a background section that waits for it. Pure threading:
no ComfyUI, no torch.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager


class WorkGate:
    """Foreground work excludes background work and goes first; background sections are exclusive."""

    def __init__(self, busy: Callable[[], bool] | None = None, poll: float = 0.05) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._fg: dict[int, int] = {}  # thread id -> re-entry depth
        self._fg_waiting = 0
        self._bg_owner: int | None = None
        self._bg_depth = 0
        self.busy = busy
        self.poll = poll
        self.background_waits = 0  # how often a background section had to wait (status, tests)

    # ------------------------------------------------------------------ foreground
    @contextmanager
    def foreground(self) -> Iterator[None]:
        """A prompt (or a loader node in it): waits for a running background section, then holds it off."""
        me = threading.get_ident()
        with self._cond:
            if me not in self._fg:
                self._fg_waiting += 1
                try:
                    while self._bg_owner is not None and self._bg_owner != me:
                        self._cond.wait()
                finally:
                    self._fg_waiting -= 1
            self._fg[me] = self._fg.get(me, 0) + 1
        try:
            yield
        finally:
            with self._cond:
                self._fg[me] -= 1
                if not self._fg[me]:
                    del self._fg[me]
                self._cond.notify_all()

    # ------------------------------------------------------------------ background
    @contextmanager
    def background(self) -> Iterator[None]:
        """One preload step: waits until no prompt runs, waits or is queued; a foreground thread passes."""
        me = threading.get_ident()
        with self._cond:
            if self._bg_owner == me:
                self._bg_depth += 1
                owned = True
            else:
                owned = False if me in self._fg else None
        if owned is None:
            self._acquire_background(me)
            owned = True
        try:
            yield
        finally:
            if owned:
                with self._cond:
                    self._bg_depth -= 1
                    if not self._bg_depth:
                        self._bg_owner = None
                    self._cond.notify_all()

    def _acquire_background(self, me: int) -> None:
        waited = False
        while True:
            busy = self._is_busy()  # outside our lock: it takes ComfyUI's queue lock
            with self._cond:
                if not busy and not self._fg and not self._fg_waiting and self._bg_owner is None:
                    self._bg_owner, self._bg_depth = me, 1
                    self.background_waits += waited
                    return
                waited = True
                # busy() is polled (ComfyUI's queue does not notify us); the rest notifies.
                self._cond.wait(self.poll if self.busy is not None else None)

    def _is_busy(self) -> bool:
        if self.busy is None:
            return False
        try:
            return bool(self.busy())
        except Exception:  # a broken probe must not stop preloading forever
            return False

    # ------------------------------------------------------------------ reading
    def state(self) -> dict[str, object]:
        with self._cond:
            return {"foreground": sum(self._fg.values()), "foreground_waiting": self._fg_waiting,
                    "background": self._bg_owner is not None, "background_waits": self.background_waits}

    def wait_quiet(self, timeout: float) -> bool:
        """Tests and tools: True once nothing holds the gate (False on timeout)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._fg or self._bg_owner is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True
