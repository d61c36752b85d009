"""Build a diffusers ``FluxPipeline`` from what ComfyUI already loaded, as zero-copy views.

Why: ComfyUI has the transformer, VAE and text encoders in memory, so a diffusers /
xDiT pipeline must not download or load them again. Each component is created on the meta device
and filled with ``load_state_dict(..., assign=True)`` from views of ComfyUI's tensors: the fused
``qkv`` / ``linear1`` weights become row slices (views) for diffusers' separate ``to_q/to_k/to_v``;
VAE 1x1-conv attention weights become reshaped views. The single exception is
``norm_out.linear`` (BFL stores shift|scale, diffusers scale|shift): 2*D*D values are reordered
into a new tensor, ~0.1% of a FLUX.1 transformer.

Key names were checked against ComfyUI v0.3.64 (``comfy/ldm/flux``, ``comfy/clip_model.py``,
``comfy/text_encoders/t5.py``) and diffusers 0.42 (``FluxTransformer2DModel``, ``AutoencoderKL``,
the single-file converters in ``diffusers/loaders/single_file_utils.py``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import Tensor, nn

from comfy_autocloud.parallel.flux_sp import FluxConfig

__all__ = [
    "clip_l_to_transformers",
    "flux_state_dict_to_diffusers",
    "flux_transformer_to_diffusers",
    "shared_fraction",
    "t5_to_transformers",
    "to_diffusers_flux",
    "vae_to_diffusers",
]

FLUX_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True,
}


def _diffusion_model(model: Any) -> nn.Module:
    """Accept a ComfyUI ModelPatcher, a BaseModel, or the Flux module itself."""
    for attr in ("model", "diffusion_model"):
        while hasattr(model, attr) and not hasattr(model, "double_blocks"):
            model = getattr(model, attr)
    if not hasattr(model, "double_blocks") or not hasattr(model, "params"):
        raise TypeError(f"not a Flux-type diffusion model: {type(model).__name__}")
    return model


def flux_state_dict_to_diffusers(sd: dict[str, Tensor], cfg: FluxConfig) -> dict[str, Tensor]:
    """ComfyUI/BFL Flux keys -> diffusers ``FluxTransformer2DModel`` keys (views, except norm_out)."""
    d = cfg.hidden_size
    mlp = int(d * cfg.mlp_ratio)
    out: dict[str, Tensor] = {}

    def lin(dst: str, src: str) -> None:
        out[f"{dst}.weight"] = sd[f"{src}.weight"]
        if f"{src}.bias" in sd:
            out[f"{dst}.bias"] = sd[f"{src}.bias"]

    def split(dsts: list[str], src: str, sizes: list[int]) -> None:
        for kind in ("weight", "bias"):
            if f"{src}.{kind}" in sd:
                for dst, part in zip(dsts, sd[f"{src}.{kind}"].split(sizes, dim=0), strict=True):
                    out[f"{dst}.{kind}"] = part

    lin("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer")
    lin("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer")
    lin("time_text_embed.text_embedder.linear_1", "vector_in.in_layer")
    lin("time_text_embed.text_embedder.linear_2", "vector_in.out_layer")
    if cfg.guidance_embed:
        lin("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer")
        lin("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")
    lin("context_embedder", "txt_in")
    lin("x_embedder", "img_in")
    for i in range(cfg.depth):
        s, t = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        lin(f"{t}norm1.linear", f"{s}img_mod.lin")
        lin(f"{t}norm1_context.linear", f"{s}txt_mod.lin")
        split([f"{t}attn.to_q", f"{t}attn.to_k", f"{t}attn.to_v"], f"{s}img_attn.qkv", [d, d, d])
        split([f"{t}attn.add_q_proj", f"{t}attn.add_k_proj", f"{t}attn.add_v_proj"], f"{s}txt_attn.qkv", [d, d, d])
        out[f"{t}attn.norm_q.weight"] = sd[f"{s}img_attn.norm.query_norm.scale"]
        out[f"{t}attn.norm_k.weight"] = sd[f"{s}img_attn.norm.key_norm.scale"]
        out[f"{t}attn.norm_added_q.weight"] = sd[f"{s}txt_attn.norm.query_norm.scale"]
        out[f"{t}attn.norm_added_k.weight"] = sd[f"{s}txt_attn.norm.key_norm.scale"]
        lin(f"{t}attn.to_out.0", f"{s}img_attn.proj")
        lin(f"{t}attn.to_add_out", f"{s}txt_attn.proj")
        lin(f"{t}ff.net.0.proj", f"{s}img_mlp.0")
        lin(f"{t}ff.net.2", f"{s}img_mlp.2")
        lin(f"{t}ff_context.net.0.proj", f"{s}txt_mlp.0")
        lin(f"{t}ff_context.net.2", f"{s}txt_mlp.2")
    for i in range(cfg.depth_single_blocks):
        s, t = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        lin(f"{t}norm.linear", f"{s}modulation.lin")
        split([f"{t}attn.to_q", f"{t}attn.to_k", f"{t}attn.to_v", f"{t}proj_mlp"], f"{s}linear1", [d, d, d, mlp])
        out[f"{t}attn.norm_q.weight"] = sd[f"{s}norm.query_norm.scale"]
        out[f"{t}attn.norm_k.weight"] = sd[f"{s}norm.key_norm.scale"]
        lin(f"{t}proj_out", f"{s}linear2")
    lin("proj_out", "final_layer.linear")
    for kind in ("weight", "bias"):
        shift, scale = sd[f"final_layer.adaLN_modulation.1.{kind}"].chunk(2, dim=0)
        out[f"norm_out.linear.{kind}"] = torch.cat([scale, shift], dim=0)  # the one copy (order differs)
    return out


def _assign(module: nn.Module, sd: dict[str, Tensor], what: str) -> nn.Module:
    """Load views with assign=True; fit same-size shape differences (1x1 conv -> linear) as views."""
    own = module.state_dict(keep_vars=True)
    fitted = {}
    for k, t in sd.items():
        want = own.get(k)
        if want is not None and tuple(t.shape) != tuple(want.shape) and t.numel() == want.numel():
            t = t.view(want.shape)
        fitted[k] = t
    missing, unexpected = module.load_state_dict(fitted, strict=False, assign=True)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{what}: ComfyUI weights do not map onto diffusers/transformers names; "
                         f"missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
                         f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}")
    for name, buf in list(module.named_buffers()):
        if buf.is_meta:
            if name.endswith("position_ids"):
                owner = module.get_submodule(name.rsplit(".", 1)[0])
                owner.register_buffer("position_ids", torch.arange(buf.shape[-1]).expand(buf.shape),
                                      persistent=False)
            else:
                raise ValueError(f"{what}: buffer {name} has no value in ComfyUI's weights")
    return module.eval()


def flux_transformer_to_diffusers(model: Any) -> nn.Module:
    """diffusers ``FluxTransformer2DModel`` sharing storage with ComfyUI's loaded Flux weights."""
    from diffusers import FluxTransformer2DModel

    dm = _diffusion_model(model)
    cfg = FluxConfig.from_any(dm.params)
    if cfg.mlp_ratio != 4.0 or not cfg.qkv_bias or cfg.theta != 10000 or cfg.patch_size != 2:
        raise ValueError(f"diffusers' FluxTransformer2DModel fixes mlp_ratio 4, qkv bias, theta 10000, patch 2; "
                         f"this model has {cfg.mlp_ratio}, {cfg.qkv_bias}, {cfg.theta}, {cfg.patch_size}")
    with torch.device("meta"):
        tr = FluxTransformer2DModel(
            patch_size=1, in_channels=cfg.in_channels * 4, out_channels=cfg.out_channels * 4,
            num_layers=cfg.depth, num_single_layers=cfg.depth_single_blocks,
            attention_head_dim=cfg.hidden_size // cfg.num_heads, num_attention_heads=cfg.num_heads,
            joint_attention_dim=cfg.context_in_dim, pooled_projection_dim=cfg.vec_in_dim,
            guidance_embeds=cfg.guidance_embed, axes_dims_rope=tuple(cfg.axes_dim))
    return _assign(tr, flux_state_dict_to_diffusers(dm.state_dict(), cfg), "Flux transformer")


def vae_to_diffusers(vae: Any, scaling_factor: float = 0.3611, shift_factor: float | None = 0.1159) -> nn.Module:
    """diffusers ``AutoencoderKL`` sharing storage with a ComfyUI VAE (LDM-format encoder/decoder)."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    fsm = getattr(vae, "first_stage_model", vae)
    sd = fsm.state_dict()
    levels = sorted({int(m.group(1)) for k in sd if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    blocks = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] for i in levels]
    per_level = len({m.group(1) for k in sd if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    config = {
        "in_channels": sd["encoder.conv_in.weight"].shape[1], "out_channels": sd["decoder.conv_out.weight"].shape[0],
        "down_block_types": ["DownEncoderBlock2D"] * len(levels), "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "block_out_channels": blocks, "layers_per_block": per_level,
        "latent_channels": sd["decoder.conv_in.weight"].shape[1],
        "norm_num_groups": _group_norm_groups(fsm), "scaling_factor": scaling_factor, "shift_factor": shift_factor,
        "use_quant_conv": "quant_conv.weight" in sd, "use_post_quant_conv": "post_quant_conv.weight" in sd,
    }
    with torch.device("meta"):
        ae = AutoencoderKL(**config)
    return _assign(ae, convert_ldm_vae_checkpoint(dict(sd), config), "VAE")


def _group_norm_groups(module: nn.Module) -> int:
    for m in module.modules():
        if isinstance(m, nn.GroupNorm):
            return m.num_groups
    return 32


def clip_l_to_transformers(clip_l: Any) -> nn.Module:
    """transformers ``CLIPTextModel`` over ComfyUI's CLIP-L weights (``clip.cond_stage_model.clip_l``)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    tr = getattr(clip_l, "transformer", clip_l)
    sd = tr.state_dict()
    tok = sd["text_model.embeddings.token_embedding.weight"]
    layers = len({m.group(1) for k in sd if (m := re.match(r"text_model\.encoder\.layers\.(\d+)\.", k))})
    layer0 = tr.text_model.encoder.layers[0]
    config = CLIPTextConfig(
        vocab_size=tok.shape[0], hidden_size=tok.shape[1], num_hidden_layers=layers,
        intermediate_size=sd["text_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_attention_heads=layer0.self_attn.heads, projection_dim=tok.shape[1],
        max_position_embeddings=sd["text_model.embeddings.position_embedding.weight"].shape[0],
        hidden_act=_activation_name(layer0.mlp.activation), eos_token_id=getattr(tr.text_model, "eos_token_id", 2))
    with torch.device("meta"):
        model = CLIPTextModel(config)
    sd = {k: v for k, v in sd.items() if k.startswith("text_model.")}
    if not any(k.startswith("text_model.") for k in model.state_dict()):  # transformers 5 flattened the module
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    return _assign(model, sd, "CLIP-L text encoder")


def _activation_name(fn: Any) -> str:
    try:
        from comfy.clip_model import ACTIVATIONS
    except ImportError:
        return "quick_gelu"
    for name, f in ACTIVATIONS.items():
        if f is fn:
            return name
    return "quick_gelu"


def t5_to_transformers(t5: Any) -> nn.Module:
    """transformers ``T5EncoderModel`` over ComfyUI's T5 weights (``clip.cond_stage_model.t5xxl``)."""
    from transformers import T5Config, T5EncoderModel

    tr = getattr(t5, "transformer", t5)
    sd = tr.state_dict()
    shared = sd["shared.weight"]
    layers = len({m.group(1) for k in sd if (m := re.match(r"encoder\.block\.(\d+)\.", k))})
    attn0 = tr.encoder.block[0].layer[0].SelfAttention
    inner = sd["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in sd
    ff_key = "wi_0" if gated else "wi"
    config = T5Config(
        vocab_size=shared.shape[0], d_model=shared.shape[1], d_kv=inner // attn0.num_heads,
        d_ff=sd[f"encoder.block.0.layer.1.DenseReluDense.{ff_key}.weight"].shape[0], num_layers=layers,
        num_heads=attn0.num_heads, feed_forward_proj="gated-gelu" if gated else "relu", dropout_rate=0.0,
        relative_attention_num_buckets=sd["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
        .shape[0], is_encoder_decoder=False, use_cache=False)
    with torch.device("meta"):
        model = T5EncoderModel(config)
    sd = dict(sd)
    sd["encoder.embed_tokens.weight"] = shared
    return _assign(model, sd, "T5 text encoder")


def to_diffusers_flux(model: Any, clip: Any = None, vae: Any = None) -> Any:
    """A diffusers ``FluxPipeline`` whose modules are views of ComfyUI's loaded MODEL, CLIP and VAE.

    Without ``clip`` the pipeline has no text encoders (pass ``prompt_embeds`` /
    ``pooled_prompt_embeds``, e.g. from ComfyUI conditioning); without ``vae`` use ``output_type="latent"``.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = flux_transformer_to_diffusers(model)
    latent_format = getattr(getattr(model, "model", model), "latent_format", None)
    scale = float(getattr(latent_format, "scale_factor", 0.3611))
    shift = getattr(latent_format, "shift_factor", 0.1159)
    parts: dict[str, Any] = {"text_encoder": None, "tokenizer": None, "text_encoder_2": None, "tokenizer_2": None}
    if clip is not None:
        cond = getattr(clip, "cond_stage_model", clip)
        tok = getattr(clip, "tokenizer", None)
        if hasattr(cond, "clip_l"):
            parts["text_encoder"] = clip_l_to_transformers(cond.clip_l)
            parts["tokenizer"] = getattr(getattr(tok, "clip_l", None), "tokenizer", None)
        if hasattr(cond, "t5xxl"):
            parts["text_encoder_2"] = t5_to_transformers(cond.t5xxl)
            parts["tokenizer_2"] = getattr(getattr(tok, "t5xxl", None), "tokenizer", None)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG),
        vae=vae_to_diffusers(vae, scale, None if shift is None else float(shift)) if vae is not None else None,
        transformer=transformer, **parts)
    return pipe


def shared_fraction(src: nn.Module, dst: nn.Module) -> float:
    """Fraction of ``dst``'s parameter bytes that live inside ``src``'s storages (1.0 = fully zero-copy)."""
    spans = []
    for t in src.state_dict().values():
        s = t.untyped_storage()
        spans.append((s.data_ptr(), s.data_ptr() + s.nbytes()))
    total = inside = 0
    for p in dst.state_dict().values():
        n = p.numel() * p.element_size()
        total += n
        if any(lo <= p.data_ptr() < hi for lo, hi in spans):
            inside += n
    return inside / total if total else 1.0
