"""ComfyUI nodes for the step cache (seed 003's CacheDit nodes), category ``AutoCloud/stepcache``.

Every node returns a new MODEL (a clone); the loaded model is never changed. The stats node takes
optional LATENT/IMAGE inputs only to run after the sampler it reports on.
"""

from __future__ import annotations

import json
from typing import Any

CATEGORY = "AutoCloud/stepcache"
# Defaults of the one-click node, chosen with bench/stepcache.py (digits DiT: ~2.4x at ~47 dB PSNR).
ACCELERATE_DEFAULTS: dict[str, Any] = {"strategy": "adaptive", "skip_interval": 5, "warmup_steps": 3,
                                       "threshold": 0.3}


def _sc() -> Any:
    from comfy_autocloud import stepcache

    return stepcache


class CacheDitAccelerate:
    """MODEL -> MODEL with the step cache and the benchmark-chosen defaults."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    DESCRIPTION = "Skip transformer work on sampling steps that barely change (about 2x on DiTs)."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL",)}}

    def apply(self, model: Any) -> tuple[Any]:
        return (_sc().enable_cache(model, **ACCELERATE_DEFAULTS),)


class CacheDitAdvancedConfig:
    """MODEL -> MODEL with every seed parameter exposed."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {
            "required": {
                "model": ("MODEL",),
                "strategy": (["fixed", "dynamic", "adaptive"], {"default": "adaptive"}),
                "skip_interval": ("INT", {"default": 5, "min": 1, "max": 10,
                                          "tooltip": "fixed/dynamic: reuse 1 step in every N; adaptive: at most "
                                                     "N-1 reused steps in a row"}),
                "warmup_steps": ("INT", {"default": 3, "min": 0, "max": 20,
                                         "tooltip": "first steps that always compute"}),
                "noise_scale": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 0.1, "step": 0.001,
                                          "tooltip": "noise added to reused results (lowers fidelity; 0 = off)"}),
                "debug": ("BOOLEAN", {"default": False}),
            },
            "optional": {
                "threshold": ("FLOAT", {"default": 0.3, "min": 0.0, "max": 2.0, "step": 0.01,
                                        "tooltip": "adaptive: change budget per computed step"}),
            },
        }

    def apply(self, model: Any, strategy: str, skip_interval: int, warmup_steps: int, noise_scale: float,
              debug: bool, threshold: float = 0.3) -> tuple[Any]:
        return (_sc().enable_cache(model, skip_interval=skip_interval, warmup_steps=warmup_steps, strategy=strategy,
                                   noise_scale=noise_scale, debug=debug, threshold=threshold),)


class CacheDitCacheControl:
    """Turn the cache on (global defaults) or off for a MODEL."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL",), "enabled": ("BOOLEAN", {"default": True})}}

    def apply(self, model: Any, enabled: bool) -> tuple[Any]:
        sc = _sc()
        if enabled:
            return (model if sc.state_of(model) is not None else sc.enable_cache(model),)
        return (sc.disable_cache(model) if sc.state_of(model) is not None else model,)


class CacheDitDetailedStats:
    """The model's cache stats (and the process totals) as text, shown on the node."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("stats",)
    FUNCTION = "report"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL",)},
                "optional": {"latent": ("LATENT",), "image": ("IMAGE",)}}

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")  # stats change with every run

    def report(self, model: Any, latent: Any = None, image: Any = None) -> dict[str, Any]:
        text = format_stats(_sc().summary(model), _sc().get_global_stats())
        return {"ui": {"text": [text]}, "result": (text,)}


def format_stats(model_stats: dict[str, Any], global_stats: dict[str, Any]) -> str:
    """Human-readable stats: the model's line first, then process totals, then the raw JSON."""
    if not model_stats.get("enabled", True) or "steps" not in model_stats:
        head = "step cache: not enabled on this model"
    else:
        head = (f"step cache [{model_stats['strategy']}] steps {model_stats['steps']} | computed "
                f"{model_stats['computed_steps']} | reused {model_stats['reused_steps']} | hit rate "
                f"{model_stats['hit_rate'] * 100:.1f}% | time saved {model_stats['time_saved_s']:.2f}s | runs "
                f"{model_stats['runs']}")
    tot = (f"all models: {global_stats['total_models']} cached, {global_stats['total_cache_hits']} cache hits / "
           f"{global_stats['total_steps']} steps, {global_stats['total_time_saved_s']:.2f}s saved")
    slim = {k: v for k, v in global_stats.items() if k != "models"}
    return "\n".join([head, tot, json.dumps({"model": model_stats, "global": slim}, indent=1, default=str)])


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "AutoCloudCacheDitAccelerate": CacheDitAccelerate,
    "AutoCloudCacheDitAdvancedConfig": CacheDitAdvancedConfig,
    "AutoCloudCacheDitCacheControl": CacheDitCacheControl,
    "AutoCloudCacheDitDetailedStats": CacheDitDetailedStats,
}
NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "AutoCloudCacheDitAccelerate": "CacheDit Accelerate (CacheDit 模型加速)",
    "AutoCloudCacheDitAdvancedConfig": "CacheDit Advanced Config (CacheDit 高级配置)",
    "AutoCloudCacheDitCacheControl": "CacheDit Cache Control (CacheDit 缓存控制)",
    "AutoCloudCacheDitDetailedStats": "CacheDit Detailed Stats (CacheDit 详细统计)",
}
