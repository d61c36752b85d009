"""Step cache on real ComfyUI model classes, in process: a tiny ``comfy.ldm.flux.model.Flux`` in a
``ModelPatcher``, sampled with ``comfy.sample.sample`` (KSampler's path), with and without the cache.

Needs ``COMFYUI_PATH`` and an interpreter that can import ComfyUI (its venv, with this project installed).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch")

COMFY = os.environ.get("COMFYUI_PATH")
if not COMFY or not (Path(COMFY) / "comfy").is_dir():
    pytest.skip("COMFYUI_PATH not set: step-cache tests on real ComfyUI models need a ComfyUI checkout",
                allow_module_level=True)


def _import_comfy() -> Any:
    sys.path.insert(0, COMFY)
    try:
        import comfy.cli_args

        comfy.cli_args.args.cpu = True  # before model_management picks a device
        import comfy.model_patcher
        import comfy.sample
        import comfy.supported_models
    except Exception as e:  # ComfyUI's own dependencies are missing in this interpreter
        pytest.skip(f"ComfyUI at {COMFY} does not import here ({e}); run with its venv", allow_module_level=True)
    return comfy


comfy = _import_comfy()

import comfy_autocloud.stepcache as sc  # noqa: E402
from comfy_autocloud.comfy import nodes_stepcache as nodes  # noqa: E402
from comfy_autocloud.stepcache.comfy_wrappers import KEY, FluxBlockPatch  # noqa: E402


@pytest.fixture(scope="module")
def flux() -> Any:
    """A ModelPatcher around ComfyUI's Flux with tiny widths (2 double + 3 single blocks), random weights."""
    torch.set_num_threads(1)
    uc = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=32, context_in_dim=32, hidden_size=64,
              mlp_ratio=2.0, num_heads=2, depth=2, depth_single_blocks=3, axes_dim=[8, 12, 12], theta=10000,
              patch_size=2, qkv_bias=True, guidance_embed=False)
    cfg = comfy.supported_models.Flux(uc)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


@pytest.fixture(scope="module")
def conds() -> tuple[list, list, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    pos = [[torch.randn(1, 4, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    neg = [[torch.randn(1, 4, 32, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
    return pos, neg, torch.randn(2, 16, 8, 8, generator=g)


class Counter:
    """Counts real block computations (attention runs only when a block computes)."""

    def __init__(self, mp: Any) -> None:
        dm = mp.model.diffusion_model
        self.n = {"double1": 0, "single0": 0}
        self.handles = [dm.double_blocks[1].img_mlp.register_forward_hook(self._hit("double1")),
                        dm.single_blocks[0].linear1.register_forward_hook(self._hit("single0"))]

    def _hit(self, k: str) -> Any:
        def f(*a: Any) -> None:
            self.n[k] += 1
        return f

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def run(mp: Any, conds: tuple, sampler: str = "euler", steps: int = 10, denoise: float = 1.0,
        latent: torch.Tensor | None = None) -> torch.Tensor:
    pos, neg, noise = conds
    lat = torch.zeros_like(noise) if latent is None else latent
    return comfy.sample.sample(mp, noise, steps, 3.0, sampler, "simple", pos, neg, lat, denoise=denoise,
                               disable_pbar=True, seed=0)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_euler_cfg_on_a_clone(flux: Any, conds: tuple) -> None:
    ref = run(flux, conds)
    cached = sc.enable_cache(flux, strategy="fixed", skip_interval=2, warmup_steps=2)
    assert cached is not flux and KEY not in flux.model_options.get("transformer_options", {})
    assert not flux.get_all_wrappers("apply_model")  # the loaded model is never changed
    c = Counter(flux)
    out = run(cached, conds)
    c.close()
    st = sc.state_of(cached)
    # 10 steps, warmup 2, reuse 1 in 2, the last step (smallest sigma) always computes
    assert st.last_run_decisions == [ch == "R" for ch in "CCCRCRCRCC"]
    assert c.n == {"double1": 7, "single0": 7}  # CFG as one batch: one call per step
    assert 0 < rel(out, ref) < 0.05
    assert st.cached_bytes() == 0  # the OUTER_SAMPLE wrapper drops tensors after the run
    assert torch.equal(run(flux, conds), ref)


def test_heun_and_adaptive(flux: Any, conds: tuple) -> None:
    ref = run(flux, conds, "heun")
    cached = sc.enable_cache(flux, strategy="adaptive", skip_interval=3, warmup_steps=2, threshold=1.0)
    out = run(cached, conds, "heun")
    s = sc.summary(cached)
    assert s["steps"] == 10 and s["calls"] == 19  # heun: two calls per step but the last
    assert s["reused_steps"] >= 2
    assert rel(out, ref) < 0.05
    exact = sc.enable_cache(flux, strategy="adaptive", threshold=0.0)
    assert torch.allclose(run(exact, conds, "heun"), ref, atol=1e-5)


def test_img2img_and_reruns_reset(flux: Any, conds: tuple) -> None:
    latent = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(5))
    ref = run(flux, conds, denoise=0.5, latent=latent)
    cached = sc.enable_cache(flux, strategy="fixed", skip_interval=2, warmup_steps=1)
    first = run(cached, conds, denoise=0.5, latent=latent)
    assert torch.equal(run(cached, conds, denoise=0.5, latent=latent), first)
    s = sc.summary(cached)
    assert s["runs"] == 2 and s["steps"] == 20 and s["reused_steps"] == 8
    assert rel(first, ref) < 0.05


def test_output_level_and_disable(flux: Any, conds: tuple) -> None:
    ref = run(flux, conds)
    cached = sc.enable_cache(flux, strategy="fixed", skip_interval=2, warmup_steps=2, level="output")
    assert not any(isinstance(v, FluxBlockPatch) for v in
                   cached.model_options["transformer_options"].get("patches_replace", {}).get("dit", {}).values())
    c = Counter(flux)
    out = run(cached, conds)
    c.close()
    assert c.n["double1"] == 7 and rel(out, ref) < 0.1
    plain = sc.disable_cache(cached)
    assert sc.state_of(plain) is None and not plain.get_all_wrappers("apply_model")
    assert not plain.model_options["transformer_options"].get("patches_replace", {}).get("dit")
    assert torch.equal(run(plain, conds), ref)


def test_existing_block_patch_keeps_running(flux: Any, conds: tuple) -> None:
    calls = {"n": 0}

    def user_patch(args: dict, extra: dict) -> dict:
        calls["n"] += 1
        return extra["original_block"](args)

    patched = flux.clone()
    patched.set_model_patch_replace(user_patch, "dit", "double_block", 1)
    ref = run(patched, conds)
    assert calls["n"] == 10
    cached = sc.enable_cache(patched, strategy="fixed", skip_interval=2, warmup_steps=2)
    out = run(cached, conds)
    assert calls["n"] == 17 and rel(out, ref) < 0.05
    back = sc.disable_cache(cached)
    assert back.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 1)] is user_patch


def test_nodes(flux: Any, conds: tuple) -> None:
    assert set(nodes.NODE_DISPLAY_NAME_MAPPINGS) == set(nodes.NODE_CLASS_MAPPINGS)
    for cls in nodes.NODE_CLASS_MAPPINGS.values():
        assert cls.CATEGORY == "AutoCloud/stepcache" and cls.INPUT_TYPES()["required"]["model"] == ("MODEL",)
    (fast,) = nodes.CacheDitAccelerate().apply(flux)
    (adv,) = nodes.CacheDitAdvancedConfig().apply(flux, "dynamic", 3, 2, 0.0, False)
    assert sc.summary(adv)["strategy"] == "dynamic" and sc.summary(fast)["strategy"] == "adaptive"
    run(adv, conds)
    res = nodes.CacheDitDetailedStats().report(adv)
    assert "step cache [dynamic] steps 10" in res["ui"]["text"][0] and res["result"][0] == res["ui"]["text"][0]
    (off,) = nodes.CacheDitCacheControl().apply(adv, False)
    assert sc.state_of(off) is None
    (on,) = nodes.CacheDitCacheControl().apply(off, True)
    assert sc.state_of(on) is not None
    assert "not enabled" in nodes.CacheDitDetailedStats().report(off)["result"][0]


def test_weight_patches_apply_under_the_cache(flux: Any, conds: tuple) -> None:
    """A LoRA-style weight patch added after (or before) the cache takes effect in cached sampling."""
    key = "diffusion_model.double_blocks.0.img_mlp.0.weight"
    w = flux.model.state_dict()[key]
    diff = torch.randn(w.shape, generator=torch.Generator().manual_seed(9)) * 0.05
    lora = flux.clone()
    lora.add_patches({key: (diff,)}, 1.0)
    ref = run(lora, conds)
    assert rel(ref, run(flux, conds)) > 1e-3  # the patch matters
    after = sc.enable_cache(flux, strategy="fixed", skip_interval=2, warmup_steps=2).clone()
    after.add_patches({key: (diff,)}, 1.0)
    before = sc.enable_cache(lora, strategy="fixed", skip_interval=2, warmup_steps=2)
    a, b = run(after, conds), run(before, conds)
    assert torch.allclose(a, b, atol=1e-5) and rel(a, ref) < 0.05
    assert torch.equal(run(flux, conds), run(flux, conds))  # base weights restored after patched runs
