"""The local model store: files where ComfyUI reads them, a SQLite index, eviction and verification."""

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
from comfy_autocloud.store.simulate import SimResult, Simulator, read_trace, simulate, write_trace
from comfy_autocloud.store.store import Entry, Reservation, Store, Usage
from comfy_autocloud.store.verify import Finding, VerifyReport

__all__ = [
    "POLICY_NAMES",
    "AdaptivePolicy",
    "DecayedFrequencyPolicy",
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
    "simulate",
    "write_trace",
]
