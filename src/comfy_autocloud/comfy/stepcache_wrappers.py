"""Step cache for ComfyUI MODELs (ModelPatcher), applied on a clone through ComfyUI's own extension points.

* ``OUTER_SAMPLE`` wrapper: one sampling run; learns the schedule's last sigma (that step always computes)
  and drops every cached tensor when the run ends (no memory held between prompts).
* ``APPLY_MODEL`` wrapper (every ComfyUI model has it): places each call in its run/step/stream from its
  sigma and ``cond_or_uncond``. For models without a block hook it caches the model output itself, as the
  implied noise ``(x - denoised) / sigma``, so a reused step still follows the current ``x``.
* Flux-family models (``comfy.ldm.flux.model.Flux``): ``patches_replace["dit"]`` block patches. Double
  block 0 always runs and decides; on a reused call the other blocks pass their inputs through and the
  last single block returns ``cat(txt0, img0) + cached residual``. A patch another node set on the same
  block keeps running (it is called in place of the original block).
* ControlNet: its residuals (``control`` passed to ``apply_model``, added between Flux blocks / to UNet skip
  connections) change every step, so a call with an active ControlNet (any non-zero control tensor) computes
  and its residual is not kept; steps outside the ControlNet's range (or at strength 0) cache as usual.

LoRA and other weight patches are untouched (the clone shares the patched weights). ComfyUI is imported
lazily, inside the functions. Importing this module registers `ModelPatcherTarget` with the step cache, so
`stepcache.enable_cache(model)` works on a MODEL without `stepcache/` importing ComfyUI code.
"""

from __future__ import annotations

from typing import Any

import torch

from comfy_autocloud.stepcache.calibration import fingerprint
from comfy_autocloud.stepcache.state import CacheConfig, CallContext, StepCacheState, control_active
from comfy_autocloud.stepcache.targets import register_target

KEY = "autocloud_stepcache"


class ComfyStepCache:
    """The cache bound to one cloned ModelPatcher; its wrapper methods are what ComfyUI calls.
    ``__deepcopy__`` returns self because ModelPatcher.clone deep-copies model_options."""

    def __init__(self, config: CacheConfig, label: str, block_mode: bool) -> None:
        self.state = StepCacheState(config, label=label)
        self.block_mode = block_mode
        self.current: CallContext | None = None

    def __deepcopy__(self, memo: dict) -> ComfyStepCache:
        return self

    # ---- wrappers --------------------------------------------------------------------------
    def outer_sample(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        sampler = args[2] if len(args) > 2 else kwargs.get("sampler")
        st = self.state
        with st.lock:
            st.reset_run()
            if isinstance(sigmas, torch.Tensor) and sigmas.numel() > 1:
                nz = sigmas[sigmas > 0]
                st.final_t = float(nz.min()) if nz.numel() else None
            if st.quality is not None:
                mp = getattr(getattr(executor, "class_obj", None), "model_patcher", None)
                if mp is not None:
                    st.quality.set_model(model_fingerprint(mp))
                sched = [float(v) for v in sigmas.flatten().tolist()] if isinstance(sigmas, torch.Tensor) else None
                st.quality.begin_run(sched[:-1] if sched else None, sampler_family(sampler),
                                     final_t=sched[-1] if sched else 0.0)
                st.runs_managed = True
        try:
            return executor(*args, **kwargs)
        finally:
            with st.lock:
                if st.quality is not None:
                    st.quality.end_run()
                st.runs_managed = False
                st.reset_run()
                st.final_t = None
                self.current = None

    def apply_model(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        x, t = args[0], args[1]
        topts = kwargs.get("transformer_options")
        if topts is None and len(args) > 5:
            topts = args[5]
        st = self.state
        if not st.enabled or not isinstance(t, torch.Tensor) or self.current is not None:
            return executor(*args, **kwargs)
        cou = tuple((topts or {}).get("cond_or_uncond", ()))
        control = kwargs["control"] if "control" in kwargs else (args[4] if len(args) > 4 else None)
        with st.lock:
            ctx = st.begin_call(float(t.flatten()[0]), (tuple(x.shape), cou, x.dtype), x.device)
            ctx.force_compute = control_active(control)
            self.current = ctx
            try:
                if self.block_mode:
                    return executor(*args, **kwargs)
                sig = t.reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype).clamp_min(1e-6)
                if st.decide_output(ctx, x):
                    return x - sig * st.cached(ctx, {})["out"]
                den = executor(*args, **kwargs)
                st.store_output(ctx, (x - den) / sig)
                return den
            finally:
                self.current = None
                st.end_call(ctx)


def sampler_family(sampler: Any) -> str:
    """The sampler's name (``KSAMPLER.sampler_function``: ``sample_euler``, ``sample_heun``, ...)."""
    fn = getattr(sampler, "sampler_function", None)
    fn = getattr(fn, "func", fn)  # functools.partial
    return str(getattr(fn, "__name__", None) or type(sampler).__name__)


def model_fingerprint(mp: Any) -> str:
    """The calibration identity of a ModelPatcher: its diffusion model's weights (tensors a weight patch such as
    a LoRA may have changed in place are left out of the sampled values) plus the patches and their strengths."""
    dm = getattr(mp.model, "diffusion_model", mp.model)
    patched = {k.removeprefix("diffusion_model.") for k in getattr(mp, "patches", {})}
    extra = ";".join(f"{k}:{[p[0] for p in v]}" for k, v in sorted(getattr(mp, "patches", {}).items()))
    return fingerprint(dm, extra=extra, skip=patched)


class FluxBlockPatch:
    """A ``patches_replace["dit"]`` entry for one Flux block; ``role`` is first / middle / last."""

    def __init__(self, cache: ComfyStepCache, kind: str, role: str, prev: Any = None) -> None:
        self.cache, self.kind, self.role, self.prev = cache, kind, role, prev

    def __deepcopy__(self, memo: dict) -> FluxBlockPatch:
        return self

    def _run(self, args: dict, extra: dict) -> dict:
        return self.prev(args, extra) if self.prev is not None else extra["original_block"](args)

    def __call__(self, args: dict, extra: dict) -> dict:
        ctx = self.cache.current
        if ctx is None:
            return self._run(args, extra)
        st = self.cache.state
        if self.role == "first":
            out = self._run(args, extra)
            st.after_first_block(ctx, {"hidden": args["img"]}, {"hidden": out["img"], "encoder": out["txt"]})
            base = ctx.base or {}
            ctx.base = {"img": torch.cat((base["encoder"], base["hidden"]), 1)}
            return out
        if ctx.reuse:
            if self.role == "last":
                return {"img": st.cached(ctx, ctx.base or {})["img"]}
            return {"img": args["img"], "txt": args["txt"]} if self.kind == "double_block" else {"img": args["img"]}
        out = self._run(args, extra)
        if self.role == "last" and ctx.base is not None:
            st.store(ctx, {"img": out["img"]}, ctx.base)
            ctx.base = None
        return out


def _flux_blocks(model: Any) -> tuple[int, int] | None:
    """(double, single) block counts when the diffusion model runs ComfyUI's Flux block loop."""
    try:
        import comfy.ldm.flux.model as flux
    except Exception:
        return None
    dm = getattr(getattr(model, "model", None), "diffusion_model", None)
    if not isinstance(dm, flux.Flux) or type(dm).forward_orig is not flux.Flux.forward_orig:
        return None
    nd, ns = len(dm.double_blocks), len(dm.single_blocks)
    return (nd, ns) if nd >= 1 and ns >= 1 else None


def _replace_patches(model: Any) -> dict:
    return model.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})


def holder_of(model: Any) -> ComfyStepCache | None:
    return model.model_options.get("transformer_options", {}).get(KEY)


def apply_to_model_patcher(model: Any, config: CacheConfig, label: str | None = None,
                           level: str = "block") -> Any:
    """A clone of ``model`` that samples with the step cache (an existing step cache is replaced)."""
    import comfy.patcher_extension as pe

    m = remove_from_model_patcher(model) if holder_of(model) is not None else model.clone()
    blocks = _flux_blocks(m) if level == "block" and config.target_psnr is None else None
    name = label or type(getattr(m.model, "diffusion_model", m.model)).__name__
    cache = ComfyStepCache(config, label=name, block_mode=blocks is not None)
    m.model_options.setdefault("transformer_options", {})[KEY] = cache
    m.add_wrapper_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY, cache.outer_sample)
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, KEY, cache.apply_model)
    if blocks is not None:
        nd, ns = blocks
        existing = _replace_patches(m)
        for kind, n in (("double_block", nd), ("single_block", ns)):
            for i in range(n):
                role = "first" if kind == "double_block" and i == 0 else (
                    "last" if kind == "single_block" and i == ns - 1 else "middle")
                m.set_model_patch_replace(FluxBlockPatch(cache, kind, role, existing.get((kind, i))), "dit", kind, i)
    return m


def remove_from_model_patcher(model: Any) -> Any:
    """A clone of ``model`` without the step cache (other patches and wrappers kept)."""
    import comfy.patcher_extension as pe

    m = model.clone()
    m.model_options.get("transformer_options", {}).pop(KEY, None)
    m.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, KEY)
    m.remove_wrappers_with_key(pe.WrappersMP.APPLY_MODEL, KEY)
    dit = _replace_patches(m)
    for k in [k for k, v in dit.items() if isinstance(v, FluxBlockPatch)]:
        prev = dit[k].prev
        if prev is None:
            del dit[k]
        else:
            dit[k] = prev
    return m


class ModelPatcherTarget:
    """`stepcache.enable_cache` / `summary` / `disable_cache` on a ComfyUI MODEL (registered on import)."""

    name = "comfyui-model-patcher"

    def matches(self, model: Any) -> bool:
        return hasattr(model, "model_options") and hasattr(model, "clone") and hasattr(model, "add_wrapper_with_key")

    def apply(self, model: Any, config: CacheConfig, *, label: str | None, level: str) -> Any:
        return apply_to_model_patcher(model, config, label=label, level=level)

    def state_of(self, model: Any) -> StepCacheState | None:
        holder = holder_of(model)
        return holder.state if holder is not None else None

    def remove(self, model: Any) -> Any:
        return remove_from_model_patcher(model)


register_target(ModelPatcherTarget())
