"""Flux DiT forward, single-process or sequence parallel, for ComfyUI's Flux weights.

``FluxDiT`` mirrors ``comfy.ldm.flux.model.Flux`` (v0.3.x): same parameter names and shapes, so a
ComfyUI state dict loads into it with ``assign=True`` (zero-copy) and workers never import ComfyUI.
``flux_forward`` runs the same maths as ComfyUI's ``Flux._forward`` and, given a ``SeqParallel``,
keeps the text tokens whole on every rank, gives each rank a contiguous shard of the image tokens
(the RoPE table is sliced with the tokens, so positions stay global), and gathers the shards at the
end. It works on either module: ComfyUI's ``Flux`` or ``FluxDiT``.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import CommCounter, SeqParallel, balanced_split

__all__ = ["FluxConfig", "FluxDiT", "flux_forward", "gather_tokens", "tiny_flux_config"]


@dataclass
class FluxConfig:
    """The fields of ComfyUI's ``FluxParams`` (``model.diffusion_model.params``)."""

    in_channels: int = 16
    out_channels: int = 16
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: list[int] = field(default_factory=lambda: [16, 56, 56])
    theta: int = 10000
    patch_size: int = 2
    qkv_bias: bool = True
    guidance_embed: bool = True

    @classmethod
    def from_any(cls, params: Any) -> FluxConfig:
        """From a ComfyUI ``FluxParams`` dataclass, a dict, or a ``FluxConfig``."""
        data = params if isinstance(params, dict) else asdict(params)
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: (list(v) if k == "axes_dim" else v) for k, v in data.items() if k in known})


def tiny_flux_config(hidden: int = 64, heads: int = 4, depth: int = 1, single: int = 1, **kw: Any) -> FluxConfig:
    """A Flux-architecture config small enough for CPU tests (head dim split over 3 RoPE axes)."""
    head_dim = hidden // heads
    a = (head_dim // 3) // 2 * 2
    axes = [head_dim - 2 * a, a, a]
    base = dict(in_channels=4, out_channels=4, vec_in_dim=32, context_in_dim=48, hidden_size=hidden,
                num_heads=heads, depth=depth, depth_single_blocks=single, axes_dim=axes, guidance_embed=True)
    base.update(kw)
    return FluxConfig(**base)


class _Linear(nn.Linear):
    """nn.Linear that computes in the input dtype whatever the stored dtype (ComfyUI's manual cast)."""

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight if self.weight.dtype == x.dtype else self.weight.to(x.dtype)
        b = self.bias
        if b is not None and b.dtype != x.dtype:
            b = b.to(x.dtype)
        return F.linear(x, w, b)


class _MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden: int) -> None:
        super().__init__()
        self.in_layer = _Linear(in_dim, hidden)
        self.silu = nn.SiLU()
        self.out_layer = _Linear(hidden, hidden)


class _RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))


class _QKNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.query_norm = _RMSNorm(dim)
        self.key_norm = _RMSNorm(dim)


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, qkv_bias: bool) -> None:
        super().__init__()
        self.num_heads = heads
        self.qkv = _Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = _QKNorm(dim // heads)
        self.proj = _Linear(dim, dim)


class _Modulation(nn.Module):
    def __init__(self, dim: int, double: bool) -> None:
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = _Linear(dim, self.multiplier * dim)


class _DoubleBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float, qkv_bias: bool) -> None:
        super().__init__()
        mlp = int(hidden * mlp_ratio)
        self.num_heads = heads
        self.hidden_size = hidden
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", _Modulation(hidden, True))
            setattr(self, f"{s}_attn", _SelfAttention(hidden, heads, qkv_bias))
            setattr(self, f"{s}_mlp", nn.Sequential(_Linear(hidden, mlp), nn.GELU(approximate="tanh"),
                                                     _Linear(mlp, hidden)))


class _SingleBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.hidden_size = hidden
        self.num_heads = heads
        self.mlp_hidden_dim = int(hidden * mlp_ratio)
        self.linear1 = _Linear(hidden, hidden * 3 + self.mlp_hidden_dim)
        self.linear2 = _Linear(hidden + self.mlp_hidden_dim, hidden)
        self.norm = _QKNorm(hidden // heads)
        self.modulation = _Modulation(hidden, False)


class _LastLayer(nn.Module):
    def __init__(self, hidden: int, out: int) -> None:
        super().__init__()
        self.linear = _Linear(hidden, out)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), _Linear(hidden, 2 * hidden))


class FluxDiT(nn.Module):
    """Parameter-compatible mirror of ComfyUI's Flux (``state_dict`` keys are identical)."""

    def __init__(self, config: FluxConfig) -> None:
        super().__init__()
        c = config
        if c.hidden_size % c.num_heads or sum(c.axes_dim) != c.hidden_size // c.num_heads:
            raise ValueError(f"bad Flux config: hidden {c.hidden_size}, heads {c.num_heads}, axes {c.axes_dim}")
        self.params = c
        self.patch_size = c.patch_size
        p2 = c.patch_size * c.patch_size
        self.img_in = _Linear(c.in_channels * p2, c.hidden_size)
        self.time_in = _MLPEmbedder(256, c.hidden_size)
        self.vector_in = _MLPEmbedder(c.vec_in_dim, c.hidden_size)
        self.guidance_in = _MLPEmbedder(256, c.hidden_size) if c.guidance_embed else nn.Identity()
        self.txt_in = _Linear(c.context_in_dim, c.hidden_size)
        self.double_blocks = nn.ModuleList(
            [_DoubleBlock(c.hidden_size, c.num_heads, c.mlp_ratio, c.qkv_bias) for _ in range(c.depth)])
        self.single_blocks = nn.ModuleList(
            [_SingleBlock(c.hidden_size, c.num_heads, c.mlp_ratio) for _ in range(c.depth_single_blocks)])
        self.final_layer = _LastLayer(c.hidden_size, c.out_channels * p2)

    def forward(self, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None = None,
                guidance: Tensor | None = None) -> Tensor:
        return flux_forward(self, x, timestep, context, y, guidance)


# ---- the maths of comfy/ldm/flux/{math,layers,model}.py, written against the shared parameter names ----

def _lin(mod: nn.Module, x: Tensor) -> Tensor:
    w = mod.weight
    b = mod.bias
    if w.dtype != x.dtype or w.device != x.device:
        w = w.to(device=x.device, dtype=x.dtype)
        b = b.to(device=x.device, dtype=x.dtype) if b is not None else None
    return F.linear(x, w, b)


def _mlp_embed(mod: nn.Module, x: Tensor) -> Tensor:
    return _lin(mod.out_layer, F.silu(_lin(mod.in_layer, x)))


def _rms(x: Tensor, scale: Tensor) -> Tensor:
    return F.rms_norm(x, scale.shape, weight=scale.to(device=x.device, dtype=x.dtype), eps=1e-6)


def _ln(x: Tensor) -> Tensor:
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def _modulation(mod: nn.Module, vec: Tensor) -> list[Tensor]:
    return list(_lin(mod.lin, F.silu(vec[:, None, :])).chunk(mod.lin.weight.shape[0] // vec.shape[-1], dim=-1))


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding, cos first (as ComfyUI / BFL)."""
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.to(t) if torch.is_floating_point(t) else emb


def _rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    scale = torch.linspace(0, (dim - 2) / dim, steps=dim // 2, dtype=torch.float64, device=pos.device)
    omega = 1.0 / (theta**scale)
    out = torch.einsum("...n,d->...nd", pos.to(dtype=torch.float32), omega)
    out = torch.stack([torch.cos(out), -torch.sin(out), torch.sin(out), torch.cos(out)], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).to(torch.float32)


def rope_table(ids: Tensor, axes_dim: list[int], theta: int) -> Tensor:
    """ComfyUI's ``EmbedND``: (B, L, n_axes) positions -> (B, 1, L, D/2, 2, 2)."""
    return torch.cat([_rope(ids[..., i], axes_dim[i], theta) for i in range(ids.shape[-1])], dim=-3).unsqueeze(1)


def _apply_rope(x: Tensor, pe: Tensor) -> Tensor:
    shape = x.shape
    x_ = x.to(pe.dtype).reshape(*shape[:-1], -1, 1, 2)
    return (pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).reshape(*shape).type_as(x)


def _attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, sp: SeqParallel | None) -> Tensor:
    q, k = _apply_rope(q, pe), _apply_rope(k, pe)
    out = F.scaled_dot_product_attention(q, k, v) if sp is None else sp.attention(q, k, v)
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def _qkv(qkv: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


def _double_block(blk: nn.Module, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor,
                  sp: SeqParallel | None) -> tuple[Tensor, Tensor]:
    heads = blk.num_heads
    im = _modulation(blk.img_mod, vec)
    tm = _modulation(blk.txt_mod, vec)
    img_q, img_k, img_v = _qkv(_lin(blk.img_attn.qkv, torch.addcmul(im[0], _ln(img), 1 + im[1])), heads)
    img_q = _rms(img_q, blk.img_attn.norm.query_norm.scale).to(img_v)
    img_k = _rms(img_k, blk.img_attn.norm.key_norm.scale).to(img_v)
    txt_q, txt_k, txt_v = _qkv(_lin(blk.txt_attn.qkv, torch.addcmul(tm[0], _ln(txt), 1 + tm[1])), heads)
    txt_q = _rms(txt_q, blk.txt_attn.norm.query_norm.scale).to(txt_v)
    txt_k = _rms(txt_k, blk.txt_attn.norm.key_norm.scale).to(txt_v)
    attn = _attention(torch.cat((txt_q, img_q), 2), torch.cat((txt_k, img_k), 2), torch.cat((txt_v, img_v), 2),
                      pe, sp)
    txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1]:]
    img = img + _lin(blk.img_attn.proj, img_attn) * im[2]
    img = img + _seq_mlp(blk.img_mlp, torch.addcmul(im[3], _ln(img), 1 + im[4])) * im[5]
    txt = txt + _lin(blk.txt_attn.proj, txt_attn) * tm[2]
    txt = txt + _seq_mlp(blk.txt_mlp, torch.addcmul(tm[3], _ln(txt), 1 + tm[4])) * tm[5]
    return img, _fp16_clamp(txt)


def _fp16_clamp(x: Tensor) -> Tensor:
    """ComfyUI keeps fp16 activations finite between blocks; do the same so fp16 results match."""
    if x.dtype == torch.float16:
        return torch.nan_to_num(x, nan=0.0, posinf=65504, neginf=-65504)
    return x


def _seq_mlp(mlp: nn.Module, x: Tensor) -> Tensor:
    return _lin(mlp[2], F.gelu(_lin(mlp[0], x), approximate="tanh"))


def _single_block(blk: nn.Module, x: Tensor, vec: Tensor, pe: Tensor, sp: SeqParallel | None) -> Tensor:
    shift, scale, gate = _modulation(blk.modulation, vec)
    hidden = blk.hidden_size if hasattr(blk, "hidden_size") else blk.hidden_dim
    qkv, mlp = torch.split(_lin(blk.linear1, torch.addcmul(shift, _ln(x), 1 + scale)),
                           [3 * hidden, blk.mlp_hidden_dim], dim=-1)
    q, k, v = _qkv(qkv, blk.num_heads)
    q = _rms(q, blk.norm.query_norm.scale).to(v)
    k = _rms(k, blk.norm.key_norm.scale).to(v)
    attn = _attention(q, k, v, pe, sp)
    out = _lin(blk.linear2, torch.cat((attn, F.gelu(mlp, approximate="tanh")), 2))
    return _fp16_clamp(x + out * gate)


def _patchify(x: Tensor, p: int) -> tuple[Tensor, Tensor, int, int]:
    bs, c, h, w = x.shape
    pad_h, pad_w = (p - h % p) % p, (p - w % p) % p
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), mode="circular")
    hl, wl = (h + p // 2) // p, (w + p // 2) // p
    img = x.reshape(bs, c, hl, p, wl, p).permute(0, 2, 4, 1, 3, 5).reshape(bs, hl * wl, c * p * p)
    ids = torch.zeros((hl, wl, 3), device=x.device, dtype=x.dtype)
    ids[:, :, 1] = ids[:, :, 1] + torch.linspace(0, hl - 1, steps=hl, device=x.device, dtype=x.dtype).unsqueeze(1)
    ids[:, :, 2] = ids[:, :, 2] + torch.linspace(0, wl - 1, steps=wl, device=x.device, dtype=x.dtype).unsqueeze(0)
    return img, ids.reshape(1, hl * wl, 3).expand(bs, -1, -1), hl, wl


def gather_tokens(local: Tensor, sizes: list[int], group: dist.ProcessGroup | None,
                  counter: CommCounter | None = None) -> Tensor:
    """All-gather token shards of different lengths along dim 1 (padded to the longest, then trimmed)."""
    longest = max(sizes)
    pad = longest - local.shape[1]
    if pad:
        local = torch.cat([local, local.new_zeros(local.shape[0], pad, *local.shape[2:])], dim=1)
    parts = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(parts, local.contiguous(), group=group)
    if counter is not None:
        counter.add("final_all_gather", local.numel() * local.element_size() * (len(sizes) - 1))
    return torch.cat([part[:, :n] for part, n in zip(parts, sizes, strict=True)], dim=1)


def flux_forward(model: nn.Module, x: Tensor, timestep: Tensor, context: Tensor, y: Tensor | None = None,
                 guidance: Tensor | None = None, sp: SeqParallel | None = None, gather: bool = True) -> Tensor:
    """ComfyUI ``Flux._forward`` maths; with ``sp`` this rank computes only its image-token shard.

    Returns the full (B, C, H, W) output on every rank when ``gather`` (else this rank's token shard).
    """
    params = model.params
    p = model.patch_size
    bs, _, h_orig, w_orig = x.shape
    img, img_ids, hl, wl = _patchify(x, p)
    n_img = img.shape[1]
    if sp is not None:
        sp.img_sizes = balanced_split(n_img, sp.world)
        start = sum(sp.img_sizes[: sp.rank])
        img = img[:, start: start + sp.img_sizes[sp.rank]]
        img_ids = img_ids[:, start: start + sp.img_sizes[sp.rank]]
        sp.n_txt = context.shape[1]
    if y is None:
        y = torch.zeros((bs, params.vec_in_dim), device=x.device, dtype=x.dtype)
    img = _lin(model.img_in, img)
    vec = _mlp_embed(model.time_in, timestep_embedding(timestep, 256).to(img.dtype))
    if params.guidance_embed and guidance is not None:
        vec = vec + _mlp_embed(model.guidance_in, timestep_embedding(guidance, 256).to(img.dtype))
    vec = vec + _mlp_embed(model.vector_in, y[:, : params.vec_in_dim])
    txt = _lin(model.txt_in, context)
    txt_ids = torch.zeros((bs, context.shape[1], 3), device=x.device, dtype=x.dtype)
    pe = rope_table(torch.cat((txt_ids, img_ids), dim=1), list(params.axes_dim), params.theta)
    for blk in model.double_blocks:
        img, txt = _double_block(blk, img, txt, vec, pe, sp)
    xs = torch.cat((txt, _fp16_clamp(img)), 1)
    for blk in model.single_blocks:
        xs = _single_block(blk, xs, vec, pe, sp)
    img = xs[:, txt.shape[1]:]
    shift, scale = _lin(model.final_layer.adaLN_modulation[1], F.silu(vec[:, None, :])).chunk(2, dim=-1)
    out = _lin(model.final_layer.linear, torch.addcmul(shift, _ln(img), 1 + scale))
    if sp is not None and sp.world > 1:
        if not gather:
            return out
        out = gather_tokens(out, sp.img_sizes, sp.group, sp.counter)
    c = out.shape[-1] // (p * p)
    out = out.reshape(bs, hl, wl, c, p, p).permute(0, 3, 1, 4, 2, 5).reshape(bs, c, hl * p, wl * p)
    return out[:, :, :h_orig, :w_orig]
