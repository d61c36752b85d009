"""Model kinds the step cache can wrap besides plain torch modules, registered by the layer that knows them.

ComfyUI's MODEL (a ModelPatcher) is cached through ComfyUI's own wrapper API, which only
`comfy_autocloud.comfy` may import; that package registers a `ModelTarget` here (on import of
`comfy_autocloud.comfy.stepcache_wrappers`, which the node pack's start-up does), so `enable_cache`
dispatches to it without this package importing upward.
"""

from __future__ import annotations

from typing import Any, Protocol

from .state import CacheConfig, StepCacheState


class ModelTarget(Protocol):
    """How to put the step cache on one kind of model, find it again and take it off."""

    name: str

    def matches(self, model: Any) -> bool: ...

    def apply(self, model: Any, config: CacheConfig, *, label: str | None, level: str) -> Any: ...

    def state_of(self, model: Any) -> StepCacheState | None: ...

    def remove(self, model: Any) -> Any: ...


_TARGETS: dict[str, ModelTarget] = {}


def register_target(target: ModelTarget) -> None:
    """Add (or replace, by name) a model kind; later registrations are asked first."""
    _TARGETS.pop(target.name, None)
    _TARGETS[target.name] = target


def target_for(model: Any) -> ModelTarget | None:
    for target in reversed(_TARGETS.values()):
        if target.matches(model):
            return target
    return None
