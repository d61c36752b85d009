"""Step cache on real ComfyUI model classes, in process: a tiny ``comfy.ldm.flux.model.Flux`` in a
``ModelPatcher``, sampled with ``comfy.sample.sample`` (KSampler's path), with and without the cache.

Needs ``COMFYUI_PATH`` and an interpreter that can import ComfyUI (its venv, with this project installed).
"""

from __future__ import annotations

import json
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
        import comfy.controlnet
        import comfy.model_patcher
        import comfy.sample
        import comfy.supported_models
    except Exception as e:  # ComfyUI's own dependencies are missing in this interpreter
        pytest.skip(f"ComfyUI at {COMFY} does not import here ({e}); run with its venv", allow_module_level=True)
    return comfy


comfy = _import_comfy()

import comfy_autocloud.stepcache as sc  # noqa: E402
from comfy_autocloud.comfy import nodes_stepcache as nodes  # noqa: E402
from comfy_autocloud.comfy.stepcache_wrappers import KEY, FluxBlockPatch  # noqa: E402
from comfy_autocloud.stepcache.calibration import use_store_dir  # noqa: E402
from test_stepcache import psnr  # noqa: E402  (the same batch PSNR the library tests use)


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
    assert sc.summary(adv)["strategy"] == "dynamic" and sc.summary(fast)["strategy"] == "target"
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


class HandControl(comfy.controlnet.ControlBase):
    """A ControlNet without a control model: ComfyUI's ControlBase (timestep range, strength, merge) with
    per-block residuals computed from the current latent, as a Flux ControlNet's would be."""

    def __init__(self, strength: float = 1.0, end: float = 1.0) -> None:
        super().__init__()
        self.set_cond_hint(None, strength, (0.0, end))
        g = torch.Generator().manual_seed(11)
        self.dirs = [torch.randn(1, 16, 64, generator=g) * 0.5 for _ in range(2)]
        self.calls = 0

    def get_control(self, x_noisy: Any, t: Any, cond: Any, batched_number: int, transformer_options: Any) -> Any:
        if self.timestep_range is not None and (t[0] > self.timestep_range[0] or t[0] < self.timestep_range[1]):
            return None
        self.calls += 1
        amp = x_noisy.flatten(1).mean(1).reshape(-1, 1, 1)
        return self.control_merge({"input": [d * (1 + amp) for d in self.dirs], "output": []}, None, x_noisy.dtype)

    def copy(self) -> HandControl:
        c = HandControl(self.strength, self.timestep_percent_range[1])
        c.dirs = self.dirs
        return c


def _with_control(conds: tuple, control: Any) -> tuple:
    pos, neg, noise = conds
    return ([[pos[0][0], {**pos[0][1], "control": control}]], [[neg[0][0], {**neg[0][1], "control": control}]],
            noise)


def test_controlnet_residuals_are_not_frozen(flux: Any, conds: tuple) -> None:
    """ControlNet additions to the Flux blocks (``control`` in ``forward_orig``): a call with an active
    ControlNet computes and keeps nothing; after its end_percent (or at strength 0) the cache works as usual."""
    cached = sc.enable_cache(flux, strategy="fixed", skip_interval=2, warmup_steps=2)
    # ControlNet on every step: every step computes, output equal to uncached with the same ControlNet
    ref = run(flux, _with_control(conds, HandControl()))
    assert rel(ref, run(flux, conds)) > 1e-3  # the control matters
    c = Counter(flux)
    out = run(cached, _with_control(conds, HandControl()))
    assert c.n["single0"] == 10 and torch.allclose(out, ref, atol=1e-5)
    # ControlNet on the first half of the schedule only: those steps compute, the rest follows the rule
    half = HandControl(end=0.5)
    ref_half = run(flux, _with_control(conds, half))
    c.n = {"double1": 0, "single0": 0}
    out_half = run(cached, _with_control(conds, HandControl(end=0.5)))
    active = half.calls
    assert 2 < active < 10
    decisions = sc.state_of(cached).last_run_decisions
    assert not any(decisions[:active])  # steps with an active ControlNet all computed
    reused_after = sum(decisions[active + 1:])  # the first step after the ControlNet has nothing cached
    assert reused_after >= 1 and c.n["single0"] == 10 - reused_after
    assert 0 < rel(out_half, ref_half) < 0.05
    # strength 0: zero residuals, cached exactly like a run without a ControlNet
    c.n = {"double1": 0, "single0": 0}
    run(cached, _with_control(conds, HandControl(strength=0.0)))
    assert c.n["single0"] == 7
    c.close()


@pytest.fixture(scope="module")
def unet() -> Any:
    """A tiny SD1.5-type UNet (``openaimodel.UNetModel``: res blocks, cross-attention, skip connections) in a
    ModelPatcher, random weights; eps prediction with SD1.5's discrete schedule."""
    torch.set_num_threads(1)
    uc = dict(context_dim=32, model_channels=32, use_linear_in_transformer=False, adm_in_channels=None,
              use_temporal_attention=False, in_channels=4, out_channels=4, num_res_blocks=[1, 1],
              channel_mult=[1, 2], transformer_depth=[1, 1], transformer_depth_output=[1, 1, 1, 1],
              transformer_depth_middle=1, use_spatial_transformer=True, legacy=False, image_size=32,
              use_checkpoint=False, num_heads=2, num_head_channels=-1)
    cfg = comfy.supported_models.SD15(uc)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.diffusion_model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def test_unet_output_level_euler_cfg(unet: Any) -> None:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    dm = unet.model.diffusion_model
    assert isinstance(dm, UNetModel)
    g = torch.Generator().manual_seed(4)
    conds = ([[torch.randn(1, 5, 32, generator=g), {}]], [[torch.randn(1, 5, 32, generator=g), {}]],
             torch.randn(2, 4, 8, 8, generator=g))
    calls = {"n": 0}
    h = dm.input_blocks[0][0].register_forward_hook(lambda *a: calls.__setitem__("n", calls["n"] + 1))
    try:
        ref = run(unet, conds)
        assert calls["n"] == 10  # CFG as one batch: one UNet call per step
        cached = sc.enable_cache(unet, strategy="fixed", skip_interval=2, warmup_steps=2)
        assert cached is not unet and not unet.get_all_wrappers("apply_model")
        assert not sc.state_of(cached).stats.calls and holder_block_mode(cached) is False
        calls["n"] = 0
        out = run(cached, conds)
        st = sc.state_of(cached)
        assert st.last_run_decisions == [ch == "R" for ch in "CCCRCRCRCC"]
        assert calls["n"] == 7 and st.stats.reused_calls == 3
        assert 0 < rel(out, ref) < 0.05 and st.cached_bytes() == 0
        exact = sc.enable_cache(unet, strategy="adaptive", threshold=0.0)
        assert torch.allclose(run(exact, conds), ref, atol=1e-5)
        calls["n"] = 0
        assert torch.equal(run(unet, conds), ref) and calls["n"] == 10  # the original is untouched
    finally:
        h.remove()


def holder_block_mode(mp: Any) -> bool:
    from comfy_autocloud.comfy.stepcache_wrappers import holder_of

    return holder_of(mp).block_mode


# ---------------------------------------------------------------- quality targets


@pytest.fixture(autouse=True)
def calibration_dir(tmp_path: Path) -> Any:
    """Each test's own calibrations (an explicit directory wins over the store's, which the nodes set; that
    one is forgotten afterwards too, so later tests in this process see no running store)."""
    d = tmp_path / "stepcache-calibrations"
    sc.set_calibration_dir(d)
    yield d
    sc.set_calibration_dir(None)
    use_store_dir(None)


def other_noise(conds: tuple, seed: int = 21) -> tuple:
    pos, neg, noise = conds
    return pos, neg, torch.randn(noise.shape, generator=torch.Generator().manual_seed(seed))


def stats_text(mp: Any) -> str:
    return nodes.CacheDitDetailedStats().report(mp)["result"][0]


def test_quality_target_flux_calibrates_then_plans(flux: Any, conds: tuple, calibration_dir: Path) -> None:
    held_out = other_noise(conds)
    ref = run(flux, held_out, steps=20)
    (cached,) = nodes.CacheDitAccelerate().apply(flux)  # the node's default: balanced, 35 dB
    assert sc.summary(cached)["quality"]["target_psnr"] == 35.0 and holder_block_mode(cached) is False
    run(cached, conds, steps=20)
    st = sc.state_of(cached)
    assert not any(st.last_run_decisions) and len(st.last_run_decisions) == 20
    text = stats_text(cached)
    assert "calibration run (every step computed" in text and "plan for next runs" in text
    (f,) = calibration_dir.glob("*.json")  # stored when the sampling run ended
    (cal,) = json.loads(f.read_text())["calibrations"].values()
    assert cal["family"] == "sample_euler" and len(cal["times"]) == 20
    c = Counter(flux)
    out = run(cached, held_out, steps=20)
    c.close()
    reused = sum(st.last_run_decisions)
    assert reused >= 3 and c.n["double1"] == 20 - reused
    assert psnr(out, ref) >= 34.0
    text = stats_text(cached)
    assert "followed calibration 20:sample_euler:" in text and f"reused {reused}" in text
    assert "estimated PSNR" in text and st.cached_bytes() == 0
    assert torch.equal(run(flux, held_out, steps=20), ref)  # the model without the node: stock, bit for bit
    run(cached, conds, steps=20, sampler="heun")  # another sampler: its own calibration
    assert not any(st.last_run_decisions)
    assert len(json.loads(f.read_text())["calibrations"]) == 2


def test_quality_target_few_steps_compute_every_step(flux: Any, conds: tuple) -> None:
    ref = run(flux, conds, steps=6)
    cached = sc.enable_cache(flux, preset="fast")
    run(cached, conds, steps=6)
    assert torch.equal(run(cached, conds, steps=6), ref)
    assert not any(sc.state_of(cached).last_run_decisions)
    assert "few-step schedule (6 steps <= 8): every step computes" in stats_text(cached)


def test_quality_target_unet_output_level(unet: Any) -> None:
    g = torch.Generator().manual_seed(4)
    conds = ([[torch.randn(1, 5, 32, generator=g), {}]], [[torch.randn(1, 5, 32, generator=g), {}]],
             torch.randn(2, 4, 8, 8, generator=g))
    held_out = other_noise(conds)
    ref = run(unet, held_out, steps=20)
    cached = sc.enable_cache(unet, target_psnr=35)
    run(cached, conds, steps=20)
    out = run(cached, held_out, steps=20)
    assert sum(sc.state_of(cached).last_run_decisions) >= 2 and psnr(out, ref) >= 34.0
    assert torch.equal(run(unet, held_out, steps=20), ref)


def test_calibration_identity_follows_weights_and_patches(flux: Any) -> None:
    from comfy_autocloud.comfy.stepcache_wrappers import model_fingerprint

    base = model_fingerprint(flux)
    assert model_fingerprint(flux.clone()) == base
    key = "diffusion_model.double_blocks.0.img_mlp.0.weight"
    w = flux.model.state_dict()[key]
    lora = flux.clone()
    lora.add_patches({key: (torch.ones_like(w) * 0.01,)}, 1.0)
    assert model_fingerprint(lora) != base


def test_nodes_take_preset_and_target(flux: Any) -> None:
    (a,) = nodes.CacheDitAccelerate().apply(flux, "quality", 0.0)
    (b,) = nodes.CacheDitAccelerate().apply(flux, "fast", 37.5)
    (c,) = nodes.CacheDitAdvancedConfig().apply(flux, "adaptive", 5, 3, 0.0, False, 0.3, "block", "fast")
    (d,) = nodes.CacheDitAdvancedConfig().apply(flux, "adaptive", 5, 3, 0.0, False, 0.3, "block")
    assert sc.summary(a)["quality"]["target_psnr"] == 40.0 and sc.summary(b)["quality"]["target_psnr"] == 37.5
    assert sc.summary(c)["quality"]["preset"] == "fast" and sc.summary(d)["strategy"] == "adaptive"
    assert holder_block_mode(d) is True and holder_block_mode(c) is False
    (e,) = nodes.CacheDitCacheControl().apply(flux, True)
    assert sc.summary(e)["quality"]["preset"] == "balanced"
    from comfy_autocloud.comfy.setup import get_adapter
    from comfy_autocloud.stepcache import calibration

    adapter = get_adapter()
    if adapter is not None:  # the nodes keep calibrations in the running store's private directory
        assert calibration._DIRS["store"] == adapter.store.private / "stepcache"
    inputs = nodes.CacheDitAccelerate.INPUT_TYPES()
    assert inputs["required"]["preset"][0] == ["balanced", "quality", "fast"]


def _graph(seed: int, prefix: str, cached: bool) -> dict[str, Any]:
    """API prompt: tiny SD1.5 checkpoint -> (CacheDit Accelerate ->) KSampler, 10 steps -> SaveLatent (+ stats)."""
    p: dict[str, Any] = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd15.safetensors"}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cloud", "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["accel", 0] if cached else ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0],
            "latent_image": ["latent", 0], "seed": seed, "steps": 10, "cfg": 3.0, "sampler_name": "euler",
            "scheduler": "normal", "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": prefix}},
    }
    if cached:
        p["accel"] = {"class_type": "AutoCloudCacheDitAccelerate", "inputs": {"model": ["ckpt", 0],
                                                                            "preset": "balanced"}}
        p["stats"] = {"class_type": "AutoCloudCacheDitDetailedStats", "inputs": {"model": ["accel", 0],
                                                                               "latent": ["sample", 0]}}
    return p


@pytest.mark.timeout(900)  # four prompts that load the checkpoint again each time; minutes on a busy machine
def test_server_prompts_with_and_without_the_node(tmp_path: Path) -> None:
    """A real ComfyUI server (every node executes every prompt: --cache-none): the Accelerate node calibrates
    on its first prompt (every step computed: the stock result) and reuses on the next; a prompt without the
    node afterwards is bit-identical to stock."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from safetensors.torch import load_file

    from comfy_env import ComfyServer, tiny_models

    models = tiny_models(Path(COMFY))
    base = tmp_path / "comfy"
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "checkpoints" / "tiny-sd15.safetensors").symlink_to(models / "tiny-sd15.safetensors")
    cache = tmp_path / "cache"
    with ComfyServer(Path(COMFY), base, env={"AUTOCLOUD_CACHE": str(cache)},
                     extra_args=("--cache-none", "--disable-metadata")) as server:
        texts = {}
        for name, seed, cached in (("stock", 5, False), ("calib", 5, True), ("cached", 5, True), ("after", 5, False)):
            done = server.run(_graph(seed, name, cached), timeout=300)
            assert done.status == "success", (done.error(), server.log()[-3000:])
            if cached:
                texts[name] = done.history["outputs"]["stats"]["text"][0]

    def latent(name: str) -> torch.Tensor:
        (f,) = (base / "output").rglob(f"{name}_*.latent")
        return load_file(str(f))["latent_tensor"]

    assert "last run: calibration run" in texts["calib"] and torch.equal(latent("calib"), latent("stock"))
    assert "last run: followed calibration 10:sample_euler:" in texts["cached"] and "estimated PSNR" in texts["cached"]
    assert not torch.equal(latent("cached"), latent("stock"))  # some steps were reused
    assert torch.equal(latent("after"), latent("stock"))  # node removed: stock, bit for bit
    assert len(list((cache / ".autocloud" / "stepcache").glob("*.json"))) == 1  # in the store's private dir
