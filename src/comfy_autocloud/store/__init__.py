"""The local model store: files where ComfyUI reads them, a SQLite index, eviction and verification.

Every name is imported from its module on first use (`comfy_autocloud.lazy`): opening the store for a
cache hit loads neither the verifier nor the eviction simulator, and a warmup rerun that a memo proves
current (warmup/memo.py) imports neither the store nor SQLite.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from comfy_autocloud.lazy import lazy_names

if TYPE_CHECKING:
    from comfy_autocloud.store.durability import DURABILITIES, Durability
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
    from comfy_autocloud.store.simulate import SimResult, Simulator, read_trace, write_trace
    from comfy_autocloud.store.store import Entry, Reservation, Store, Usage
    from comfy_autocloud.store.verify import Finding, VerifyReport

# `simulate` (the function) is not offered here: the submodule of that name would shadow it once loaded.
__getattr__ = lazy_names(__name__, {
    "DURABILITIES": "durability", "Durability": "durability",
    **dict.fromkeys(("POLICY_NAMES", "AdaptivePolicy", "DecayedFrequencyPolicy", "GreedyDualPolicy", "Item",
                     "LRUPolicy", "Policy", "bytes_freed", "get_policy", "select_victims"), "eviction"),
    **dict.fromkeys(("Entry", "Reservation", "Store", "Usage"), "store"),
    "Finding": "verify", "VerifyReport": "verify", "SimResult": "simulate", "Simulator": "simulate",
    "read_trace": "simulate", "write_trace": "simulate"})

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
