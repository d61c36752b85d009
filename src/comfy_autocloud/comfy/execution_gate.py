"""The process-wide `WorkGate` inside ComfyUI, held by the prompt worker while it executes a prompt.

ComfyUI's `main.prompt_worker` thread is the only one that ever calls `comfy.model_management` (see
`comfy_autocloud.preload.gate` for the unlocked global list it mutates). The memory preload adds a second
thread that calls the same loaders, so the prompt worker's two entry points into model management are wrapped
to hold the gate's foreground: `execution.PromptExecutor.execute` (a whole prompt: loaders, sampling, decode)
and `comfy.model_management.unload_all_models` (what `POST /free` runs between prompts). While one is held, or
a prompt waits in ComfyUI's queue, the preload thread waits; a prompt arriving during a preload step waits for
that one model to finish loading. If a target is missing in this ComfyUI version this is logged once and the
cached loader nodes still take the foreground themselves (loaders never overlap, sampling might).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

from comfy_autocloud.preload.gate import WorkGate

log = logging.getLogger("comfy_autocloud.preload")


def _queue_busy() -> bool:
    """True while ComfyUI has a prompt queued or running (checked by the preload thread between steps)."""
    from server import PromptServer  # ComfyUI

    server = getattr(PromptServer, "instance", None)
    queue = getattr(server, "prompt_queue", None)
    remaining = getattr(queue, "get_tasks_remaining", None)
    return bool(remaining()) if callable(remaining) else False


GATE = WorkGate(busy=_queue_busy)


def _wrap(owner: Any, name: str, gate: WorkGate) -> bool:
    fn = getattr(owner, name, None)
    if not callable(fn):
        log.warning("autocloud preload: %s.%s is missing in this ComfyUI; background preloading may overlap a "
                    "prompt", getattr(owner, "__name__", owner), name)
        return False
    if getattr(fn, "__autocloud_gate__", False):
        return True

    @functools.wraps(fn)
    def gated(*args: Any, **kwargs: Any) -> Any:
        with gate.foreground():
            return fn(*args, **kwargs)

    gated.__autocloud_gate__ = True  # type: ignore[attr-defined]
    setattr(owner, name, gated)
    return True


def install(gate: WorkGate = GATE) -> list[str]:
    """Wrap the prompt worker's entry points into model management; returns what was wrapped."""
    done: list[str] = []
    targets: list[tuple[Callable[[], Any], str]] = [
        (lambda: __import__("execution").PromptExecutor, "execute"),
        (lambda: __import__("comfy.model_management", fromlist=["unload_all_models"]), "unload_all_models"),
    ]
    for owner_of, name in targets:
        try:
            owner = owner_of()
        except Exception as exc:
            log.warning("autocloud preload: cannot gate %s (%s); background preloading may overlap a prompt",
                        name, exc)
            continue
        if _wrap(owner, name, gate):
            done.append(f"{getattr(owner, '__name__', owner)}.{name}")
    return done
