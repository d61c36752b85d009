"""Multi-device sampling against a real ComfyUI (COMFYUI_PATH): its Flux module, its sampler, its VAE/CLIP classes.

Run with ComfyUI's interpreter, e.g.
``COMFYUI_PATH=/work/comfyui /work/comfyui-venv/bin/python -m pytest tests/test_parallel_comfy.py``.
Tiny widths throughout (ComfyUI's own classes, built with small configs and random weights).
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import pytest

COMFY = os.environ.get("COMFYUI_PATH", "")
if not COMFY or not (Path(COMFY) / "comfy" / "ldm" / "flux" / "model.py").is_file():
    pytest.skip("COMFYUI_PATH not set: point it to a ComfyUI checkout (and run with its venv) to test the "
                "ComfyUI Flux parity, to_diffusers_flux and the Parallel KSampler node", allow_module_level=True)
torch = pytest.importorskip("torch", reason="torch is not installed")
pytest.importorskip("diffusers", reason="diffusers is not installed in this interpreter (pip install diffusers)")
sys.path.insert(0, COMFY)

import comfy.cli_args  # noqa: E402

comfy.cli_args.args.cpu = True  # before model_management picks a device (no GPU in CI)

import comfy.ldm.flux.model  # noqa: E402
import comfy.model_base  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.ops  # noqa: E402
import comfy.supported_models  # noqa: E402

from comfy_autocloud.comfy import diffusers_bridge as bridge  # noqa: E402
from comfy_autocloud.comfy import nodes_parallel  # noqa: E402
from comfy_autocloud.parallel.flux_sp import FluxDiT, flux_forward, tiny_flux_config  # noqa: E402
from comfy_autocloud.parallel.workers import ParallelConfig, get_worker_group, shutdown_all_groups  # noqa: E402

CFG = tiny_flux_config(hidden=64, heads=4, depth=2, single=2, in_channels=16, out_channels=16)


def _init(module: torch.nn.Module, seed: int, std: float = 0.1) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, std)


def comfy_flux(seed: int = 0) -> torch.nn.Module:
    m = comfy.ldm.flux.model.Flux(operations=comfy.ops.disable_weight_init, dtype=torch.float32, device="cpu",
                                  **asdict(CFG))
    _init(m, seed)
    return m.eval()


def flux_inputs(batch: int = 1, h: int = 12, w: int = 10, txt: int = 6, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 16, h, w, generator=g), timestep=torch.rand(batch, generator=g),
                context=torch.randn(batch, txt, CFG.context_in_dim, generator=g),
                y=torch.randn(batch, CFG.vec_in_dim, generator=g), guidance=torch.full((batch,), 3.5))


@pytest.fixture(scope="module", autouse=True)
def _stop_groups():
    yield
    shutdown_all_groups()


def test_mirror_matches_comfy_flux() -> None:
    """flux_forward on ComfyUI's own module, and on FluxDiT loaded from its state dict, equals Flux.forward."""
    cm = comfy_flux()
    inputs = flux_inputs()
    with torch.inference_mode():
        ref = cm(inputs["x"], inputs["timestep"], inputs["context"], y=inputs["y"], guidance=inputs["guidance"])
        mirror = FluxDiT(CFG)
        mirror.load_state_dict(cm.state_dict(), strict=True)
        torch.testing.assert_close(flux_forward(cm, **inputs), ref, atol=1e-5, rtol=0)
        torch.testing.assert_close(mirror(**inputs), ref, atol=1e-5, rtol=0)


def test_diffusers_transformer_zero_copy_same_output() -> None:
    from diffusers import FluxTransformer2DModel

    cm = comfy_flux(seed=3)
    tr = bridge.flux_transformer_to_diffusers(cm)
    assert isinstance(tr, FluxTransformer2DModel)
    sd, dsd = cm.state_dict(), tr.state_dict()
    # fused qkv -> to_q/to_k/to_v are row views of the same storage
    qkv = sd["double_blocks.0.img_attn.qkv.weight"]
    d = CFG.hidden_size
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        assert dsd[f"transformer_blocks.0.attn.{name}.weight"].data_ptr() == qkv.data_ptr() + i * d * d * 4
    assert dsd["single_transformer_blocks.1.proj_mlp.weight"].untyped_storage().data_ptr() == \
        sd["single_blocks.1.linear1.weight"].untyped_storage().data_ptr()
    assert dsd["x_embedder.weight"].data_ptr() == sd["img_in.weight"].data_ptr()
    copied = {k for k, v in dsd.items() if not any(v.untyped_storage().data_ptr() == s.untyped_storage().data_ptr()
                                                   for s in sd.values())}
    assert copied == {"norm_out.linear.weight", "norm_out.linear.bias"}  # shift|scale order differs: the one copy
    inputs = flux_inputs(h=8, w=12)
    b, _, h, w = inputs["x"].shape
    img = inputs["x"].reshape(b, 16, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, 64)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    with torch.inference_mode():
        ref = cm(inputs["x"], inputs["timestep"], inputs["context"], y=inputs["y"], guidance=inputs["guidance"])
        out = tr(hidden_states=img, encoder_hidden_states=inputs["context"], pooled_projections=inputs["y"],
                 timestep=inputs["timestep"], img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(6, 3),
                 guidance=inputs["guidance"], return_dict=False)[0]
    out = out.reshape(b, h // 2, w // 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 16, h, w)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def _tiny_vae() -> SimpleNamespace:
    from comfy.ldm.models.autoencoder import AutoencoderKL

    dd = dict(double_z=True, z_channels=16, resolution=64, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
              num_res_blocks=1, attn_resolutions=[], dropout=0.0)
    fsm = AutoencoderKL(ddconfig=dd, embed_dim=16)
    _init(fsm, 4, std=0.05)
    return SimpleNamespace(first_stage_model=fsm.eval())


def _tiny_clip() -> SimpleNamespace:
    import comfy.sd1_clip
    import comfy.text_encoders.t5

    clip_cfg = {"hidden_act": "quick_gelu", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 1000, "eos_token_id": 2,
                "bos_token_id": 0, "pad_token_id": 1, "projection_dim": 32, "layer_norm_eps": 1e-5}
    t5_cfg = {"d_ff": 64, "d_kv": 8, "d_model": 32, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
              "model_type": "t5", "num_heads": 4, "num_layers": 2, "vocab_size": 500}
    clip_l = comfy.sd1_clip.SDClipModel(textmodel_json_config=clip_cfg, device="cpu", dtype=torch.float32,
                                        special_tokens={"start": 0, "end": 2, "pad": 1})
    t5 = comfy.sd1_clip.SDClipModel(textmodel_json_config=t5_cfg, device="cpu", dtype=torch.float32,
                                    model_class=comfy.text_encoders.t5.T5, special_tokens={"end": 1, "pad": 0},
                                    enable_attention_masks=False)
    _init(clip_l.transformer, 5, std=0.05)
    _init(t5.transformer, 6, std=0.05)
    return SimpleNamespace(cond_stage_model=SimpleNamespace(clip_l=clip_l, t5xxl=t5), tokenizer=None)


def test_to_diffusers_flux_shares_vae_and_text_encoders() -> None:
    from diffusers import FluxPipeline

    cm, vae, clip = comfy_flux(seed=7), _tiny_vae(), _tiny_clip()
    pipe = bridge.to_diffusers_flux(cm, clip, vae)
    assert isinstance(pipe, FluxPipeline)
    assert bridge.shared_fraction(vae.first_stage_model, pipe.vae) == 1.0
    assert bridge.shared_fraction(clip.cond_stage_model.clip_l.transformer, pipe.text_encoder) == 1.0
    assert bridge.shared_fraction(clip.cond_stage_model.t5xxl.transformer, pipe.text_encoder_2) == 1.0
    assert bridge.shared_fraction(cm, pipe.transformer) > 0.95
    with torch.inference_mode():
        z = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(2))
        torch.testing.assert_close(pipe.vae.decode(z).sample, vae.first_stage_model.decode(z), atol=1e-5, rtol=0)
        ids = torch.tensor([[0, 5, 17, 99, 2] + [1] * 72])  # ComfyUI CLIP always runs 77 positions
        comfy_clip = clip.cond_stage_model.clip_l.transformer(ids, final_layer_norm_intermediate=True)
        torch.testing.assert_close(pipe.text_encoder(ids).last_hidden_state, comfy_clip[0], atol=1e-5, rtol=0)
        t5_ids = torch.tensor([[3, 7, 11, 1]])
        comfy_t5 = clip.cond_stage_model.t5xxl.transformer(t5_ids, None)
        torch.testing.assert_close(pipe.text_encoder_2(t5_ids).last_hidden_state, comfy_t5[0], atol=1e-5, rtol=0)
        # The assembled pipeline runs end to end from ComfyUI-style embeddings (no tokenizer, no download).
        image = pipe(prompt_embeds=torch.randn(1, 6, CFG.context_in_dim), pooled_prompt_embeds=torch.randn(1, 32),
                     height=32, width=32, num_inference_steps=2, guidance_scale=3.5, output_type="pt").images
    assert image.shape == (1, 3, 32, 32) and torch.isfinite(image).all()


# ------------------------------------------------------------------------------------------- the nodes

def comfy_model_patcher(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    mc = comfy.supported_models.Flux({"image_model": "flux", **asdict(CFG)})
    mc.set_inference_dtype(torch.float32, None)
    base = comfy.model_base.Flux(mc, device=torch.device("cpu"))
    _init(base.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(base, load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def cond(seed: int, guidance: float = 3.5) -> list:
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 6, CFG.context_in_dim, generator=g),
             {"pooled_output": torch.randn(1, CFG.vec_in_dim, generator=g), "guidance": guidance}]]


@pytest.mark.parametrize(("strategy", "cfg_scale", "expect"), [
    ("ulysses", 1.0, "ulysses x2"),
    ("ring", 1.0, "ring x2"),
    ("cfg", 4.0, "cfg x2"),   # cfg > 1: ComfyUI batches cond+uncond, one half per rank
    ("auto", 4.0, "cfg x2"),
])
def test_parallel_ksampler_equals_stock_ksampler(strategy, cfg_scale, expect) -> None:
    import nodes

    model = comfy_model_patcher()
    latent = {"samples": torch.zeros(1, 16, 12, 10)}
    args = (7, 3, cfg_scale, "euler", "simple", cond(1), cond(2))
    (ref,) = nodes.common_ksampler(model, *args, latent, denoise=1.0)
    (parallel,) = nodes_parallel.AutoCloudParallelDispatcher().build("cpu", strategy, 2)
    out = nodes_parallel.AutoCloudParallelKSampler().sample(model, *args, latent, 1.0, parallel=parallel,
                                                            unique_id="9")
    text = out["ui"]["text"][0]
    assert text.startswith("parallel: 3 model calls on 2 ranks") and expect in text, text
    torch.testing.assert_close(out["result"][0]["samples"], ref["samples"], atol=1e-4, rtol=0)
    # the loaded model itself is untouched (the wrapper lives on a clone)
    assert not model.wrappers


def test_parallel_ksampler_stock_path_says_why() -> None:
    model = comfy_model_patcher()
    latent = {"samples": torch.zeros(1, 16, 8, 8)}
    one = ParallelConfig.parse("cpu", 1)
    out = nodes_parallel.AutoCloudParallelKSampler().sample(model, 1, 1, 1.0, "euler", "simple", cond(1), cond(2),
                                                            latent, 1.0, parallel=one)
    assert out["ui"]["text"][0] == "stock KSampler: one device (cpu): stock sampling"
    model.set_model_patch_replace(lambda args, extra: extra["original_block"](args), "dit", "double_block", 0)
    two = ParallelConfig.parse("cpu", 2)
    out = nodes_parallel.AutoCloudParallelKSampler().sample(model, 1, 1, 1.0, "euler", "simple", cond(1), cond(2),
                                                            latent, 1.0, parallel=two)
    assert "block replacement patches" in out["ui"]["text"][0]


def test_group_persists_across_prompts() -> None:
    g = get_worker_group(("cpu", "cpu"))
    g.ensure_started()
    gen, pids = g.generation, g.pids
    model = comfy_model_patcher(seed=11)
    (parallel,) = nodes_parallel.AutoCloudParallelDispatcher().build("cpu", "auto", 2)
    for seed in (1, 2):
        nodes_parallel.AutoCloudParallelKSampler().sample(model, seed, 2, 1.0, "euler", "simple", cond(1), cond(2),
                                                          {"samples": torch.zeros(1, 16, 8, 8)}, 1.0,
                                                          parallel=parallel)
    assert g.generation == gen and g.pids == pids
    assert [i["init_count"] for i in g.info()] == [1, 1]


def test_node_mappings() -> None:
    from comfy_autocloud.parallel.cfg import STRATEGIES

    assert nodes_parallel.STRATEGIES == STRATEGIES
    assert set(nodes_parallel.NODE_CLASS_MAPPINGS) == set(nodes_parallel.NODE_DISPLAY_NAME_MAPPINGS)
    req = nodes_parallel.AutoCloudParallelKSampler.INPUT_TYPES()
    import nodes

    stock = nodes.KSampler.INPUT_TYPES()["required"]
    assert list(req["required"]) == list(stock)
    assert req["required"]["sampler_name"][0] == stock["sampler_name"][0]
    assert set(req["optional"]) == {"parallel", "vae", "clip"}
    for cls in nodes_parallel.NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "AutoCloud/parallel"
