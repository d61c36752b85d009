"""Multi-device sampling: sequence/CFG parallel DiT calls on a persistent worker group.

Importing this package does not import torch; the submodules do (``pip install comfyui-autocloud[torch]``).
Public names resolve lazily so ComfyUI nodes and the CLI can import it for free.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ParallelConfig": "workers",
    "WorkerGroup": "workers",
    "WorkerError": "workers",
    "WorkerDiedError": "workers",
    "get_worker_group": "workers",
    "shutdown_all_groups": "workers",
    "SharedWeights": "shm",
    "SeqParallel": "attention",
    "ulysses_attention": "attention",
    "ring_attention": "attention",
    "FluxConfig": "flux_sp",
    "FluxDiT": "flux_sp",
    "flux_forward": "flux_sp",
    "tiny_flux_config": "flux_sp",
    "Plan": "cfg",
    "plan_for": "cfg",
    "STRATEGIES": "cfg",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
