"""Step rules: which sampling steps compute the transformer and which reuse the cache.

Each strategy is a small object with one method, ``reuse(step, total, signal)``, called once per sampling
step (the first model call at a new timestep). Steps are counted from 0 at the start of a run. Rules that
hold for every strategy (enforced by the engine in ``state.py``, not here):

* steps ``< warmup_steps`` always compute (the early steps shape the image and change fastest);
* the last step of a run computes when the run length is known (ComfyUI passes its sigmas);
* a call whose stream has nothing cached yet (e.g. the first unconditional call) computes.

Strategies keep only counters, never tensors, so resetting them between runs is free.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STRATEGIES = ("fixed", "dynamic", "adaptive")


@dataclass
class FixedStrategy:
    """Seed rule "skip 1 step in every ``skip_interval``": after warmup, steps compute ``skip_interval - 1``
    times then reuse once, repeating. ``skip_interval=2`` alternates compute/reuse (hit rate ~50%);
    ``skip_interval<=1`` never reuses."""

    skip_interval: int = 2
    warmup_steps: int = 2
    name: str = "fixed"
    needs_signal: bool = False

    def reuse(self, step: int, total: int | None = None, signal: float | None = None) -> bool:
        if step < self.warmup_steps or self.skip_interval < 2:
            return False
        return (step - self.warmup_steps + 1) % self.skip_interval == 0

    def reset(self) -> None:
        """Stateless: nothing to reset."""


@dataclass
class DynamicStrategy:
    """Reuse more often as sampling progresses: the period starts at ``skip_interval`` (compute
    ``skip_interval - 1`` steps, reuse 1) and shrinks by one after every reuse until it reaches 2
    (alternate compute/reuse). Late steps of a flow/diffusion schedule change least, so they get cached
    most. ``skip_interval<=1`` never reuses."""

    skip_interval: int = 3
    warmup_steps: int = 2
    name: str = "dynamic"
    needs_signal: bool = False
    _period: int = field(default=0, repr=False)
    _since_reuse: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._period = max(2, self.skip_interval)
        self._since_reuse = 0

    def reuse(self, step: int, total: int | None = None, signal: float | None = None) -> bool:
        if step < self.warmup_steps or self.skip_interval < 2:
            return False
        self._since_reuse += 1
        if self._since_reuse >= self._period:
            self._since_reuse = 0
            self._period = max(2, self._period - 1)
            return True
        return False


@dataclass
class AdaptiveStrategy:
    """Decide from measured change: ``signal`` is the relative change of the first block's residual since
    the previous step (block caching) or the predicted relative output change (output caching). Signals
    accumulate while steps are reused; a step reuses while the sum stays below ``threshold`` and fewer than
    ``max_reuse`` steps in a row were reused, otherwise it computes and the sum restarts at 0. The engine
    extrapolates reused residuals from their history (first-order Taylor in the timestep)."""

    threshold: float = 0.3
    warmup_steps: int = 2
    max_reuse: int = 2
    name: str = "adaptive"
    needs_signal: bool = True
    _acc: float = field(default=0.0, repr=False)
    _run: int = field(default=0, repr=False)

    def reset(self) -> None:
        self._acc = 0.0
        self._run = 0

    def reuse(self, step: int, total: int | None = None, signal: float | None = None) -> bool:
        if step < self.warmup_steps or signal is None or self.max_reuse < 1:
            self._acc, self._run = 0.0, 0
            return False
        self._acc += float(signal)
        if self._acc < self.threshold and self._run < self.max_reuse:
            self._run += 1
            return True
        self._acc, self._run = 0.0, 0
        return False

    @property
    def accumulated(self) -> float:
        """The error budget spent since the last computed step (for debug logs)."""
        return self._acc


Strategy = FixedStrategy | DynamicStrategy | AdaptiveStrategy


def make_strategy(
    name: str, *, skip_interval: int, warmup_steps: int, threshold: float | None = None, max_reuse: int | None = None
) -> Strategy:
    """Build a strategy by its seed name; ``threshold``/``max_reuse`` only matter for ``adaptive``
    (``max_reuse`` defaults to ``max(1, skip_interval - 1)``: one computed step serves at most
    ``skip_interval`` steps)."""
    if skip_interval < 1 or skip_interval > 64:
        raise ValueError(f"skip_interval must be in 1..64, got {skip_interval}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if name == "fixed":
        return FixedStrategy(skip_interval=skip_interval, warmup_steps=warmup_steps)
    if name == "dynamic":
        return DynamicStrategy(skip_interval=skip_interval, warmup_steps=warmup_steps)
    if name == "adaptive":
        mr = max(1, skip_interval - 1) if max_reuse is None else max_reuse
        th = AdaptiveStrategy.threshold if threshold is None else threshold
        if th < 0:
            raise ValueError(f"threshold must be >= 0, got {th}")
        return AdaptiveStrategy(threshold=th, warmup_steps=warmup_steps, max_reuse=mr)
    raise ValueError(f"unknown strategy {name!r}: expected one of {', '.join(STRATEGIES)}")
