"""Step cache for plain torch DiTs and diffusers transformers, by wrapping ``forward`` of the model and of
its transformer blocks (the mechanism of diffusers' ``HookRegistry``; torch's own forward hooks cannot skip
a module).

Block caching (default when a block list is found): block 0 always runs; its residual change drives the
decision. On a reused call blocks 1..n-2 return their inputs unchanged (no compute) and block n-1 returns
``block0_output + cached_residual``, where the residual ``last_output - block0_output`` was stored by the
last computed call of the same stream. Embeddings, the final norm and projection always run, so
conditioning that enters outside the blocks (timestep, pooled text) stays exact. A call that receives
ControlNet residuals (``controlnet_block_samples`` & co., non-zero) computes, and its residual is not kept.

Output caching (``level="output"``, or when no block list exists): the whole forward is skipped and the
cached output returned.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .state import CallContext, StepCacheState, control_active

ATTR = "_autocloud_stepcache"
_TIMESTEP_NAMES = ("timestep", "timesteps", "t", "sigma", "sigmas")
_HIDDEN_NAMES = ("hidden_states", "x", "hidden", "h", "img")
# diffusers ControlNet residuals passed to the transformer (Flux, SD3, Wan/Hunyuan-style names)
_CONTROL_KWARGS = ("controlnet_block_samples", "controlnet_single_block_samples", "block_controlnet_hidden_states")
_BLOCK_LISTS = (("transformer_blocks", "single_transformer_blocks"), ("double_blocks", "single_blocks"),
                ("blocks",), ("layers",), ("joint_blocks",))


def _diffusers_block_meta(cls: type) -> Any:
    """diffusers' own record of which tuple element is which hidden state (None when not registered)."""
    try:
        from diffusers.hooks._helpers import TransformerBlockRegistry
    except Exception:
        return None
    try:
        return TransformerBlockRegistry.get(cls)
    except Exception:
        return None


class BlockIO:
    """Maps a block's arguments and return value to named hidden states ("hidden", "encoder") and back."""

    def __init__(self, block: nn.Module) -> None:
        cls = type(block)
        meta = _diffusers_block_meta(cls)
        self.hidden_index = getattr(meta, "return_hidden_states_index", None)
        self.encoder_index = getattr(meta, "return_encoder_hidden_states_index", None)
        try:
            self.params = list(inspect.signature(cls.forward).parameters)[1:]
        except (TypeError, ValueError):
            self.params = []
        self.tuple_len: int | None = None

    def _arg(self, names: Sequence[str], args: tuple, kwargs: dict, default_pos: int | None) -> Any:
        for n in names:
            if n in kwargs:
                return kwargs[n]
        for n in names:
            if n in self.params and self.params.index(n) < len(args):
                return args[self.params.index(n)]
        if default_pos is not None and default_pos < len(args):
            return args[default_pos]
        return None

    def inputs(self, args: tuple, kwargs: dict) -> dict[str, torch.Tensor]:
        roles = {"hidden": self._arg(_HIDDEN_NAMES, args, kwargs, 0)}
        enc = self._arg(("encoder_hidden_states", "context", "txt"), args, kwargs, None)
        if isinstance(enc, torch.Tensor):
            roles["encoder"] = enc
        return {k: v for k, v in roles.items() if isinstance(v, torch.Tensor)}

    def outputs(self, out: Any) -> dict[str, torch.Tensor]:
        if isinstance(out, torch.Tensor):
            self.tuple_len = None
            return {"hidden": out}
        if isinstance(out, tuple | list) and self.hidden_index is not None:
            self.tuple_len = len(out)
            roles = {"hidden": out[self.hidden_index]}
            if self.encoder_index is not None:
                roles["encoder"] = out[self.encoder_index]
            return roles
        raise TypeError(f"stepcache: cannot map the output of {type(out).__name__} from this block; "
                        "blocks must return a tensor or be registered in diffusers' TransformerBlockRegistry")

    def build(self, roles: dict[str, torch.Tensor | None]) -> Any:
        if self.tuple_len is None:
            return roles["hidden"]
        out: list[Any] = [None] * self.tuple_len
        out[self.hidden_index] = roles.get("hidden")
        if self.encoder_index is not None:
            out[self.encoder_index] = roles.get("encoder")
        return tuple(out)


def find_blocks(module: nn.Module) -> list[nn.Module]:
    """The transformer blocks in execution order (diffusers Flux: double then single blocks)."""
    for names in _BLOCK_LISTS:
        lists = [getattr(module, n, None) for n in names]
        if isinstance(lists[0], nn.ModuleList):
            return [b for lst in lists if isinstance(lst, nn.ModuleList) for b in lst]
    cands = [m for m in module.children() if isinstance(m, nn.ModuleList)]
    return list(max(cands, key=len)) if cands else []


def _timestep(fn_params: list[str], args: tuple, kwargs: dict) -> float | None:
    val = None
    for n in _TIMESTEP_NAMES:
        if n in kwargs:
            val = kwargs[n]
            break
        if n in fn_params and fn_params.index(n) < len(args):
            val = args[fn_params.index(n)]
            break
    else:
        if len(args) > 1:
            val = args[1]
    if isinstance(val, torch.Tensor) and val.numel() > 0:
        return float(val.detach().flatten()[0])
    if isinstance(val, int | float):
        return float(val)
    return None


def _first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for n in _HIDDEN_NAMES:
        if isinstance(kwargs.get(n), torch.Tensor):
            return kwargs[n]
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


def _main_output(out: Any) -> tuple[torch.Tensor, Callable[[torch.Tensor], Any]]:
    """The prediction tensor of a model output and a function rebuilding the same structure around one."""
    if isinstance(out, torch.Tensor):
        return out, lambda t: t
    if isinstance(out, tuple):
        rest = out[1:]
        return out[0], lambda t: (t, *rest)
    if dataclasses.is_dataclass(out) and hasattr(out, "sample"):
        return out.sample, lambda t: type(out)(sample=t)
    raise TypeError(f"stepcache: unsupported model output type {type(out).__name__}")


class TorchCacheHandle:
    """Wrapped forwards of one module, so they can be restored exactly."""

    def __init__(self, module: nn.Module, state: StepCacheState, level: str,
                 blocks: Sequence[nn.Module] | None = None) -> None:
        self.module = module
        self.state = state
        self.blocks = list(blocks) if blocks is not None else (find_blocks(module) if level == "block" else [])
        if level == "block" and len(self.blocks) < 2:
            level = "output"
        self.level = level
        self.current: CallContext | None = None
        self._saved: list[tuple[nn.Module, Any]] = []
        self._fn_params = list(inspect.signature(type(module).forward).parameters)[1:]
        self._install()

    def _wrap(self, mod: nn.Module, make: Callable[[Callable[..., Any]], Callable[..., Any]]) -> None:
        had = "forward" in mod.__dict__
        self._saved.append((mod, mod.__dict__["forward"] if had else None))
        mod.forward = make(mod.forward)

    def remove(self) -> None:
        for mod, prev in reversed(self._saved):
            if prev is None:
                mod.__dict__.pop("forward", None)
            else:
                mod.forward = prev
        self._saved.clear()
        self.state.finish_run()
        self.state.reset_run()

    def _install(self) -> None:
        self._wrap(self.module, self._top)
        if self.level != "block":
            return
        ios = [BlockIO(b) for b in self.blocks]
        n = len(self.blocks)
        for i, (blk, io) in enumerate(zip(self.blocks, ios, strict=True)):
            if i == 0:
                self._wrap(blk, lambda orig, io=io: self._first(orig, io))
            elif i < n - 1:
                self._wrap(blk, lambda orig, io=io: self._middle(orig, io))
            else:
                self._wrap(blk, lambda orig, io=io: self._last(orig, io))

    # -- wrappers ------------------------------------------------------------------------------
    def _top(self, orig: Callable[..., Any]) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            st = self.state
            if not st.enabled or self.current is not None:
                return orig(*args, **kwargs)
            t = _timestep(self._fn_params, args, kwargs)
            x = _first_tensor(args, kwargs)
            if t is None or x is None:
                return orig(*args, **kwargs)
            with st.lock:
                ctx = st.begin_call(t, (tuple(x.shape), x.dtype, str(x.device)), x.device)
                ctx.force_compute = any(control_active(kwargs.get(k)) for k in _CONTROL_KWARGS)
                self.current = ctx
                try:
                    if self.level == "output":
                        return self._output_level(ctx, x, orig, args, kwargs)
                    return orig(*args, **kwargs)
                finally:
                    self.current = None
                    st.end_call(ctx)
        return forward

    def _output_level(self, ctx: CallContext, x: torch.Tensor, orig: Callable[..., Any], args: tuple,
                      kwargs: dict) -> Any:
        st = self.state
        if st.decide_output(ctx, x):
            pred = st.cached(ctx, {})["out"]
            return ctx.stream.rebuild(pred)
        out = orig(*args, **kwargs)
        pred, rebuild = _main_output(out)
        ctx.stream.rebuild = rebuild
        st.store_output(ctx, pred)
        return out

    def _first(self, orig: Callable[..., Any], io: BlockIO) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            ctx = self.current
            out = orig(*args, **kwargs)
            if ctx is not None:
                self.state.after_first_block(ctx, io.inputs(args, kwargs), io.outputs(out))
            return out
        return forward

    def _middle(self, orig: Callable[..., Any], io: BlockIO) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            ctx = self.current
            if ctx is not None and ctx.reuse:
                return io.build(io.inputs(args, kwargs))
            out = orig(*args, **kwargs)
            if ctx is not None:
                io.outputs(out)
            return out
        return forward

    def _last(self, orig: Callable[..., Any], io: BlockIO) -> Callable[..., Any]:
        def forward(*args: Any, **kwargs: Any) -> Any:
            ctx = self.current
            if ctx is None or ctx.base is None:
                return orig(*args, **kwargs)
            if ctx.reuse:
                return io.build(self.state.cached(ctx, ctx.base))
            out = orig(*args, **kwargs)
            self.state.store(ctx, io.outputs(out), ctx.base)
            ctx.base = None
            return out
        return forward


def apply(module: nn.Module, state: StepCacheState, level: str = "block",
          blocks: Sequence[nn.Module] | None = None) -> nn.Module:
    """Cache ``module`` in place (diffusers' convention for cache hooks); returns it."""
    remove(module)
    handle = TorchCacheHandle(module, state, level, blocks)
    object.__setattr__(module, ATTR, handle)
    return module


def remove(module: nn.Module) -> bool:
    """Restore the original forwards; False when the module was not cached."""
    handle = module.__dict__.get(ATTR)
    if handle is None:
        return False
    handle.remove()
    handle.state.enabled = False
    del module.__dict__[ATTR]
    return True


def handle_of(module: nn.Module) -> TorchCacheHandle | None:
    return module.__dict__.get(ATTR)
