"""ComfyUI integration: a DIFFUSION_MODEL wrapper on a clone of the MODEL that sends each call to the group.

The stock sampler keeps running in ComfyUI's process (sampler, scheduler, CFG maths, previews,
interrupts all unchanged); only the transformer call is replaced. Weights go to the workers once per
weight set (identity = tensor pointers), as one shared-memory block that ComfyUI's own module is
re-pointed at, so the host holds one copy. A call the parallel path cannot reproduce exactly
(ControlNet, reference latents, attention masks, block patches) runs the stock forward and the reason
is recorded for the node to show. ComfyUI is imported lazily (only inside these functions).
"""

from __future__ import annotations

import threading
import weakref
from dataclasses import asdict
from typing import Any

import torch

from comfy_autocloud.parallel.flux_sp import FluxConfig, FluxDiT
from comfy_autocloud.parallel.shm import SharedWeights, weights_key
from comfy_autocloud.parallel.workers import ParallelConfig, get_worker_group

__all__ = ["ParallelRunner", "apply_parallel", "unsupported_reason"]

WRAPPER_KEY = "autocloud_parallel"
# id(diffusion module) -> (group, key of the weight set registered for it)
_REGISTERED: dict[int, tuple[Any, str]] = {}


def _flux_keys(params: Any) -> set[str]:
    with torch.device("meta"):
        return set(FluxDiT(FluxConfig.from_any(params)).state_dict())


def unsupported_reason(model: Any) -> str | None:
    """Why this MODEL cannot run on the parallel path (None when it can)."""
    base = getattr(model, "model", None)
    dm = getattr(base, "diffusion_model", None)
    if dm is None:
        return f"{type(model).__name__} is not a ComfyUI MODEL"
    cls = type(dm)
    if cls.__name__ != "Flux" or cls.__module__ != "comfy.ldm.flux.model":
        return f"{cls.__module__}.{cls.__name__} is not supported yet (Flux-type DiTs only)"
    sd = dm.state_dict()
    extra = set(sd) - _flux_keys(dm.params)
    if extra:
        return f"weights carry extra tensors ({sorted(extra)[:3]}…: quantized/scaled weights are not supported)"
    bad = sorted({str(t.dtype) for t in sd.values() if t.dtype not in (torch.float32, torch.float16, torch.bfloat16)})
    if bad:
        return f"weight dtype(s) {', '.join(bad)} are not supported (fp32/fp16/bf16 only)"
    if any(type(t) not in (torch.Tensor, torch.nn.Parameter) for t in sd.values()):
        return "weights are tensor subclasses (e.g. GGUF): not supported"
    opts = getattr(model, "model_options", {}).get("transformer_options", {})
    if opts.get("patches_replace", {}).get("dit"):
        return "the model has block replacement patches (dit patches_replace)"
    return None


def _release(group: Any, key: str, ident: int) -> None:
    if _REGISTERED.get(ident, (None, None))[1] == key:
        _REGISTERED.pop(ident, None)
    group.forget(key)


class ParallelRunner:
    """The DIFFUSION_MODEL wrapper: dispatch to the worker group, or fall back per call with a reason."""

    def __init__(self, config: ParallelConfig) -> None:
        self.config = config
        self.group = get_worker_group(config.devices, config.threads_per_rank)
        self.plans: list[str] = []
        self.fallbacks: list[str] = []
        self.parallel_calls = 0
        self.key: str | None = None
        self._lock = threading.Lock()

    def _call_reason(self, ref_latents: Any, control: Any, opts: dict, kwargs: dict) -> str | None:
        if control is not None:
            return "ControlNet inputs"
        if ref_latents is not None:
            return "reference latents (Kontext)"
        if kwargs.get("attention_mask") is not None:
            return "an attention mask"
        if opts.get("patches", {}).get("post_input") or opts.get("patches_replace", {}).get("dit"):
            return "model patches that change the forward"
        return None

    def _ensure_weights(self, dm: torch.nn.Module) -> str:
        """Register the module's current weights once per weight set, across prompts and runners."""
        key = weights_key(dm)
        if self.group.has_model(key):
            return key
        on_cpu = all(t.device.type == "cpu" for t in dm.state_dict().values())
        shared = SharedWeights.pack(dm, rebind=on_cpu, meta={"builder": "flux", "config": asdict(
            FluxConfig.from_any(dm.params))})
        key = weights_key(dm)  # rebinding moved the tensors into the shared block
        old = _REGISTERED.get(id(dm))
        if old is not None and old[0] is self.group and old[1] != key:
            self.group.forget(old[1])  # e.g. a LoRA changed the weights: the old set is not needed
        self.group.register(key, shared)
        _REGISTERED[id(dm)] = (self.group, key)
        weakref.finalize(dm, _release, self.group, key, id(dm))  # ComfyUI dropped the model: free the block
        return key

    def __call__(self, executor: Any, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                 y: torch.Tensor | None = None, guidance: torch.Tensor | None = None, ref_latents: Any = None,
                 control: Any = None, transformer_options: dict | None = None, **kwargs: Any) -> torch.Tensor:
        opts = transformer_options or {}
        why = self._call_reason(ref_latents, control, opts, kwargs)
        if why is not None:
            self.fallbacks.append(why)
            return executor(x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kwargs)
        with self._lock:
            key = self.key = self._ensure_weights(executor.class_obj)
            inputs = {"x": x, "timestep": timestep, "context": context, "y": y, "guidance": guidance}
            inputs = {k: None if v is None else v.detach().to("cpu") for k, v in inputs.items()}
            out, plan = self.group.forward(key, inputs, self.config.strategy)
            self.parallel_calls += 1
            if not self.plans or self.plans[-1] != plan:
                self.plans.append(plan)
        return out.to(device=x.device, dtype=x.dtype)

    def summary(self) -> str:
        parts = []
        if self.parallel_calls:
            parts.append(f"{self.parallel_calls} model calls on {self.config.world_size} ranks "
                         f"({'; '.join(dict.fromkeys(self.plans))})")
        if self.fallbacks:
            parts.append(f"{len(self.fallbacks)} calls ran the stock forward because of "
                         f"{', '.join(dict.fromkeys(self.fallbacks))}")
        return "; ".join(parts) or "no model calls"


def apply_parallel(model: Any, config: ParallelConfig) -> tuple[Any, ParallelRunner | None, str | None]:
    """(patched clone, runner, None), or (model unchanged, None, reason) when the stock path must run."""
    if config.world_size < 2:
        return model, None, f"one device ({', '.join(config.devices)}): stock sampling"
    reason = unsupported_reason(model)
    if reason is not None:
        return model, None, reason
    import comfy.patcher_extension

    runner = ParallelRunner(config)
    patched = model.clone()
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, runner)
    return patched, runner, None
