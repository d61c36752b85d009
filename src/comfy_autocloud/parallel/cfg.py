"""CFG parallel (cond and uncond on different ranks) and its combination with sequence parallel.

ComfyUI batches cond and uncond into one model call (``[cond..., uncond...]`` along the batch).
With CFG degree 2 the world splits into two halves: ranks ``[0, P/2)`` run the first half of the
batch, ranks ``[P/2, P)`` the second; inside each half the image tokens are sequence-parallel over
``P/2`` ranks. Nothing is exchanged between the halves until one all-gather of the outputs, which
is why CFG parallel is the cheapest split when the batch allows it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .attention import CommCounter, SeqParallel
from .flux_sp import flux_forward

__all__ = ["STRATEGIES", "Mesh", "Plan", "build_mesh", "plan_for", "run_plan"]

STRATEGIES = ("auto", "ulysses", "ring", "cfg")


@dataclass(frozen=True)
class Plan:
    """How one model call is split: ``cfg`` batch halves x ``sp`` sequence shards with ``attention``."""

    cfg: int
    sp: int
    attention: str  # "ulysses" | "ring" | "none"
    note: str = ""

    def describe(self) -> str:
        parts = []
        if self.cfg > 1:
            parts.append(f"cfg x{self.cfg}")
        if self.sp > 1:
            parts.append(f"{self.attention} x{self.sp}")
        text = " + ".join(parts) or "single rank"
        return f"{text} ({self.note})" if self.note else text


def _sp_attention(heads: int, sp: int, wanted: str) -> tuple[str, str]:
    if sp == 1:
        return "none", ""
    if wanted == "ring":
        return "ring", ""
    if heads % sp == 0:
        return "ulysses", ""
    note = f"{heads} heads do not divide {sp} ranks: ring attention" if wanted == "ulysses" else ""
    return "ring", note


def plan_for(world: int, strategy: str, heads: int, batch: int) -> Plan:
    """Choose the split for one call. ``auto`` prefers CFG parallel when the batch has cond+uncond."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown parallel strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    can_cfg = world % 2 == 0 and batch % 2 == 0 and batch >= 2
    if strategy in ("cfg", "auto") and can_cfg:
        attn, note = _sp_attention(heads, world // 2, "ulysses")
        return Plan(2, world // 2, attn, note)
    note = ""
    if strategy == "cfg":
        note = f"batch {batch} has no cond/uncond pair: sequence parallel only"
    wanted = "ring" if strategy == "ring" else "ulysses"
    attn, why = _sp_attention(heads, world, wanted)
    return Plan(1, world, attn, "; ".join(n for n in (note, why) if n))


@dataclass
class Mesh:
    """Process groups every rank creates at start-up (``new_group`` is collective, so once, in order)."""

    world: int
    rank: int
    half_sp_group: dist.ProcessGroup | None  # my half's SP group when cfg == 2 and world >= 4
    cfg_group: dist.ProcessGroup | None  # {r, r + P/2} when world is even


def build_mesh(world: int, rank: int) -> Mesh:
    """Create the CFG and per-half SP groups (call on every rank)."""
    half_sp = cfg_group = None
    if world % 2 == 0 and world >= 2:
        half = world // 2
        for i in range(2):
            ranks = list(range(i * half, (i + 1) * half))
            g = dist.new_group(ranks) if half > 1 else None
            if rank in ranks:
                half_sp = g
        for j in range(half):
            g = dist.new_group([j, j + half])
            if rank in (j, j + half):
                cfg_group = g
    return Mesh(world, rank, half_sp, cfg_group)


def run_plan(model: nn.Module, plan: Plan, mesh: Mesh, counter: CommCounter, x: Tensor, timestep: Tensor,
             context: Tensor, y: Tensor | None, guidance: Tensor | None) -> Tensor:
    """Run one model call under ``plan`` on this rank; every rank returns the full output."""
    if plan.cfg == 1:
        sp = SeqParallel(None, mesh.rank, mesh.world, plan.attention, counter=counter) if plan.sp > 1 else None
        return flux_forward(model, x, timestep, context, y, guidance, sp=sp)
    half = mesh.world // 2
    idx, sp_rank = divmod(mesh.rank, half)
    n = x.shape[0] // 2
    part = slice(idx * n, (idx + 1) * n)

    def pick(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[part]

    sp = SeqParallel(mesh.half_sp_group, sp_rank, half, plan.attention, counter=counter) if half > 1 else None
    out = flux_forward(model, x[part], pick(timestep), pick(context), pick(y), pick(guidance), sp=sp)
    parts = [torch.empty_like(out) for _ in range(2)]
    dist.all_gather(parts, out.contiguous(), group=mesh.cfg_group)
    counter.add("cfg_all_gather", out.numel() * out.element_size())
    return torch.cat(parts, dim=0)
