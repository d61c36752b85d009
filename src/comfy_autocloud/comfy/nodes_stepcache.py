"""ComfyUI nodes for the step cache, category ``AutoCloud/stepcache``.

The CacheDit nodes: Accelerate, Advanced Config, Cache Control, Detailed Stats.

Every node returns a new MODEL (a clone); the loaded model is never changed. The stats node takes
optional LATENT/IMAGE inputs only to run after the sampler it reports on.
"""

from __future__ import annotations

import json
from typing import Any

try:  # registers ComfyUI's MODEL with the step cache, also for other packs calling stepcache.enable_cache
    from comfy_autocloud.comfy import stepcache_wrappers  # noqa: F401
except ModuleNotFoundError as exc:  # torch missing: only outside ComfyUI, where there is no MODEL to cache
    if exc.name != "torch":
        raise

CATEGORY = "AutoCloud/stepcache"
PRESET_CHOICES = ["balanced", "quality", "fast"]
TARGET_TIP = "PSNR target in dB against uncached sampling; 0 = the preset's (quality 40, balanced 35, fast 30)"


def _sc() -> Any:
    """The step-cache API, with calibrations kept in this ComfyUI's store (``<cache>/.autocloud/stepcache``)."""
    from comfy_autocloud import stepcache
    from comfy_autocloud.comfy.setup import get_adapter
    from comfy_autocloud.stepcache.calibration import use_store_dir

    adapter = get_adapter()
    if adapter is not None:
        use_store_dir(adapter.store.private)
    return stepcache


def _target(preset: str, target_psnr: float) -> dict[str, Any]:
    return {"target_psnr": float(target_psnr)} if target_psnr and target_psnr > 0 else {"preset": preset}


class CacheDitAccelerate:
    """MODEL -> MODEL with the step cache at a quality target (``balanced`` = 35 dB PSNR by default)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    DESCRIPTION = ("Skip model work on sampling steps that barely change, as far as a quality target allows. The "
                   "first run of a model, step count and sampler computes every step to calibrate; later runs "
                   "are the fast ones. Schedules of 8 steps or fewer compute every step.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"model": ("MODEL",),
                             "preset": (PRESET_CHOICES, {"default": "balanced",
                                                         "tooltip": "quality 40 dB, balanced 35 dB, fast 30 dB"})},
                "optional": {"target_psnr": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.5,
                                                       "tooltip": TARGET_TIP})}}

    def apply(self, model: Any, preset: str = "balanced", target_psnr: float = 0.0) -> tuple[Any]:
        return (_sc().enable_cache(model, **_target(preset, target_psnr)),)


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
                "level": (["output", "block"], {"default": "output",
                                                "tooltip": "output: reuse the whole model output; block: run the "
                                                           "first block every step (Flux models), reuse the rest"}),
                "preset": (["off", *PRESET_CHOICES], {"default": "off",
                                                      "tooltip": "a quality target instead of the strategy "
                                                                 "settings above (off: use them)"}),
                "target_psnr": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 100.0, "step": 0.5,
                                          "tooltip": TARGET_TIP + "; > 0 overrides the strategy settings"}),
            },
        }

    def apply(self, model: Any, strategy: str, skip_interval: int, warmup_steps: int, noise_scale: float,
              debug: bool, threshold: float = 0.3, level: str = "output", preset: str = "off",
              target_psnr: float = 0.0) -> tuple[Any]:
        if preset != "off" or (target_psnr and target_psnr > 0):
            return (_sc().enable_cache(model, noise_scale=noise_scale, debug=debug,
                                       **_target("balanced" if preset == "off" else preset, target_psnr)),)
        return (_sc().enable_cache(model, skip_interval=skip_interval, warmup_steps=warmup_steps, strategy=strategy,
                                   noise_scale=noise_scale, debug=debug, threshold=threshold, level=level),)


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
    lines = []
    if not model_stats.get("enabled", True) or "steps" not in model_stats:
        lines.append("step cache: not enabled on this model")
    else:
        lines.append(f"step cache [{model_stats['strategy']}] steps {model_stats['steps']} | computed "
                     f"{model_stats['computed_steps']} | reused {model_stats['reused_steps']} | hit rate "
                     f"{model_stats['hit_rate'] * 100:.1f}% | time saved {model_stats['time_saved_s']:.2f}s | runs "
                     f"{model_stats['runs']}")
        q = model_stats.get("quality")
        if q:
            lines.extend(quality_lines(q))
    lines.append(f"all models: {global_stats['total_models']} cached, {global_stats['total_cache_hits']} cache "
                 f"hits / {global_stats['total_steps']} steps, {global_stats['total_time_saved_s']:.2f}s saved")
    slim = {k: v for k, v in global_stats.items() if k != "models"}
    return "\n".join([*lines, json.dumps({"model": model_stats, "global": slim}, indent=1, default=str)])


def quality_lines(q: dict[str, Any]) -> list[str]:
    """The quality target, what the last run did (calibrated / followed a plan), and the estimated error."""
    name = f" ({q['preset']})" if q.get("preset") else ""
    out = [f"quality target {q['target_psnr']:.1f} dB PSNR{name}, model {q.get('model_hash') or '?'}, "
           f"{len(q.get('calibrations', {}))} calibration(s) in {q.get('file') or 'memory'}"]
    last = q.get("last_run")
    if last:
        kind = ("calibration run (every step computed, errors of each possible reuse recorded)"
                if last["mode"] == "calibrate" else f"followed calibration {last['calibration']}"
                if last["mode"] == "plan" else "left its calibrated schedule: the rest computed")
        out.append(f"last run: {kind}")
        if "plan" in last:
            out.append(f"plan for next runs: {last['computed_steps']} computed / {last['reused_steps']} reused "
                       f"({last['plan']}), estimated PSNR {last['predicted_psnr']:.1f} dB vs uncached"
                       if last["mode"] == "calibrate" else
                       f"steps computed {last['computed_steps']}, reused {last['reused_steps']} ({last['plan']}), "
                       f"estimated PSNR {last['predicted_psnr']:.1f} dB vs uncached")
        if last.get("note"):
            out.append(f"note: {last['note']}")
        cal = q.get("calibrations", {}).get(last.get("calibration"), {})
        if cal.get("checks"):
            out.append(f"calibration checked at {cal['checks']} computed steps of later runs: errors "
                       f"{cal['error_gain']:.2f}x the calibrated (plans use them when above 1)")
    if q.get("error"):
        out.append(f"warning: {q['error']}")
    return out


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
