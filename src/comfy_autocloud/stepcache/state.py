"""The step-cache engine shared by every target (plain torch, diffusers, ComfyUI).

The engine knows nothing about model classes. Adapters report each model call (its timestep and a stream
key), the hidden states around the first block, and the output of the cached span; the engine tracks
runs, steps and streams, asks the strategy whether a step may reuse, and keeps the residual history.

Runs, steps and streams are derived from the timestep of each call, so no sampler cooperation is needed:

* the noise level only goes down within a run: a timestep *above* the previous call's starts a new run
  (state cleared: no memory grows across runs, img2img starting mid-schedule is just a run whose first
  step is at a lower noise level);
* a timestep below the previous call's starts a new step; the step's decision is made once, by its first
  call, and every other call of that step (CFG as separate calls, the second evaluation of Heun-type
  samplers at the same sigma) follows it;
* calls in one step are told apart by ``(key, occurrence)``; the key is the batch layout (shape, and in
  ComfyUI the cond/uncond list), so CFG batched or separate, batch > 1 and second-order samplers each keep
  their own residuals.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Hashable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .calibration import target_of
from .quality import QualityTarget
from .strategies import AdaptiveStrategy, FixedStrategy, make_strategy

log = logging.getLogger("comfy_autocloud.stepcache")

Tensors = dict[str, torch.Tensor]


@dataclass
class CacheConfig:
    """Everything ``enable_cache`` accepts. ``extrapolate=None`` means first-order Taylor extrapolation of
    reused residuals for ``adaptive`` and plain copies (the CacheDiT plugin's behaviour) for ``fixed``/``dynamic``."""

    strategy: str = "fixed"
    skip_interval: int = 2
    warmup_steps: int = 2
    noise_scale: float = 0.0
    debug: bool = False
    threshold: float | None = None
    max_reuse: int | None = None
    extrapolate: bool | None = None
    seed: int = 0
    target_psnr: float | None = None  # a quality target: steps are planned from a calibration, not a strategy
    preset: str | None = None

    def validate(self) -> CacheConfig:
        if self.target_psnr is not None:
            self.target_psnr = target_of(None, self.target_psnr)
            self.strategy = "target"
        else:
            make_strategy(self.strategy, skip_interval=self.skip_interval, warmup_steps=self.warmup_steps,
                          threshold=self.threshold, max_reuse=self.max_reuse)
        if not 0.0 <= self.noise_scale <= 1.0:
            raise ValueError(f"noise_scale must be in 0..1, got {self.noise_scale}")
        return self

    @property
    def use_taylor(self) -> bool:
        return self.strategy == "adaptive" if self.extrapolate is None else self.extrapolate


@dataclass
class CacheStats:
    """Counters for one cached model. A *step* is one timestep of a run; a *call* is one model evaluation
    (a step has several with CFG as separate calls or second-order samplers)."""

    model: str = ""
    runs: int = 0
    steps: int = 0
    computed_steps: int = 0
    reused_steps: int = 0
    calls: int = 0
    computed_calls: int = 0
    reused_calls: int = 0
    time_computed_s: float = 0.0
    time_reused_s: float = 0.0
    time_saved_s: float = 0.0

    @property
    def hit_rate(self) -> float:
        return self.reused_steps / self.steps if self.steps else 0.0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["hit_rate"] = round(self.hit_rate, 4)
        return d

    def add(self, other: CacheStats) -> None:
        for k in ("runs", "steps", "computed_steps", "reused_steps", "calls", "computed_calls", "reused_calls",
                  "time_computed_s", "time_reused_s", "time_saved_s"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def clear(self) -> None:
        model = self.model
        self.__dict__.update(CacheStats(model=model).__dict__)


@dataclass
class _Stream:
    """What one stream remembers: the last two computed residuals (for copies and Taylor extrapolation) and
    the previous first-block residual / input (for the adaptive signal)."""

    history: deque = field(default_factory=lambda: deque(maxlen=2))
    prev_first: torch.Tensor | None = None
    prev_input: torch.Tensor | None = None
    prev_output: torch.Tensor | None = None
    pending_input: torch.Tensor | None = None
    rate: float | None = None
    rebuild: Any = None


@dataclass
class CallContext:
    """One model call in flight."""

    step: int
    t: float
    stream: _Stream
    key: Hashable
    first_of_step: bool
    device: torch.device | None
    started: float
    reuse: bool = False
    decided: bool = False
    base: Tensors | None = None
    order: str = ""  # a planned reuse: "T" extrapolate, "R" copy ("" = the config's choice)
    force_compute: bool = False  # e.g. a ControlNet adds per-step residuals to this call (see ``control_active``)


def _rel_change(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute change relative to the previous tensor's mean magnitude (scale free)."""
    return float((a.float() - b.float()).abs().mean() / (b.float().abs().mean() + 1e-8))


def control_active(control: Any) -> bool:
    """Whether a ControlNet contributes to this call: ``control`` is ComfyUI's control dict (``{"input": [...],
    "middle": [...], "output": [...]}``) or a list/tuple of diffusers ControlNet residuals; it is active when any
    of its tensors is non-zero (strength 0 or a step outside the ControlNet's start/end range gives none or zeros).

    Rule: an active call computes, and the residual it produces is not kept for reuse. ControlNet residuals
    depend on the current ``x`` and timestep and are added between blocks, so they cannot be frozen into a
    residual cached at another step (nor subtracted from one: they propagate through the later blocks), and a
    residual computed with them must not be reused by a later step that has none (after ``end_percent``)."""
    if control is None:
        return False
    if isinstance(control, torch.Tensor):
        return bool(control.detach().ne(0).any())
    if isinstance(control, dict):
        return any(control_active(v) for v in control.values())
    if isinstance(control, list | tuple):
        return any(control_active(v) for v in control)
    return False


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


class StepCacheState:
    """Cache state of one model: the strategy, per-run stream residuals and the stats."""

    def __init__(self, config: CacheConfig, label: str = "model") -> None:
        self.config = config.validate()
        # a quality target plans every decision itself; its strategy slot holds a rule that never reuses
        self.quality = None if config.target_psnr is None else QualityTarget(config.target_psnr, config.preset,
                                                                            label=label)
        self.strategy = FixedStrategy(skip_interval=1, warmup_steps=0) if self.quality is not None else \
            make_strategy(config.strategy, skip_interval=config.skip_interval, warmup_steps=config.warmup_steps,
                          threshold=config.threshold, max_reuse=config.max_reuse)
        self.runs_managed = False  # True while an adapter (ComfyUI's OUTER_SAMPLE) brackets the run itself
        self.stats = CacheStats(model=label)
        self.label = label
        self.enabled = True
        self.final_t: float | None = None  # timestep of a run's last step, when the adapter knows it
        self.lock = threading.RLock()
        self._streams: dict[Hashable, _Stream] = {}
        self._occ: dict[Hashable, int] = {}
        self._last_t: float | None = None
        self._step = -1
        self._decision: bool | None = None
        self._order = ""
        self._compute_time: dict[Hashable, float] = {}
        self._gen: torch.Generator | None = None
        self.last_run_decisions: list[bool] = []
        _register(self)

    # ---- runs and steps -------------------------------------------------------------------------
    def reset_run(self) -> None:
        """Forget every cached tensor (new run, shape change, disable)."""
        self._streams.clear()
        self._occ.clear()
        self._last_t = None
        self._step = -1
        self._decision = None
        self._gen = None
        self.strategy.reset()

    def finish_run(self) -> None:
        """The current run is over (a new one starts, the cache is removed, the process exits): a quality
        target stores what a calibrating run measured."""
        if self.quality is not None and self._last_t is not None:
            self.quality.end_run()

    def _debug(self, msg: str, *args: Any) -> None:
        if self.config.debug or _GLOBAL.global_debug:
            log.info("stepcache[%s] " + msg, self.label, *args)

    def begin_call(self, t: float, key: Hashable, device: torch.device | None = None) -> CallContext:
        """Place a call in its run/step/stream from its timestep."""
        tol = 1e-6 * max(1.0, abs(t))
        new_run = self._last_t is None or t > self._last_t + tol
        if new_run:
            if self._last_t is not None:
                self._debug("timestep went up (%.6g -> %.6g): new run", self._last_t, t)
            if self.quality is not None and not self.runs_managed:
                self.finish_run()
                self.quality.begin_run()
            self.reset_run()
            self.stats.runs += 1
            self.last_run_decisions = []
        first_of_step = new_run or t < self._last_t - tol
        if first_of_step:
            self._step += 1
            self._decision = None
            self._occ.clear()
            self.stats.steps += 1
            if self.quality is not None:
                self.quality.begin_step(self._step, t)
        self._last_t = t
        occ = self._occ.get(key, 0)
        self._occ[key] = occ + 1
        skey = (key, occ)
        stream = self._streams.get(skey)
        if stream is None:
            stream = self._streams[skey] = _Stream()
        _sync(device)
        return CallContext(step=self._step, t=t, stream=stream, key=skey, first_of_step=first_of_step,
                           device=device, started=time.perf_counter())

    def _decide(self, ctx: CallContext, signal: float | None) -> bool:
        """The step's decision (made by its first deciding call), downgraded to compute for a stream that
        has nothing cached."""
        if self._decision is None:
            last = self.final_t is not None and ctx.t <= self.final_t * (1 + 1e-6) + 1e-9
            adaptive = isinstance(self.strategy, AdaptiveStrategy)
            spent = self.strategy.accumulated + (signal or 0.0) if adaptive else None
            if self.quality is not None:  # the plan decides every step, the last one included
                self._order = "C" if ctx.force_compute else self.quality.decision(len(self.quality.times) - 1)
                wants, last = self._order != "C", False
            elif ctx.force_compute:  # computes without consulting the rule; the error budget restarts
                wants = False
                if adaptive:
                    self.strategy.reset()
            else:
                wants = self.strategy.reuse(ctx.step, None, signal)
            self._decision = bool(wants and not last)
            self.last_run_decisions.append(self._decision)
            if self._decision:
                self.stats.reused_steps += 1
            else:
                self.stats.computed_steps += 1
            acc = "" if spent is None else f" budget spent={spent:.4f}"
            sig = "n/a" if signal is None else f"{signal:.4f}"
            self._debug("step %d t=%.6g: %s (signal=%s%s%s)", ctx.step, ctx.t,
                        "reuse" if self._decision else "compute", sig, acc,
                        ", ControlNet active" if ctx.force_compute else "")
        ctx.reuse = self._decision and len(ctx.stream.history) > 0 and not ctx.force_compute
        ctx.order = self._order if self.quality is not None else ""
        ctx.decided = True
        return ctx.reuse

    # ---- block caching (span = blocks[1:]) ----------------------------------------------------
    def after_first_block(self, ctx: CallContext, h_in: Tensors, h_out: Tensors) -> bool:
        """Measure the first block's residual change and decide whether the rest of the blocks run."""
        role = next((r for r in h_out if r in h_in and h_in[r].shape == h_out[r].shape), None)
        signal = None
        if role is not None:
            first_res = (h_out[role] - h_in[role]).detach()
            prev = ctx.stream.prev_first
            if prev is not None and prev.shape == first_res.shape:
                signal = _rel_change(first_res, prev)
            ctx.stream.prev_first = first_res
        ctx.base = {k: v.detach().clone() for k, v in h_out.items() if v is not None}
        return self._decide(ctx, signal)

    def cached(self, ctx: CallContext, base: Tensors) -> Tensors:
        """``base + residual`` for a reused call (residual copied or extrapolated, plus optional noise)."""
        res = self._predict(ctx)
        out = {}
        for k, r in res.items():
            b = base.get(k)
            out[k] = r.clone() if b is None else b + r.to(b.dtype)
        return out

    def store(self, ctx: CallContext, out: Tensors, base: Tensors) -> None:
        """Remember ``out - base`` of a computed call (a call with an active ControlNet leaves nothing to
        reuse: its stream's history is dropped)."""
        if ctx.force_compute:
            ctx.stream.history.clear()
            return
        res = {}
        for k, v in out.items():
            if v is None:
                continue
            b = base.get(k)
            res[k] = v.detach().clone() if b is None or b.shape != v.shape else (v - b).detach()
        ctx.stream.history.append((ctx.t, res))

    def _predict(self, ctx: CallContext) -> Tensors:
        hist = ctx.stream.history
        t1, r1 = hist[-1]
        res = r1
        taylor = self.config.use_taylor if not ctx.order else ctx.order == "T"
        if taylor and len(hist) == 2:
            t0, r0 = hist[0]
            if abs(t1 - t0) > 1e-9 and r0.keys() == r1.keys():
                scale = (ctx.t - t1) / (t1 - t0)
                res = {k: r1[k] + (r1[k] - r0[k]) * scale for k in r1}
        if self.config.noise_scale > 0:
            res = {k: v + self._noise(v) for k, v in res.items()}
        return res

    def _noise(self, v: torch.Tensor) -> torch.Tensor:
        """CacheDiT's small noise on reused results: ``noise_scale * std(residual) * N(0, 1)``, seeded per run."""
        if self._gen is None or self._gen.device != v.device:
            self._gen = torch.Generator(device=v.device)
            self._gen.manual_seed(self.config.seed)
        n = torch.randn(v.shape, generator=self._gen, device=v.device, dtype=torch.float32)
        return (n * (self.config.noise_scale * float(v.float().std()))).to(v.dtype)

    # ---- output caching (UNets and models without a block hook) -------------------------------
    def decide_output(self, ctx: CallContext, x: torch.Tensor) -> bool:
        """Output-level decision: the predicted relative output change is the input change times the
        output/input change rate measured between the last two computed calls (EasyCache's estimate)."""
        s = ctx.stream
        signal = None
        xd = x.detach()
        if self.quality is not None:
            self.quality.call(xd if ctx.first_of_step else None)
        if s.prev_input is not None and s.prev_input.shape == xd.shape and s.prev_output is not None:
            dx = float((xd.float() - s.prev_input.float()).abs().mean())
            if s.rate is not None:
                signal = s.rate * dx / (float(s.prev_output.float().abs().mean()) + 1e-8)
        ctx.base = {}
        reuse = self._decide(ctx, signal)
        if not reuse:
            ctx.stream.pending_input = xd.clone()
        return reuse

    def store_output(self, ctx: CallContext, out: torch.Tensor) -> None:
        """Remember a computed output and update the output/input change rate."""
        s = ctx.stream
        od = out.detach()
        xin = s.pending_input
        if xin is not None and s.prev_input is not None and s.prev_output is not None \
                and s.prev_output.shape == od.shape and s.prev_input.shape == xin.shape:
            dx = float((xin.float() - s.prev_input.float()).abs().mean())
            if dx > 0:
                s.rate = float((od.float() - s.prev_output.float()).abs().mean()) / dx
        s.prev_input, s.prev_output, s.pending_input = xin, od.clone(), None
        if self.quality is not None and not ctx.force_compute:
            self.quality.record(ctx.key, ctx.t, od)
        self.store(ctx, {"out": od}, {})

    # ---- bookkeeping ------------------------------------------------------------------------
    def end_call(self, ctx: CallContext) -> None:
        _sync(ctx.device)
        elapsed = time.perf_counter() - ctx.started
        st = self.stats
        st.calls += 1
        shape_key = ctx.key[0]
        if ctx.reuse:
            st.reused_calls += 1
            st.time_reused_s += elapsed
            mean = self._compute_time.get(shape_key)
            if mean is not None:
                st.time_saved_s += max(0.0, mean - elapsed)
        else:
            st.computed_calls += 1
            st.time_computed_s += elapsed
            mean = self._compute_time.get(shape_key)
            self._compute_time[shape_key] = elapsed if mean is None else 0.8 * mean + 0.2 * elapsed

    def cached_bytes(self) -> int:
        """Bytes held by cached tensors (to check that runs do not grow memory)."""
        n = 0
        for s in self._streams.values():
            for _, res in s.history:
                n += sum(v.numel() * v.element_size() for v in res.values())
            for v in (s.prev_first, s.prev_input, s.prev_output, s.pending_input):
                if v is not None:
                    n += v.numel() * v.element_size()
        return n

    def summary(self) -> dict[str, Any]:
        d = self.stats.as_dict()
        d.update(strategy=self.config.strategy, skip_interval=self.config.skip_interval,
                 warmup_steps=self.config.warmup_steps, noise_scale=self.config.noise_scale,
                 extrapolate=self.config.use_taylor, enabled=self.enabled,
                 cached_mib=round(self.cached_bytes() / 2**20, 3))
        if self.quality is not None:
            d["level"] = "output"
            d["quality"] = self.quality.summary()
        if self.config.strategy == "adaptive":
            d["threshold"] = self.strategy.threshold  # type: ignore[union-attr]
            d["max_reuse"] = self.strategy.max_reuse  # type: ignore[union-attr]
        return d


# ---- process-wide registry ----------------------------------------------------------------------
@dataclass
class GlobalConfig:
    """Defaults used by ``enable_cache`` when an argument is not given."""

    default_skip_interval: int = 2
    default_strategy: str = "fixed"
    default_warmup_steps: int = 2
    default_preset: str | None = "balanced"  # enable_cache(model) with no arguments: this quality target
    global_debug: bool = False


_GLOBAL = GlobalConfig()
_LIVE: weakref.WeakSet[StepCacheState] = weakref.WeakSet()
_RETIRED = CacheStats(model="retired")
_RETIRED_MODELS = 0
_REG_LOCK = threading.Lock()


def _retire(stats: CacheStats) -> None:
    """Fold the counters of a garbage-collected cache into the global totals (the tensors are gone)."""
    global _RETIRED_MODELS
    with _REG_LOCK:
        _RETIRED.add(stats)
        _RETIRED_MODELS += 1


def _register(state: StepCacheState) -> None:
    with _REG_LOCK:
        _LIVE.add(state)
    weakref.finalize(state, _retire, state.stats)


@atexit.register
def _finish_live_runs() -> None:
    """A plain torch run has no end marker: a calibrating run still open at exit is stored now."""
    for s in live_states():
        if s.quality is not None and not s.runs_managed:
            with contextlib.suppress(Exception):
                s.finish_run()


def live_states() -> list[StepCacheState]:
    with _REG_LOCK:
        return list(_LIVE)


def global_stats() -> dict[str, Any]:
    states = live_states()
    total = CacheStats(model="all")
    with _REG_LOCK:
        total.add(_RETIRED)
        retired = _RETIRED_MODELS
    for s in states:
        total.add(s.stats)
    return {
        "total_models": len(states),
        "retired_models": retired,
        "total_runs": total.runs,
        "total_steps": total.steps,
        "total_computed_steps": total.computed_steps,
        "total_cache_hits": total.reused_steps,
        "total_calls": total.calls,
        "total_reused_calls": total.reused_calls,
        "hit_rate": round(total.hit_rate, 4),
        "total_time_saved_s": round(total.time_saved_s, 6),
        "models": [s.summary() for s in states],
        "config": asdict(_GLOBAL),
    }


def reset_stats() -> None:
    global _RETIRED_MODELS
    with _REG_LOCK:
        _RETIRED.clear()
        _RETIRED_MODELS = 0
    for s in live_states():
        s.stats.clear()


def global_config() -> GlobalConfig:
    return _GLOBAL
