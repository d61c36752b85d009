"""The per-model controller of a quality target: which calibration a run follows, or that it calibrates.

A run that matches a known calibration (ComfyUI: same sampler and sigmas, known up front; plain torch: same
timesteps and calls per step so far, matched step by step) follows that calibration's plan for the target. A run
that matches none computes every step and records a calibration, saved when the run ends. Plain torch runs
cannot be identified before they have shown a timestep: they are matched at step 1, on the timesteps of steps 0
and 1 and the calls of step 0 (every plan computes step 0), and checked again at every later step. A run that
leaves the matched schedule at step s (e.g. Heun: same timesteps as Euler, two calls per step from step 1)
computes the rest, and later runs are matched at step s, so that schedule gets its own calibration.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .calibration import Calibration, CalibrationFile, Plan, Recorder, calibration_file, make_plan

log = logging.getLogger("comfy_autocloud.stepcache")
UNDECIDED_STEPS = 1  # plain torch runs: steps computed before the run's schedule is matched


@dataclass
class RunInfo:
    """What the last run did, for ``summary()`` and the Detailed Stats node."""

    mode: str = ""  # "calibrate" | "plan" | "diverged"
    calibration: str = ""
    plan: dict[str, Any] = field(default_factory=dict)
    note: str = ""


class QualityTarget:
    """Chooses each step's decision for a PSNR target from the model's calibrations."""

    def __init__(self, target_psnr: float, preset: str | None = None, model_hash: str | None = None,
                 label: str = "model") -> None:
        self.target_psnr = float(target_psnr)
        self.preset = preset
        self.label = label
        self.model_hash = model_hash
        self.file: CalibrationFile | None = None
        self._plans: dict[tuple[str, float, int, float], Plan] = {}
        self.undecided = UNDECIDED_STEPS  # plain torch runs: matched to a calibration at this step
        self.last = RunInfo()
        self._reset_run()

    # ---- run lifecycle --------------------------------------------------------------------------
    def _reset_run(self) -> None:
        self.family: str | None = None
        self.schedule: list[float] | None = None
        self.final_t = 0.0
        self.recorder: Recorder | None = Recorder()
        self.cal: Calibration | None = None
        self.plan: Plan | None = None
        self.mode = "undecided"
        self.times: list[float] = []
        self.calls: list[int] = []
        self._seen: dict[Hashable, list[tuple[int, float, torch.Tensor]]] = {}  # plan runs: last computed outputs
        self._log_ratios: list[float] = []

    def set_model(self, model_hash: str) -> None:
        if model_hash != self.model_hash or self.file is None:
            self.model_hash = model_hash
            self.file = calibration_file(model_hash, self.label)

    def begin_run(self, schedule: Sequence[float] | None = None, family: str | None = None,
                  final_t: float = 0.0) -> None:
        """A new run; ComfyUI passes its sigmas and sampler up front (then the plan is chosen here)."""
        self._reset_run()
        self.final_t = float(final_t)
        self.family = family
        self.schedule = None if schedule is None else [float(s) for s in schedule]
        if self.schedule is not None:
            cal = self._match([], [])
            if cal is not None:
                self._follow(cal)
            else:
                self._calibrate()

    def end_run(self) -> None:
        """Store the calibration a calibrating run recorded (nothing for runs that followed a plan)."""
        if self.mode in ("calibrate", "undecided") and self.recorder is not None and self.file is not None:
            cal = self.recorder.finish(self.family or "", self.schedule, self.final_t)
            if cal is not None and cal.steps > 1:
                self.file.items[cal.key] = cal
                self.file.save()
                plan = self.plan_for(cal)
                self.last = RunInfo("calibrate", cal.key, plan.as_dict(),
                                    f"calibration run: every step computed; next runs follow the plan"
                                    f"{' (' + plan.note + ')' if plan.note else ''}")
        elif self.mode == "plan" and self.cal is not None and self._log_ratios and self.file is not None:
            before = self.cal.gain
            self.cal.check_log_sum += sum(self._log_ratios)
            self.cal.checks += len(self._log_ratios)
            self.file.save()
            if self.cal.gain > before * 1.05:
                log.info("stepcache[%s] errors %.2fx the calibration's (mean of %d checks): planning with them",
                         self.label, self.cal.gain, self.cal.checks)
        self._seen.clear()
        self.recorder = None
        self.mode = "ended"

    # ---- steps ------------------------------------------------------------------------------------
    def begin_step(self, step: int, t: float) -> None:
        self.times.append(t)
        self.calls.append(0)
        if self.recorder is not None:
            self.recorder.begin_step(t)
        if self.mode == "undecided" and step >= self.undecided:
            cal = self._match(self.times, self.calls[:-1])
            if cal is not None:
                self._follow(cal)
            else:
                self._calibrate()
        elif self.mode == "plan" and self.schedule is None and self.cal is not None \
                and not self.cal.matches(self.times, self.calls[:-1], None, None):
            self.mode = "diverged"
            self.undecided = max(self.undecided, step)
            self.last = RunInfo("diverged", self.cal.key, {},
                                f"the run left calibration {self.cal.key} at step {step}: the rest of it computed")
            log.info("stepcache[%s] run left calibration %s at step %d: computing the rest", self.label,
                     self.cal.key, step)

    def call(self, x: torch.Tensor | None) -> None:
        self.calls[-1] += 1
        if self.recorder is not None:
            self.recorder.call(x)

    def decision(self, step: int) -> str:
        """``C`` compute, ``T`` reuse extrapolated, ``R`` reuse copied."""
        if self.mode != "plan" or self.plan is None or step >= len(self.plan.ops):
            return "C"
        return self.plan.ops[step]

    def record(self, key: Hashable, t: float, out: torch.Tensor) -> None:
        """A computed output: recorded by a calibrating run, checked against the calibration by a planned one."""
        if self.recorder is not None:
            self.recorder.record(key, t, out)
        elif self.mode == "plan" and self.cal is not None:
            self._check(key, t, out)

    def _check(self, key: Hashable, t: float, out: torch.Tensor) -> None:
        """Predict this computed output from the stream's last two computed ones, as a reuse would have, and
        compare the error with what the calibration measured for the same steps (the plan's own reuses are
        predicted the same way, so a run whose errors are larger than calibrated shows it here)."""
        assert self.cal is not None
        i = len(self.times) - 1
        hist = self._seen.setdefault(key, [])
        o = out.detach().float()
        if hist and i < self.cal.steps:
            c, tc, oc = hist[-1]
            p, pred = -1, oc
            if len(hist) > 1 and abs(tc - hist[-2][1]) > 1e-12:
                p, tp, op_ = hist[-2]
                pred = oc + (oc - op_) * ((t - tc) / (tc - tp))
            cal_e = self.cal.err[i].get((p, c))
            if cal_e:
                e = float((pred - o).pow(2).mean().sqrt())
                self._log_ratios.append(math.log(max(e, 1e-12) / cal_e))
        hist.append((i, t, o))
        del hist[:-2]

    # ---- calibrations -----------------------------------------------------------------------------
    def _match(self, times: list[float], calls: list[int]) -> Calibration | None:
        if self.file is None:
            return None
        for cal in reversed(list(self.file.items.values())):
            if cal.matches(times, calls, self.family, self.schedule):
                return cal
        return None

    def _follow(self, cal: Calibration) -> None:
        self.cal = cal
        self.plan = self.plan_for(cal)
        self.mode = "plan"
        self.recorder = None
        self.last = RunInfo("plan", cal.key, self.plan.as_dict(), self.plan.note)

    def _calibrate(self) -> None:
        self.mode = "calibrate"
        self.last = RunInfo("calibrate", "", {}, "calibration run: every step computes while the cost of each "
                                                  "possible reuse is recorded")

    def plan_for(self, cal: Calibration) -> Plan:
        first = 1 if cal.family else self.undecided
        k = (cal.key, self.target_psnr, first, round(cal.gain, 2))
        p = self._plans.get(k)
        if p is None:
            p = self._plans[k] = make_plan(cal, self.target_psnr, first=first)
        return p

    def summary(self) -> dict[str, Any]:
        d: dict[str, Any] = {"target_psnr": self.target_psnr, "preset": self.preset, "model_hash": self.model_hash,
                             "file": str(self.file.path) if self.file and self.file.path else None,
                             "calibrations": {k: {"steps": c.steps, "family": c.family, "checks": c.checks,
                                                  "error_gain": round(c.gain, 3), **self.plan_for(c).as_dict()}
                                              for k, c in (self.file.items.items() if self.file else [])}}
        if self.file is not None and self.file.error:
            d["error"] = self.file.error
        if self.last.mode:
            d["last_run"] = {"mode": self.last.mode, "calibration": self.last.calibration, **self.last.plan,
                             **({"note": self.last.note} if self.last.note else {})}
        return d
