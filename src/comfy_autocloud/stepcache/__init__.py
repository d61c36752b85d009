"""Step cache: skip transformer work on sampling steps whose result barely changes.

Drop-in for code written against the CacheDiT plugin's API::

    import comfy_autocloud.stepcache as cache_dit
    model = cache_dit.enable_cache(model)                   # quality target: preset "balanced", 35 dB PSNR
    model = cache_dit.enable_cache(model, skip_interval=3, warmup_steps=5, strategy="adaptive")  # seed's knobs
    print(cache_dit.summary(model))

A quality target (``calibration.py``, ``quality.py``) computes every step of a model's first run per schedule,
recording what each possible reuse would cost, and plans later runs to keep the predicted PSNR; calibrations
persist per model fingerprint in the store's private directory.

Targets: torch modules and diffusers transformers are cached in place (their forwards are wrapped, as
diffusers' own cache hooks do) and returned; a diffusers pipeline caches its ``transformer``; a ComfyUI
MODEL is never mutated: ``enable_cache`` returns a clone carrying the cache (use the return value).
Requires the ``torch`` extra; ComfyUI is imported only for ComfyUI models.
"""

from __future__ import annotations

import os
from typing import Any

from .calibration import PRESETS, calibration_dir, fingerprint, set_calibration_dir, target_of
from .state import CacheConfig, CacheStats, StepCacheState, global_config, global_stats, reset_stats
from .strategies import STRATEGIES, AdaptiveStrategy, DynamicStrategy, FixedStrategy, make_strategy
from .targets import ModelTarget, register_target, target_for

__all__ = [
    "PRESETS",
    "STRATEGIES",
    "AdaptiveStrategy",
    "CacheConfig",
    "CacheStats",
    "DynamicStrategy",
    "FixedStrategy",
    "ModelTarget",
    "StepCacheState",
    "calibration_dir",
    "disable_cache",
    "enable_cache",
    "get_global_stats",
    "make_strategy",
    "register_target",
    "reset_cache_stats",
    "set_calibration_dir",
    "set_global_config",
    "state_of",
    "summary",
    "target_for",
]


def _is_model_patcher(model: Any) -> bool:
    """ComfyUI MODEL (ModelPatcher) by duck type, so this module never imports ComfyUI itself."""
    return hasattr(model, "model_options") and hasattr(model, "clone") and hasattr(model, "add_wrapper_with_key")


def _target_of(model: Any) -> ModelTarget | None:
    """The registered handler for a non-torch model kind; a ComfyUI MODEL without one is a clear error."""
    target = target_for(model)
    if target is None and _is_model_patcher(model):
        raise TypeError("enable_cache: a ComfyUI MODEL is cached through the ComfyUI-AutoCloud node pack "
                        "(import comfy_autocloud.comfy.stepcache_wrappers inside ComfyUI)")
    return target


def _is_pipeline(model: Any) -> bool:
    import torch

    return not isinstance(model, torch.nn.Module) and isinstance(getattr(model, "transformer", None), torch.nn.Module)


def enable_cache(
    model: Any,
    skip_interval: int | None = None,
    warmup_steps: int | None = None,
    strategy: str | None = None,
    noise_scale: float = 0.0,
    debug: bool = False,
    *,
    target_psnr: float | None = None,
    preset: str | None = None,
    threshold: float | None = None,
    max_reuse: int | None = None,
    extrapolate: bool | None = None,
    level: str | None = None,
    blocks: Any = None,
    seed: int = 0,
    label: str | None = None,
) -> Any:
    """Cache ``model`` and return the model to sample with (the same object, or a clone for ComfyUI).

    Quality target (the default): ``preset`` ``quality`` / ``balanced`` / ``fast`` (40 / 35 / 30 dB PSNR against
    uncached sampling) or ``target_psnr`` in dB. The first run of each schedule (timesteps + sampler) computes
    every step and measures what each reuse would cost; later runs reuse as many steps as keep the predicted
    error within the target. Calibrations persist per model fingerprint under the store's private directory.
    Without any argument: ``set_global_config``'s default preset (``balanced``).

    Strategies (any of ``strategy``, ``skip_interval``, ``warmup_steps``, ``threshold``, ``max_reuse``,
    ``extrapolate`` given): ``fixed`` (reuse 1 step in every ``skip_interval``), ``dynamic`` (reuse more often as
    sampling goes on), ``adaptive`` (reuse while the accumulated relative change stays below ``threshold``, at
    most ``max_reuse`` in a row, extrapolated). ``warmup_steps`` first steps always compute. Unset arguments take
    ``set_global_config``'s defaults.

    ``noise_scale`` adds ``noise_scale * std`` Gaussian noise to reused results (CacheDiT's anti-artifact noise;
    it lowers PSNR, keep it 0 unless you see banding). ``level``: ``"output"`` (default) reuses the whole model
    output; ``"block"`` runs the first block on every step and reuses the rest (strategies only).
    """
    g = global_config()
    knobs = (strategy, skip_interval, warmup_steps, threshold, max_reuse, extrapolate)
    targeted = target_psnr is not None or preset is not None
    if targeted and any(v is not None for v in knobs):
        raise ValueError("enable_cache: give a quality target (preset / target_psnr) or strategy settings "
                         "(strategy, skip_interval, warmup_steps, threshold, max_reuse, extrapolate), not both")
    if not targeted and all(v is None for v in knobs) and g.default_preset is not None:
        preset = g.default_preset
        targeted = True
    if level not in (None, "block", "output"):
        raise ValueError(f"level must be 'block' or 'output', got {level!r}")
    if targeted:
        if level == "block":
            raise ValueError("enable_cache: a quality target caches at output level (its calibration measures the "
                             "model output); level='block' needs strategy settings")
        cfg = CacheConfig(target_psnr=target_of(preset, target_psnr), preset=preset if target_psnr is None else None,
                          noise_scale=float(noise_scale), debug=bool(debug), seed=seed).validate()
    else:
        cfg = CacheConfig(
            strategy=strategy or g.default_strategy,
            skip_interval=g.default_skip_interval if skip_interval is None else int(skip_interval),
            warmup_steps=g.default_warmup_steps if warmup_steps is None else int(warmup_steps),
            noise_scale=float(noise_scale),
            debug=bool(debug),
            threshold=threshold,
            max_reuse=max_reuse,
            extrapolate=extrapolate,
            seed=seed,
        ).validate()
    level = level or "output"
    target = _target_of(model)
    if target is not None:
        return target.apply(model, cfg, label=label, level=level)
    if _is_pipeline(model):
        enable_cache(model.transformer, skip_interval, warmup_steps, strategy, noise_scale, debug,
                     target_psnr=target_psnr, preset=preset, threshold=threshold, max_reuse=max_reuse,
                     extrapolate=extrapolate, level=level, blocks=blocks, seed=seed, label=label)
        return model
    import torch

    from . import torch_hooks

    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"enable_cache: unsupported model type {type(model).__name__} "
                        "(expected a torch module, a diffusers pipeline or a ComfyUI MODEL)")
    state = StepCacheState(cfg, label=label or type(model).__name__)
    if state.quality is not None:
        state.quality.set_model(fingerprint(model))
    return torch_hooks.apply(model, state, level=level, blocks=blocks)


def state_of(model: Any) -> StepCacheState | None:
    """The cache state attached to ``model`` (None when it is not cached)."""
    target = _target_of(model)
    if target is not None:
        return target.state_of(model)
    if _is_pipeline(model):
        model = model.transformer
    from . import torch_hooks

    handle = torch_hooks.handle_of(model) if hasattr(model, "__dict__") else None
    return handle.state if handle is not None else None


def summary(model: Any) -> dict[str, Any]:
    """Per-model stats: runs, steps, computed/reused steps and calls, hit rate, measured time saved."""
    st = state_of(model)
    if st is None:
        return {"enabled": False, "model": type(model).__name__}
    return st.summary()


def disable_cache(model: Any) -> Any:
    """Remove the cache; returns the uncached model (in place for torch, a clone for ComfyUI MODELs)."""
    target = _target_of(model)
    if target is not None:
        return target.remove(model)
    target = model.transformer if _is_pipeline(model) else model
    from . import torch_hooks

    torch_hooks.remove(target)
    return model


def set_global_config(
    default_skip_interval: int | None = None,
    default_strategy: str | None = None,
    global_debug: bool | None = None,
    default_warmup_steps: int | None = None,
    default_preset: str | None = None,
    calibration_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Set defaults for later ``enable_cache`` calls; ``global_debug`` logs every model's decisions.

    ``enable_cache(model)`` without arguments uses ``default_preset`` (``balanced``); setting
    ``default_strategy`` makes it use the strategy defaults instead, ``default_preset`` switches back.
    ``calibration_dir`` moves where calibrations persist (default ``<cache>/.autocloud/stepcache``)."""
    g = global_config()
    if default_strategy is not None and default_strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {default_strategy!r}: expected one of {', '.join(STRATEGIES)}")
    if default_preset is not None and default_preset not in PRESETS:
        raise ValueError(f"unknown preset {default_preset!r}: expected one of {', '.join(PRESETS)}")
    if default_skip_interval is not None:
        make_strategy("fixed", skip_interval=int(default_skip_interval), warmup_steps=0)
        g.default_skip_interval = int(default_skip_interval)
    if default_strategy is not None:
        g.default_strategy = default_strategy
        g.default_preset = None
    if default_preset is not None:
        g.default_preset = default_preset
    if default_warmup_steps is not None:
        if default_warmup_steps < 0:
            raise ValueError(f"default_warmup_steps must be >= 0, got {default_warmup_steps}")
        g.default_warmup_steps = int(default_warmup_steps)
    if global_debug is not None:
        g.global_debug = bool(global_debug)
    if calibration_dir is not None:
        set_calibration_dir(calibration_dir)
    return dict(g.__dict__)


def get_global_stats() -> dict[str, Any]:
    """Totals over every cached model in this process (``total_cache_hits`` = reused steps)."""
    return global_stats()


def reset_cache_stats() -> None:
    """Zero every counter (cached tensors are per run and already released between runs)."""
    reset_stats()


