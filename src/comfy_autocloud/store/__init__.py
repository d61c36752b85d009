"""The local model store: files where ComfyUI reads them, a SQLite index, eviction and verification.

The verifier and the eviction simulator are imported on first use of their names
(`comfy_autocloud.lazy`): opening the store for a cache hit or a warmup rerun loads neither.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from comfy_autocloud.lazy import lazy_names
from comfy_autocloud.store.eviction import (
    POLICY_NAMES,
    AdaptivePolicy,
    DecayedFrequencyPolicy,
    GreedyDualPolicy,
    Item,
    LRUPolicy,
    Policy,
    bytes_freed,
    get_policy,
    select_victims,
)
from comfy_autocloud.store.store import DURABILITIES, Durability, Entry, Reservation, Store, Usage

if TYPE_CHECKING:
    from comfy_autocloud.store.simulate import SimResult, Simulator, read_trace, write_trace
    from comfy_autocloud.store.verify import Finding, VerifyReport

# `simulate` (the function) is not offered here: the submodule of that name would shadow it once loaded.
__getattr__ = lazy_names(__name__, {"Finding": "verify", "VerifyReport": "verify", "SimResult": "simulate",
                                    "Simulator": "simulate", "read_trace": "simulate", "write_trace": "simulate"})

__all__ = [
    "DURABILITIES",
    "POLICY_NAMES",
    "AdaptivePolicy",
    "DecayedFrequencyPolicy",
    "Durability",
    "Entry",
    "Finding",
    "GreedyDualPolicy",
    "Item",
    "LRUPolicy",
    "Policy",
    "Reservation",
    "SimResult",
    "Simulator",
    "Store",
    "Usage",
    "VerifyReport",
    "bytes_freed",
    "get_policy",
    "read_trace",
    "select_victims",
    "write_trace",
]
