"""Warm ComfyUI's prompt path at start-up, so the first user's prompt costs what a warm server's does.

The preload puts the models in memory (and runs each once on the device); what is left cold is
ComfyUI's own path from a queued prompt to its outputs: the first `validate_prompt` (every node class's
INPUT_TYPES, the file lists it reads), the executor's first prompt (its graph and cache classes,
the progress registry, the first event loop of the worker), the first output node. One internal
no-op prompt (EmptyImage -> PreviewAny) goes through those, once, right after the preload.

It never reaches the queue, the history or a websocket: it runs on a private `PromptExecutor` whose
server is a silent stand-in, inside a background section of the preload's WorkGate (see
comfy/execution_gate.py), so it never overlaps a user's prompt (one queued meanwhile waits those
few milliseconds; the warm-up never waits for a running prompt's end to start another of its own).

Then what start-up built (ComfyUI, the preloaded models' object graphs) is moved out of the cyclic
garbage collector's reach (`gc.freeze()`). Why: after a prompt that follows 10 s or more of idle time,
ComfyUI's prompt worker runs `gc.collect()` while holding the GIL, before the server's event loop
has sent the results; with models in memory that full collection took 0.3 s here, and the user waited
for it (the prompt itself ran in 5 ms). Frozen objects are still freed by reference counting when
released; only ones in reference cycles would stay until the process ends, which for models held
for the life of the process is what happens anyway.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from comfy_autocloud.preload.gate import WorkGate

log = logging.getLogger("comfy_autocloud.preload")

NOOP_PROMPT: dict[str, Any] = {
    "autocloud_warmup_image": {"class_type": "EmptyImage",
                               "inputs": {"width": 8, "height": 8, "batch_size": 1, "color": 0}},
    "autocloud_warmup_show": {"class_type": "PreviewAny", "inputs": {"source": ["autocloud_warmup_image", 0]}},
}


class SilentServer:
    """What `PromptExecutor` needs of a PromptServer, sending nothing: no client ever sees this prompt."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        return None

    def queue_updated(self) -> None:
        return None


@dataclass
class WarmupResult:
    seconds: float = 0.0
    validate_seconds: float = 0.0
    execute_seconds: float = 0.0
    frozen_objects: int = 0  # moved out of the cyclic collector's reach (gc.freeze)
    error: str | None = None
    messages: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"seconds": round(self.seconds, 4), "validate_seconds": round(self.validate_seconds, 4),
                "execute_seconds": round(self.execute_seconds, 4), "frozen_objects": self.frozen_objects,
                "error": self.error}


def warm_executor(gate: WorkGate, prompt: dict[str, Any] | None = None) -> WarmupResult:
    """Validate and execute one internal prompt on a private executor, then freeze the start-up heap;
    never raises (the result says why)."""
    result = WarmupResult()
    t0 = time.perf_counter()
    try:
        import execution  # ComfyUI

        prompt = prompt or NOOP_PROMPT
        prompt_id = f"autocloud-warmup-{uuid.uuid4().hex}"
        with gate.background():  # after any prompt that runs or waits; prompts queued meanwhile wait for it
            t1 = time.perf_counter()
            valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
            result.validate_seconds = time.perf_counter() - t1
            if not valid[0]:
                raise RuntimeError(f"the warm-up prompt did not validate: {valid[1]}")
            cache_type = getattr(getattr(execution, "CacheType", None), "CLASSIC", False)
            executor = execution.PromptExecutor(SilentServer(), cache_type=cache_type)
            t2 = time.perf_counter()
            executor.execute(prompt, prompt_id, {}, list(valid[2]))
            result.execute_seconds = time.perf_counter() - t2
            result.messages = [name for name, _data in executor.status_messages]
            if not executor.success:
                raise RuntimeError(f"the warm-up prompt failed: {executor.status_messages[-1:]}")
            del executor
            gc.collect()  # what start-up left behind goes now, the rest is frozen
            gc.freeze()
            result.frozen_objects = gc.get_freeze_count()
    except Exception as exc:  # a warm-up must never stop ComfyUI: the first prompt is then just slower
        result.error = f"{type(exc).__name__}: {exc}"
        log.warning("autocloud preload: executor warm-up skipped (%s); the first prompt warms it instead",
                    result.error)
    result.seconds = time.perf_counter() - t0
    if result.error is None:
        log.info("autocloud preload: executor warmed in %.3f s (validate %.3f s, execute %.3f s), %d objects "
                 "frozen", result.seconds, result.validate_seconds, result.execute_seconds, result.frozen_objects)
    return result
