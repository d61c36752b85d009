"""Sequence-parallel joint attention for Flux-type DiTs (Ulysses all-to-all and ring with online softmax).

Layout on every rank: ``[txt tokens (replicated on all ranks) | this rank's image shard]``, the way
Flux concatenates text and image tokens (xDiT/yunchang call this joint attention with strategy
"front"). Image shards may have different lengths (``img_sizes``); text is never split, because it is
short and its stream is cheap to compute redundantly.

- Ulysses (DeepSpeed-Ulysses, yunchang ``UlyssesAttention``): one all-to-all turns "all heads, my
  tokens" into "my heads, all tokens"; full attention runs locally; a second all-to-all turns it back.
  Needs ``heads % world == 0``. Per rank it sends ``4 * (P-1)/P`` of its local q/k/v/out activations.
- Ring (Ring-Attention, yunchang ``RingAttention``): queries stay put; image key/value blocks travel
  around the ring while each rank merges partial results with the log-sum-exp (online softmax) rule.
  Works for any head count; sends ``2 * (P-1)`` local k/v blocks per rank; the transfer of the next
  block overlaps the attention on the current one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CommCounter",
    "SeqParallel",
    "attention_with_lse",
    "balanced_split",
    "math_attention_with_lse",
    "merge_attention",
    "ring_attention",
    "ulysses_attention",
]


def balanced_split(n: int, parts: int) -> list[int]:
    """Shard sizes for ``n`` tokens over ``parts`` ranks (the first ``n % parts`` get one more)."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


@dataclass
class CommCounter:
    """Bytes this rank sent to other ranks, by collective kind (for the benchmark's volume report)."""

    sent: dict[str, int] = field(default_factory=dict)

    def add(self, kind: str, nbytes: int) -> None:
        self.sent[kind] = self.sent.get(kind, 0) + int(nbytes)

    def total(self) -> int:
        return sum(self.sent.values())

    def reset(self) -> None:
        self.sent.clear()


def attention_with_lse(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention returning (out, logsumexp); out (B,H,Lq,D), lse (B,H,Lq) in float32.

    Uses the fused CPU flash kernel when available (it returns the log-sum-exp we need for merging),
    else plain math.
    """
    if q.device.type == "cpu" and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
        try:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)
            return out, lse.float()
        except RuntimeError:
            pass
    return math_attention_with_lse(q, k, v)


def math_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, chunk: int = 1024) -> tuple[Tensor, Tensor]:
    """Reference kernel (used where no fused kernel returns the LSE, e.g. CUDA): float32 maths in query
    chunks so the score matrix stays bounded (chunk x Lk per head)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    kf, vf = k.float(), v.float()
    outs, lses = [], []
    for qc in q.split(chunk, dim=2):
        scores = torch.matmul(qc.float(), kf.transpose(-1, -2)) * scale
        lse = torch.logsumexp(scores, dim=-1)
        outs.append(torch.matmul(torch.exp(scores - lse.unsqueeze(-1)), vf).to(q.dtype))
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def merge_attention(out: Tensor, lse: Tensor, out2: Tensor, lse2: Tensor) -> tuple[Tensor, Tensor]:
    """Combine two partial attentions over disjoint key sets (online softmax)."""
    new_lse = torch.logaddexp(lse, lse2)
    w1 = torch.exp(lse - new_lse).unsqueeze(-1)
    w2 = torch.exp(lse2 - new_lse).unsqueeze(-1)
    merged = (out.float() * w1 + out2.float() * w2).to(out.dtype)
    return merged, new_lse


@dataclass
class SeqParallel:
    """Where this rank sits in its sequence-parallel group and how attention is split."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    strategy: str  # "ulysses" | "ring"
    n_txt: int = 0
    img_sizes: list[int] = field(default_factory=list)
    counter: CommCounter = field(default_factory=CommCounter)

    def peer(self, group_rank: int) -> int:
        """Global rank of a member of the group (p2p ops take global ranks)."""
        if self.group is None:
            return group_rank
        return dist.get_global_rank(self.group, group_rank)

    def attention(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q/k/v (B,H,T+L_local,D) with RoPE applied -> (B,H,T+L_local,D)."""
        if self.world == 1:
            return F.scaled_dot_product_attention(q, k, v)
        if self.strategy == "ulysses":
            return ulysses_attention(q, k, v, self)
        return ring_attention(q, k, v, self)


def _all_to_all(out: Tensor, inp: Tensor, out_splits: list[int], in_splits: list[int], sp: SeqParallel) -> None:
    dist.all_to_all_single(out, inp, output_split_sizes=out_splits, input_split_sizes=in_splits, group=sp.group)
    sent = sum(s for i, s in enumerate(in_splits) if i != sp.rank)
    sp.counter.add("all_to_all", sent * inp.element_size())


def ulysses_attention(q: Tensor, k: Tensor, v: Tensor, sp: SeqParallel) -> Tensor:
    """Ulysses: all-to-all image q/k/v to head shards, local full attention, all-to-all back."""
    world, rank, n_txt = sp.world, sp.rank, sp.n_txt
    b, h, _, d = q.shape
    if h % world:
        raise ValueError(f"ulysses needs heads ({h}) divisible by the group size ({world}); use ring")
    hp = h // world
    local = sp.img_sizes[rank]
    # (3, B, H, L, D) -> (P, 3, B, H/P, L, D): chunk j holds head block j of my tokens, for rank j.
    qkv_img = torch.stack([q[:, :, n_txt:], k[:, :, n_txt:], v[:, :, n_txt:]])
    send = qkv_img.reshape(3, b, world, hp, local, d).permute(2, 0, 1, 3, 4, 5).contiguous()
    chunk = 3 * b * hp * d
    recv = torch.empty(chunk * sum(sp.img_sizes), dtype=q.dtype, device=q.device)
    _all_to_all(recv, send.reshape(-1), [chunk * n for n in sp.img_sizes], [chunk * local] * world, sp)
    parts = [p.reshape(3, b, hp, n, d) for p, n in zip(recv.split([chunk * n for n in sp.img_sizes]),
                                                         sp.img_sizes, strict=True)]
    full = torch.cat(parts, dim=3)  # (3, B, H/P, L_total, D) in global token order
    heads = slice(rank * hp, (rank + 1) * hp)
    qh = torch.cat([q[:, heads, :n_txt], full[0]], dim=2)
    kh = torch.cat([k[:, heads, :n_txt], full[1]], dim=2)
    vh = torch.cat([v[:, heads, :n_txt], full[2]], dim=2)
    out = F.scaled_dot_product_attention(qh, kh, vh)  # (B, H/P, T + L_total, D)

    # Image part back to token shards: send tokens of rank j (my heads) to rank j.
    out_img = out[:, :, n_txt:]
    send_back = torch.cat([p.reshape(-1) for p in out_img.split(sp.img_sizes, dim=2)])
    unit = b * hp * d
    back = torch.empty(unit * local * world, dtype=q.dtype, device=q.device)
    _all_to_all(back, send_back, [unit * local] * world, [unit * n for n in sp.img_sizes], sp)
    img_out = back.reshape(world, b, hp, local, d).permute(1, 0, 2, 3, 4).reshape(b, h, local, d)
    if n_txt == 0:
        return img_out
    # Text part: every rank has it for its head block; gather the head blocks.
    txt_part = out[:, :, :n_txt].contiguous()
    gathered = [torch.empty_like(txt_part) for _ in range(world)]
    dist.all_gather(gathered, txt_part, group=sp.group)
    sp.counter.add("all_gather", txt_part.numel() * txt_part.element_size() * (world - 1))
    txt_out = torch.cat(gathered, dim=1)
    return torch.cat([txt_out, img_out], dim=2)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, sp: SeqParallel) -> Tensor:
    """Ring: image k/v blocks circulate; partial results merge with the log-sum-exp rule."""
    world, rank, n_txt = sp.world, sp.rank, sp.n_txt
    b, h, _, d = q.shape
    kv = torch.stack([k[:, :, n_txt:], v[:, :, n_txt:]]).contiguous()
    nxt, prv = sp.peer((rank + 1) % world), sp.peer((rank - 1) % world)

    def start(block: Tensor, step: int) -> tuple[list[Any], Tensor]:
        src = (rank - step) % world  # whose block arrives in this step
        incoming = torch.empty((2, b, h, sp.img_sizes[src], d), dtype=block.dtype, device=block.device)
        # batched so NCCL pairs the send and the receive (plain isend/irecv pairs can deadlock there)
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, block, nxt, group=sp.group),
                                       dist.P2POp(dist.irecv, incoming, prv, group=sp.group)])
        sp.counter.add("ring_p2p", block.numel() * block.element_size())
        return reqs, incoming

    pending = start(kv, 1)
    out, lse = attention_with_lse(q, k, v)  # text keys + my own block, while the next block travels
    for step in range(1, world):
        reqs, incoming = pending
        for r in reqs:
            r.wait()
        if step + 1 < world:
            pending = start(incoming, step + 1)
        blk_out, blk_lse = attention_with_lse(q, incoming[0], incoming[1])
        out, lse = merge_attention(out, lse, blk_out, blk_lse)
    return out
