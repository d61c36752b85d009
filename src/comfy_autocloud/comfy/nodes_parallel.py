"""ComfyUI nodes for multi-device sampling (XDiT dispatcher, parallel KSampler), category ``AutoCloud/parallel``.

The dispatcher node only describes the devices and strategy; the Parallel KSampler is the stock
KSampler (same inputs, same LATENT output, same sampler code) whose MODEL clone sends each
transformer call to a persistent worker group. With one device or an unsupported model it runs the
stock path and says why on the node. torch and ComfyUI are imported lazily, inside the functions.
"""

from __future__ import annotations

import logging
from typing import Any

CATEGORY = "AutoCloud/parallel"
STRATEGIES = ("auto", "ulysses", "ring", "cfg")  # == comfy_autocloud.parallel.cfg.STRATEGIES (kept torch-free)
PARALLEL_TYPE = "AUTOCLOUD_PARALLEL"

log = logging.getLogger("comfy_autocloud.parallel")


def _samplers() -> tuple[list[str], list[str]]:
    try:
        import comfy.samplers

        return list(comfy.samplers.KSampler.SAMPLERS), list(comfy.samplers.KSampler.SCHEDULERS)
    except ImportError:
        return ["euler"], ["simple"]


def _show(node_id: str | None, text: str) -> None:
    """Put the status text on the node (ComfyUI's progress-text channel) and in the log."""
    log.info("Parallel KSampler: %s", text)
    if node_id is None:
        return
    try:
        from server import PromptServer

        if PromptServer.instance is not None and hasattr(PromptServer.instance, "send_progress_text"):
            PromptServer.instance.send_progress_text(text, node_id)
    except Exception:  # no server (tests, scripts): the log line and the ui text still carry it
        log.debug("progress text not sent", exc_info=True)


class AutoCloudParallelDispatcher:
    """Which devices to sample on and how to split the work; connect it to Parallel KSampler."""

    CATEGORY = CATEGORY
    RETURN_TYPES = (PARALLEL_TYPE,)
    RETURN_NAMES = ("parallel",)
    FUNCTION = "build"
    DESCRIPTION = ("Multi-device sampling settings. devices: auto (all CUDA GPUs), cpu, cuda, or a list like "
                   "cuda:0,cuda:1. strategy: auto picks CFG parallel when cond+uncond are batched, Ulysses when "
                   "heads divide the ranks, else ring attention.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "devices": ("STRING", {"default": "auto"}),
            "strategy": (list(STRATEGIES), {"default": "auto"}),
            "world_size": ("INT", {"default": 0, "min": 0, "max": 64, "tooltip": "0 = every listed device"}),
        }}

    def build(self, devices: str, strategy: str, world_size: int) -> tuple[Any]:
        from comfy_autocloud.parallel.workers import ParallelConfig

        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
        return (ParallelConfig.parse(devices, world_size, strategy),)


class AutoCloudParallelKSampler:
    """KSampler whose transformer calls run across the dispatcher's devices (output: LATENT, like KSampler)."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("LATENT",)
    FUNCTION = "sample"
    DESCRIPTION = ("The stock KSampler with sequence/CFG parallel transformer calls. Falls back to the stock "
                   "path, saying why, for one device or an unsupported model.")

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        samplers, schedulers = _samplers()
        return {
            "required": {
                "model": ("MODEL",),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "steps": ("INT", {"default": 20, "min": 1, "max": 10000}),
                "cfg": ("FLOAT", {"default": 8.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "sampler_name": (samplers,),
                "scheduler": (schedulers,),
                "positive": ("CONDITIONING",),
                "negative": ("CONDITIONING",),
                "latent_image": ("LATENT",),
                "denoise": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01}),
            },
            "optional": {
                "parallel": (PARALLEL_TYPE, {"tooltip": "from AutoCloud Parallel Dispatcher; default: auto"}),
                "vae": ("VAE", {"tooltip": "reused (zero-copy) by the diffusers/xDiT pipeline builder"}),
                "clip": ("CLIP", {"tooltip": "reused (zero-copy) by the diffusers/xDiT pipeline builder"}),
            },
            "hidden": {"unique_id": "UNIQUE_ID"},
        }

    def sample(self, model: Any, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str,
               positive: Any, negative: Any, latent_image: dict, denoise: float = 1.0, parallel: Any = None,
               vae: Any = None, clip: Any = None, unique_id: str | None = None) -> dict[str, Any]:
        import nodes

        from comfy_autocloud.comfy.parallel_runner import apply_parallel
        from comfy_autocloud.parallel.workers import ParallelConfig

        config = parallel if parallel is not None else ParallelConfig.parse("auto")
        patched, runner, reason = apply_parallel(model, config)
        if reason is not None:
            _show(unique_id, f"stock KSampler: {reason}")
        result = nodes.common_ksampler(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                       latent_image, denoise=denoise)
        text = f"stock KSampler: {reason}" if runner is None else f"parallel: {runner.summary()}"
        if vae is not None or clip is not None:
            text += ("; VAE/CLIP are not needed by the built-in backend (they feed "
                     "comfy_autocloud.parallel.to_diffusers_flux for diffusers/xDiT pipelines)")
        if runner is not None:
            _show(unique_id, text)
        return {"ui": {"text": [text]}, "result": result}


NODE_CLASS_MAPPINGS: dict[str, type] = {
    "AutoCloudParallelDispatcher": AutoCloudParallelDispatcher,
    "AutoCloudParallelKSampler": AutoCloudParallelKSampler,
}

NODE_DISPLAY_NAME_MAPPINGS: dict[str, str] = {
    "AutoCloudParallelDispatcher": "Parallel Dispatcher (AutoCloud)",
    "AutoCloudParallelKSampler": "Parallel KSampler (AutoCloud)",
}
