"""Quality targets: measure once what each reuse would cost, then reuse only as much as a PSNR target allows.

A *calibration* is one sampling run that computes every step while recording, for every step ``i`` and every
pair of earlier steps ``(p, c)`` that could have been the last two computed ones, the RMS error of the output the
cache would have returned at ``i`` (first-order Taylor from ``p`` and ``c``, or a copy of ``c``) against the
true output. Errors are kept per *schedule* (the run's timesteps and the sampler family) and persisted per model
fingerprint, so later runs of the same model, step count and sampler plan from them without any extra work.

The error model: the sampler moves the latent by ``dt_i * output_i`` (Euler on a flow velocity, or ComfyUI's
``(x - denoised) / sigma``), so a reused step moves the final latent by ``dt_i * error_i``; errors of the steps
reused in a row add up, runs of reuse combine as a 1.5-norm (``SEGMENT_EXP``). The planner picks
the fewest computed steps whose predicted error keeps ``20 log10(peak / error) >= target`` dB, ``peak`` being the
calibration run's latent value range (images in [-1, 1] have peak 2: the usual PSNR). It is exact dynamic
programming over (last two computed steps), so the plan is the cheapest one the measured errors allow.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import threading
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("comfy_autocloud.stepcache")

PRESETS: dict[str, float] = {"quality": 40.0, "balanced": 35.0, "fast": 30.0}
FEW_STEPS = 8  # schedules this short compute every step: each step moves the image too much to skip
MAX_REUSE = 8  # longest run of reused steps a plan may contain (extrapolation grows worse with distance)
FORMAT = 1
TIME_TOL = 1e-4


def target_of(preset: str | None, target_psnr: float | None) -> float:
    """The PSNR target in dB from a preset name or an explicit value (the explicit value wins)."""
    if target_psnr is not None:
        t = float(target_psnr)
        if not 10.0 <= t <= 100.0:
            raise ValueError(f"target_psnr must be in 10..100 dB, got {target_psnr}")
        return t
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}: expected one of {', '.join(PRESETS)}")
    return PRESETS[preset]


def fingerprint(module: torch.nn.Module, extra: str = "", skip: set[str] | frozenset[str] = frozenset()) -> str:
    """A cheap identity for a model's weights: class, every tensor's name/shape/dtype, and the first values of a
    spread of tensors (a full hash of many GB would cost seconds per run). ``extra`` adds e.g. LoRA patches;
    tensors named in ``skip`` give no values (a weight patch may have changed them in place)."""
    h = hashlib.sha256(type(module).__qualname__.encode())
    items = list(module.state_dict(keep_vars=True).items())
    for name, t in items:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    valued = [(n, t) for n, t in items if n not in skip]
    picks = valued[:: max(1, len(valued) // 16)][:17]
    for _, t in picks:
        try:
            if t.device.type != "meta" and t.numel() and t.is_contiguous():  # a view: no copy of the tensor
                h.update(t.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
        except Exception:  # quantized / custom tensor types: the names and shapes still identify the model
            continue
    h.update(extra.encode())
    return h.hexdigest()[:20]


@dataclass
class Calibration:
    """What one all-computed run measured. ``err[i]`` maps ``(p, c)`` (``p = -1``: copy of ``c``) to the RMS
    error of predicting step ``i``'s output from computed steps ``p < c < i``."""

    family: str
    schedule: list[float]  # what identifies the run up front (ComfyUI: its sigmas), else the step timesteps
    times: list[float]  # the timestep of each step as the cache saw it
    calls: list[int]  # model calls per step
    dt: list[float]  # how far the sampler moves on each step's output (normalized timestep differences)
    peak: float  # the latent's value range at the end of the run
    err: list[dict[tuple[int, int], float]]
    # later runs check the calibration: log(observed / calibrated error) of predictions made at their computed
    # steps, summed over every check; errors are scaled by exp(mean) when that exceeds 1 (``gain``)
    check_log_sum: float = 0.0
    checks: int = 0

    @property
    def gain(self) -> float:
        """How much larger than calibrated the errors seen by later runs were (1 when not larger)."""
        return max(1.0, math.exp(self.check_log_sum / self.checks)) if self.checks else 1.0

    @property
    def steps(self) -> int:
        return len(self.times)

    @property
    def key(self) -> str:
        s = ",".join(f"{t:.6g}" for t in self.schedule)
        if not self.family:  # plain torch: the sampler shows only in the calls per step (Heun: two)
            s += "|" + ",".join(map(str, self.calls))
        return f"{self.steps}:{self.family}:{hashlib.sha256(s.encode()).hexdigest()[:12]}"

    def to_json(self) -> dict[str, Any]:
        return {"family": self.family, "schedule": self.schedule, "times": self.times, "calls": self.calls,
                "dt": self.dt, "peak": self.peak, "check_log_sum": self.check_log_sum, "checks": self.checks,
                "err": [[[p, c, round(e, 9)] for (p, c), e in sorted(d.items())] for d in self.err]}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Calibration:
        err = [{(int(p), int(c)): float(e) for p, c, e in row} for row in d["err"]]
        cal = cls(family=str(d["family"]), schedule=[float(v) for v in d["schedule"]],
                  times=[float(v) for v in d["times"]], calls=[int(v) for v in d["calls"]],
                  dt=[float(v) for v in d["dt"]], peak=float(d["peak"]), err=err,
                  check_log_sum=float(d.get("check_log_sum", 0.0)), checks=int(d.get("checks", 0)))
        if not (len(cal.times) == len(cal.calls) == len(cal.dt) == len(cal.err)) or cal.peak <= 0:
            raise ValueError("inconsistent calibration record (lengths of times/calls/dt/err differ or peak <= 0)")
        return cal

    def matches(self, times: Sequence[float], calls: Sequence[int], family: str | None,
                schedule: Sequence[float] | None) -> bool:
        """Whether a run seen so far (``times`` of its steps, ``calls`` of its completed steps) is this schedule."""
        if schedule is not None:
            return family == self.family and len(schedule) == len(self.schedule) and all(
                _close(a, b) for a, b in zip(schedule, self.schedule, strict=True))
        if len(times) > self.steps or any(not _close(a, b) for a, b in zip(times, self.times, strict=False)):
            return False
        return all(a == b for a, b in zip(calls, self.calls, strict=False))


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= TIME_TOL * max(1.0, abs(a), abs(b))


@dataclass
class Plan:
    """Per step: ``"C"`` compute, ``"T"`` reuse extrapolated (first order), ``"R"`` reuse copied."""

    ops: str
    predicted_psnr: float
    target_psnr: float
    note: str = ""

    @property
    def computed(self) -> int:
        return self.ops.count("C")

    def as_dict(self) -> dict[str, Any]:
        d = {"plan": self.ops, "computed_steps": self.computed, "reused_steps": len(self.ops) - self.computed,
             "predicted_psnr": round(self.predicted_psnr, 2), "target_psnr": self.target_psnr}
        if self.note:
            d["note"] = self.note
        return d


def _psnr(peak: float, e: float) -> float:
    return 100.0 if e <= 0 else min(100.0, 20 * math.log10(peak / e))


# Errors of the steps reused in a row after one computed step share their sign (one extrapolation), so they add
# linearly; each computed step re-anchors the prediction, so errors of different runs of reuse only partly add up:
# they combine as a 1.5-norm, between fully correlated (1) and independent (2). Measured on bench/stepcache.py's
# DiT, other seeds and classes than calibrated, targets 30/35/40 dB: achieved 1.2-6.5 dB above the target (linear:
# 7-12 dB above, too cautious; quadrature: 1.8-2.8 dB above there, but 1.4 dB below on a random tiny DiT at 60).
SEGMENT_EXP = 1.5


def make_plan(cal: Calibration, target_psnr: float, max_reuse: int = MAX_REUSE, first: int = 1) -> Plan:
    """The fewest computed steps whose predicted PSNR meets ``target_psnr`` (exact DP over the last two computed
    steps); schedules of ``FEW_STEPS`` or fewer steps compute every step. The ``first`` steps always compute (at
    least step 0; plain torch runs are matched to their calibration on their first steps, which compute)."""
    n = cal.steps
    if n <= FEW_STEPS:
        return Plan("C" * n, 100.0, target_psnr,
                    note=f"few-step schedule ({n} steps <= {FEW_STEPS}): every step computes")
    q = SEGMENT_EXP
    budget = (cal.peak * 10 ** (-target_psnr / 20) / cal.gain) ** q

    def step_err(p: int, c: int, i: int) -> tuple[float, str]:
        """The cheaper predictor of step i from computed p < c (T: extrapolated, R: copied); C when unmeasured."""
        row, dt = cal.err[i], abs(cal.dt[i])
        best = (math.inf, "C")
        for pp, op in ((p, "T"), (-1, "R")):
            e = row.get((pp, c))
            if e is not None and dt * e < best[0]:
                best = (dt * e, op)
        return best

    def segments(p: int, c: int) -> list[tuple[int, float, str]]:
        """(next computed step k, cost of reusing c+1..k-1, their ops); k == n ends the run."""
        out, seg, ops = [], 0.0, ""
        for k in range(c + 1, min(n, c + 2 + max_reuse) + 1):
            out.append((k, seg ** q, ops))
            if k == n:
                break
            e, op = step_err(p, c, k)
            if op == "C":
                break
            seg += e
            ops += op
        return out

    # layer m: state (p, c) = last two computed steps after m computed steps -> (least cost, ops so far)
    f = max(1, min(first, n))
    layer: dict[tuple[int, int], tuple[float, str]] = {(f - 2, f - 1): (0.0, "C" * f)}
    best_end: tuple[float, str] | None = None
    while layer and best_end is None:
        nxt: dict[tuple[int, int], tuple[float, str]] = {}
        done: list[tuple[float, str]] = []
        for (p, c), (cost, ops) in layer.items():
            for k, seg, sops in segments(p, c):
                total = cost + seg
                if total > budget:
                    continue
                if k == n:
                    done.append((total, ops + sops))
                elif total < nxt.get((c, k), (math.inf, ""))[0]:
                    nxt[(c, k)] = (total, ops + sops + "C")
        if done:
            best_end = min(done)
        layer = nxt
    if best_end is None:
        return Plan("C" * n, 100.0, target_psnr, note="no reuse meets the target: every step computes")
    return Plan(best_end[1], _psnr(cal.peak, best_end[0] ** (1 / q) * cal.gain), target_psnr)


class Recorder:
    """Collects a calibration during an all-computed run: a short window of each stream's past outputs, and
    for each new output the error every (p, c) predictor would have made."""

    def __init__(self, max_reuse: int = MAX_REUSE) -> None:
        self.k = max_reuse
        self.times: list[float] = []
        self.calls: list[int] = []
        self.peak_rows: float | None = None
        self._win: dict[Hashable, deque[tuple[int, float, torch.Tensor]]] = {}
        self._acc: list[dict[tuple[int, int], list[float]]] = []  # per step: (p, c) -> [sum sq, count]

    def begin_step(self, t: float) -> None:
        self.times.append(t)
        self.calls.append(0)
        self._acc.append({})

    def call(self, x: torch.Tensor | None) -> None:
        """A call of the current step; the first one's input gives the latent range (kept for the last step)."""
        self.calls[-1] += 1
        if self.calls[-1] == 1 and x is not None and x.numel():
            flat = x.detach().float().reshape(x.shape[0], -1)
            self.peak_rows = float((flat.amax(1) - flat.amin(1)).mean())

    def record(self, key: Hashable, t: float, out: torch.Tensor) -> None:
        i = len(self.times) - 1
        win = self._win.setdefault(key, deque(maxlen=self.k + 2))
        o = out.detach().float()
        acc = self._acc[i]
        past = [w for w in win if i - w[0] <= self.k + 1]
        for ci, tc, oc in past:
            if i - ci > self.k:
                continue
            d = oc - o
            self._add(acc, (-1, ci), d)
            for pi, tp, op_ in past:
                if pi < ci and ci - pi <= self.k + 1 and abs(tc - tp) > 1e-12:
                    self._add(acc, (pi, ci), d + (oc - op_) * ((t - tc) / (tc - tp)))
        win.append((i, t, o))

    @staticmethod
    def _add(acc: dict[tuple[int, int], list[float]], k: tuple[int, int], d: torch.Tensor) -> None:
        a = acc.setdefault(k, [0.0, 0.0])
        a[0] += float(d.pow(2).sum())
        a[1] += d.numel()

    def finish(self, family: str, schedule: Sequence[float] | None, final_t: float) -> Calibration | None:
        """The calibration of the finished run (None when it saw fewer than two steps or no latent range)."""
        n = len(self.times)
        if n < 2 or not self.peak_rows:
            return None
        nxt = [*self.times[1:], final_t]
        scale = max(1.0, abs(self.times[0]))  # timesteps in 0..1000 (SD3-style) move the latent by sigma = t/1000
        scale = 1000.0 if scale > 1.5 else 1.0
        dt = [(a - b) / scale for a, b in zip(self.times, nxt, strict=True)]
        err = [{k: math.sqrt(s / c) for k, (s, c) in acc.items() if c} for acc in self._acc]
        return Calibration(family=family, schedule=list(schedule) if schedule is not None else list(self.times),
                           times=list(self.times), calls=list(self.calls), dt=dt, peak=self.peak_rows, err=err)


@dataclass
class CalibrationFile:
    """The calibrations of one model fingerprint, persisted as ``<dir>/<fingerprint>.json``."""

    path: Path | None
    label: str = ""
    items: dict[str, Calibration] = field(default_factory=dict)
    error: str = ""

    def load(self) -> CalibrationFile:
        if self.path is None or not self.path.is_file():
            return self
        try:
            d = json.loads(self.path.read_text(encoding="utf-8"))
            if d.get("format") != FORMAT:
                raise ValueError(f"format {d.get('format')!r}, expected {FORMAT}")
            self.items = {k: Calibration.from_json(v) for k, v in d["calibrations"].items()}
        except (OSError, ValueError, KeyError, TypeError) as e:
            self.error = f"{self.path}: unreadable calibration ({type(e).__name__}: {e}); calibrating again"
            log.warning("stepcache: %s", self.error)
            self.items = {}
        return self

    def save(self) -> None:
        if self.path is None:
            return
        from comfy_autocloud.fsutil import write_atomic

        body = {"format": FORMAT, "model": self.label,
                "calibrations": {k: c.to_json() for k, c in self.items.items()}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(body, separators=(",", ":")))
            self.error = ""
        except OSError as e:
            self.error = f"{self.path}: cannot save calibration ({e.strerror or e}); kept in memory"
            log.warning("stepcache: %s", self.error)


_DIRS: dict[str, Path | None] = {"explicit": None, "store": None}
_FILES: dict[tuple[str, str], CalibrationFile] = {}
_FILES_LOCK = threading.Lock()


def _set_dir(kind: str, path: str | os.PathLike[str] | None) -> None:
    new = None if path is None else Path(path)
    if new != _DIRS[kind]:
        _DIRS[kind] = new
        with _FILES_LOCK:
            _FILES.clear()


def set_calibration_dir(path: str | os.PathLike[str] | None) -> None:
    """Where calibrations persist, overriding the store's directory (None: back to the store's)."""
    _set_dir("explicit", path)


def use_store_dir(private_dir: str | os.PathLike[str] | None) -> None:
    """The running store's private directory (the ComfyUI adapter's): calibrations go to its ``stepcache``."""
    _set_dir("store", None if private_dir is None else Path(private_dir) / "stepcache")


def calibration_dir() -> Path | None:
    """An explicit directory, else ``<store private dir>/stepcache`` of the running store, else that of the
    configured cache (``AUTOCLOUD_CACHE`` & co.); None when the settings cannot be read: memory only."""
    for kind in ("explicit", "store"):
        if _DIRS[kind] is not None:
            return _DIRS[kind]
    try:
        from comfy_autocloud.config import load_settings
        from comfy_autocloud.store.layout import PRIVATE_DIR

        return load_settings().cache_path / PRIVATE_DIR / "stepcache"
    except Exception as e:
        log.warning("stepcache: calibrations kept in memory only (settings unreadable: %s)", e)
        return None


def calibration_file(model_hash: str, label: str = "") -> CalibrationFile:
    """The (process-wide, shared) calibrations of one model fingerprint, loaded from disk on first use."""
    d = calibration_dir()
    with _FILES_LOCK:
        key = (str(d), model_hash)
        f = _FILES.get(key)
        if f is None:
            f = _FILES[key] = CalibrationFile(None if d is None else d / f"{model_hash}.json", label).load()
        return f
