"""Step cache: step rules, correctness on real (tiny) torch DiTs and diffusers transformers, stats, API."""

from __future__ import annotations

import itertools
import json
import logging
import math
from typing import Any

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import comfy_autocloud.stepcache as sc  # noqa: E402
from comfy_autocloud.stepcache import calibration as sc_cal  # noqa: E402
from comfy_autocloud.stepcache import state as sc_state  # noqa: E402
from comfy_autocloud.stepcache.strategies import (  # noqa: E402
    AdaptiveStrategy,
    DynamicStrategy,
    FixedStrategy,
    make_strategy,
)

# ---------------------------------------------------------------- tiny real models


class Block(nn.Module):
    """adaLN DiT block (attention + MLP), counting how often it really computes."""

    computed = 0

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d, elementwise_affine=False), nn.LayerNorm(d, elementwise_affine=False)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.mod = nn.Linear(d, 4 * d)
        self.count = 0

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        self.count += 1
        s1, g1, s2, g2 = self.mod(c)[:, None].chunk(4, -1)
        h = self.norm1(x) * (1 + s1)
        x = x + g1 * self.attn(h, h, h, need_weights=False)[0]
        return x + g2 * self.mlp(self.norm2(x) * (1 + s2))


class TinyDiT(nn.Module):
    """Class-conditional DiT on token sequences: ``forward(x, t, y) -> velocity``."""

    def __init__(self, d: int = 32, depth: int = 4, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out = nn.Linear(4, d), nn.Linear(d, 4)
        self.temb = nn.Sequential(nn.Linear(1, d), nn.SiLU(), nn.Linear(d, d))
        self.yemb = nn.Embedding(11, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.temb(t.reshape(-1, 1).expand(x.shape[0], 1)) + self.yemb(y)
        h = self.inp(x)
        for b in self.blocks:
            h = b(h, c)
        return self.out(h)

    def counts(self) -> list[int]:
        return [b.count for b in self.blocks]


STEPS = 10
TS = torch.linspace(1.0, 0.0, STEPS + 1)


def euler(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: float = 2.0, separate: bool = False,
          start: int = 0) -> torch.Tensor:
    """Euler flow sampling with CFG either as one batch (cond + uncond) or as two calls per step."""
    x = x.clone()
    null = torch.full_like(y, 10)
    with torch.no_grad():
        for i in range(start, STEPS):
            t = TS[i]
            if separate:
                vc, vu = model(x, t.expand(len(y)), y), model(x, t.expand(len(y)), null)
            else:
                vc, vu = model(torch.cat([x, x]), t.expand(2 * len(y)), torch.cat([y, null])).chunk(2)
            x = x + (TS[i + 1] - t) * (vu + cfg * (vc - vu))
    return x


def heun(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Second-order sampler: two model calls per step (at t_i and at t_{i+1}), Euler on the last step."""
    x = x.clone()
    with torch.no_grad():
        for i in range(STEPS):
            dt = TS[i + 1] - TS[i]
            v1 = model(x, TS[i].expand(len(y)), y)
            if i == STEPS - 1:
                x = x + dt * v1
                continue
            v2 = model(x + dt * v1, TS[i + 1].expand(len(y)), y)
            x = x + dt * (v1 + v2) / 2
    return x


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """Tiny models run fastest (and deterministically) on one thread, even on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def calibration_dir(tmp_path: Any) -> Any:
    """Calibrations of each test go to its own directory; the no-argument default is the balanced preset."""
    d = tmp_path / "stepcache-calibrations"
    sc.set_calibration_dir(d)
    yield d
    sc.set_calibration_dir(None)
    sc.set_global_config(default_preset="balanced")


@pytest.fixture()
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(3, 16, 4, generator=g), torch.tensor([1, 5, 7])


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------- step rules


def pattern(strategy: object, n: int = 14, signals: list[float] | None = None) -> str:
    return "".join("R" if strategy.reuse(i, None, None if signals is None else signals[i]) else "C" for i in range(n))


def test_fixed_rule_skips_one_in_every_interval() -> None:
    assert pattern(FixedStrategy(skip_interval=2, warmup_steps=2)) == "CCCRCRCRCRCRCR"
    assert pattern(FixedStrategy(skip_interval=3, warmup_steps=5)) == "CCCCCCCRCCRCCR"
    assert pattern(FixedStrategy(skip_interval=1, warmup_steps=0)) == "C" * 14


def test_dynamic_rule_reuses_more_often_later() -> None:
    s = DynamicStrategy(skip_interval=4, warmup_steps=1)
    assert pattern(s, 16) == "CCCCRCCRCRCRCRCR"
    s.reset()
    assert pattern(s, 16) == "CCCCRCCRCRCRCRCR"  # reset restores the first period
    assert pattern(DynamicStrategy(skip_interval=1, warmup_steps=0)) == "C" * 14


def test_adaptive_rule_accumulates_signal_against_threshold() -> None:
    s = AdaptiveStrategy(threshold=0.1, warmup_steps=2, max_reuse=2)
    sig = [0.5, 0.5, 0.04, 0.04, 0.04, 0.2, 0.01, 0.01, 0.01, 0.01, 0.095, 0.09, 0.0, 0.0]
    # steps 2,3: 0.04, 0.08 < 0.1 -> reuse; 4: 0.12 -> compute; 5: 0.2 -> compute; 6,7 reuse; 8: max_reuse -> compute
    assert pattern(s, 14, sig) == "CCRRCCRRCRCRRC"
    s2 = AdaptiveStrategy(threshold=0.0, warmup_steps=0, max_reuse=5)
    assert pattern(s2, 6, [0.0] * 6) == "C" * 6  # budget 0: never reuse
    assert not AdaptiveStrategy(warmup_steps=0).reuse(3, None, None)  # no signal yet -> compute


def test_make_strategy_validates() -> None:
    assert make_strategy("adaptive", skip_interval=4, warmup_steps=1).max_reuse == 3
    with pytest.raises(ValueError, match="unknown strategy 'nope'"):
        make_strategy("nope", skip_interval=2, warmup_steps=0)
    with pytest.raises(ValueError, match="skip_interval"):
        make_strategy("fixed", skip_interval=0, warmup_steps=0)
    with pytest.raises(ValueError, match="warmup_steps"):
        make_strategy("fixed", skip_interval=2, warmup_steps=-1)


def test_taylor_extrapolation_is_first_order_in_timestep() -> None:
    st = sc.StepCacheState(sc.CacheConfig(strategy="adaptive"))
    ctx = st.begin_call(1.0, "k")
    st.store(ctx, {"h": torch.tensor([3.0])}, {"h": torch.tensor([1.0])})  # residual 2 at t=1.0
    ctx = st.begin_call(0.9, "k")
    st.store(ctx, {"h": torch.tensor([3.5])}, {"h": torch.tensor([1.0])})  # residual 2.5 at t=0.9
    ctx = st.begin_call(0.7, "k")
    out = st.cached(ctx, {"h": torch.tensor([10.0])})
    assert out["h"].item() == pytest.approx(10.0 + 3.5)  # 2.5 + 0.5/0.1 * 0.2


# ---------------------------------------------------------------- plain torch DiT


def test_fixed_computes_exactly_the_rule_steps(data: tuple) -> None:
    x, y = data
    m = TinyDiT()
    ref = euler(m, x, y)
    base = m.counts()
    assert sc.enable_cache(m, strategy="fixed", skip_interval=2, warmup_steps=2, level="block") is m
    out = euler(m, x, y)
    st = sc.state_of(m)
    assert st.last_run_decisions == [c == "R" for c in "CCCRCRCRCR"]
    used = [a - b for a, b in zip(m.counts(), base, strict=True)]
    assert used == [10, 6, 6, 6]  # block 0 always runs, the rest only on the 6 computed steps
    assert 0 < rel(out, ref) < 0.05
    s = sc.summary(m)
    assert (s["steps"], s["computed_steps"], s["reused_steps"], s["hit_rate"]) == (10, 6, 4, 0.4)
    sc.disable_cache(m)
    assert torch.equal(euler(m, x, y), ref)
    assert sc.summary(m)["enabled"] is False


def test_never_reusing_is_bit_exact(data: tuple) -> None:
    x, y = data
    m = TinyDiT()
    ref = euler(m, x, y)
    sc.enable_cache(m, strategy="fixed", skip_interval=1, warmup_steps=0)
    assert torch.equal(euler(m, x, y), ref)
    sc.enable_cache(m, strategy="adaptive", threshold=0.0)
    assert torch.equal(euler(m, x, y), ref)


@pytest.mark.parametrize("strategy", ["fixed", "dynamic", "adaptive"])
def test_cfg_separate_calls_match_one_batch(data: tuple, strategy: str) -> None:
    """Cond and uncond as two calls keep their own residuals and follow the step's one decision."""
    x, y = data
    m = TinyDiT()
    sc.enable_cache(m, strategy=strategy, skip_interval=3, warmup_steps=2, threshold=0.3)
    batched = euler(m, x, y)
    dec_b = list(sc.state_of(m).last_run_decisions)
    sep = euler(m, x, y, separate=True)
    dec_s = sc.state_of(m).last_run_decisions
    assert dec_b == dec_s and any(dec_b)
    assert torch.allclose(batched, sep, atol=1e-4)
    s = sc.summary(m)
    assert s["runs"] == 2 and s["calls"] == 30 and s["steps"] == 20


def test_batch_members_are_independent(data: tuple) -> None:
    x, y = data
    m = TinyDiT()
    sc.enable_cache(m, strategy="fixed", skip_interval=2, warmup_steps=1)
    whole = euler(m, x, y)
    for i in range(len(y)):
        assert torch.allclose(euler(m, x[i:i + 1], y[i:i + 1]), whole[i:i + 1], atol=1e-4)


def test_several_models_interleaved_keep_separate_state(data: tuple) -> None:
    x, y = data
    a, b = TinyDiT(seed=0), TinyDiT(seed=1)
    ra, rb = euler(a, x, y), euler(b, x, y)
    sc.reset_cache_stats()
    sc.enable_cache(a, strategy="fixed", skip_interval=2, warmup_steps=2, label="a")
    sc.enable_cache(b, strategy="fixed", skip_interval=3, warmup_steps=2, label="b")
    xa, xb = x.clone(), x.clone()
    null = torch.full_like(y, 10)
    with torch.no_grad():
        for i in range(STEPS):  # one step of a, then one of b: a refiner-style interleaving
            t, dt = TS[i].expand(2 * len(y)), TS[i + 1] - TS[i]
            for m, xx in ((a, xa), (b, xb)):
                vc, vu = m(torch.cat([xx, xx]), t, torch.cat([y, null])).chunk(2)
                xx += dt * (vu + 2.0 * (vc - vu))
    sa, sb = sc.summary(a), sc.summary(b)
    assert (sa["reused_steps"], sb["reused_steps"]) == (4, 2)
    assert torch.allclose(xa, euler(a, x, y), atol=1e-5)  # same as a run of a alone
    assert rel(xa, ra) < 0.05 and rel(xb, rb) < 0.05
    g = sc.get_global_stats()
    assert g["total_cache_hits"] >= 6 and g["total_models"] >= 2
    names = {d["model"] for d in g["models"]}
    assert {"a", "b"} <= names


def test_new_run_resets_and_memory_does_not_grow(data: tuple) -> None:
    x, y = data
    m = TinyDiT()
    sc.enable_cache(m, strategy="adaptive", skip_interval=3, warmup_steps=2, threshold=0.5)
    first = euler(m, x, y)
    st = sc.state_of(m)
    held = st.cached_bytes()
    for _ in range(4):
        assert torch.equal(euler(m, x, y), first)  # state from the last run never leaks into the next
    assert st.cached_bytes() == held and len(st._streams) == 1
    assert sc.summary(m)["runs"] == 5
    euler(m, x, y, separate=True)
    assert len(st._streams) == 2  # cond + uncond streams, nothing from earlier runs


def test_img2img_starting_mid_schedule(data: tuple, caplog: pytest.LogCaptureFixture) -> None:
    x, y = data
    m = TinyDiT()
    ref = euler(m, x, y, start=4)
    sc.enable_cache(m, strategy="fixed", skip_interval=2, warmup_steps=1, debug=True)
    euler(m, x, y)
    with caplog.at_level(logging.INFO, logger="comfy_autocloud.stepcache"):
        out = euler(m, x, y, start=4)
    assert "new run" in caplog.text
    assert sc.state_of(m).last_run_decisions == [c == "R" for c in "CCRCRC"]
    assert rel(out, ref) < 0.05
    assert "step 2 t=0.4: reuse (signal=" in caplog.text


def test_second_order_sampler(data: tuple) -> None:
    x, y = data
    m = TinyDiT()
    ref = heun(m, x, y)
    sc.enable_cache(m, strategy="fixed", skip_interval=2, warmup_steps=2)
    out = heun(m, x, y)
    s = sc.summary(m)
    assert s["steps"] == STEPS and s["calls"] == 2 * STEPS - 1  # two calls per timestep after the first
    assert s["reused_steps"] == 4 and s["reused_calls"] >= 6
    assert rel(out, ref) < 0.05


def test_output_level_and_noise(data: tuple) -> None:
    x, y = data
    m = TinyDiT()
    ref = euler(m, x, y)
    sc.enable_cache(m, strategy="fixed", skip_interval=2, warmup_steps=2, level="output")
    base = m.counts()
    out = euler(m, x, y)
    assert [a - b for a, b in zip(m.counts(), base, strict=True)] == [6, 6, 6, 6]
    assert rel(out, ref) < 0.1
    sc.enable_cache(m, strategy="fixed", skip_interval=2, warmup_steps=2, noise_scale=0.05)
    n1, n2 = euler(m, x, y), euler(m, x, y)
    assert torch.equal(n1, n2)  # seeded per run
    sc.enable_cache(m, strategy="fixed", skip_interval=2, warmup_steps=2)
    assert not torch.equal(euler(m, x, y), n1)


def test_stats_time_saved_and_global_api(data: tuple) -> None:
    x, y = data
    m = TinyDiT(d=64, depth=6)
    sc.reset_cache_stats()
    sc.set_global_config(default_skip_interval=2, default_strategy="fixed", global_debug=False)
    try:
        sc.set_global_config(default_skip_interval=3, default_strategy="dynamic", default_warmup_steps=1)
        sc.enable_cache(m)
        s = sc.summary(m)
        assert (s["strategy"], s["skip_interval"], s["warmup_steps"]) == ("dynamic", 3, 1)
        euler(m, x, y)
        s = sc.summary(m)
        assert s["reused_steps"] > 0 and s["time_saved_s"] > 0 and s["time_computed_s"] > 0
        g = sc.get_global_stats()
        assert g["total_cache_hits"] == s["reused_steps"] and g["total_steps"] == s["steps"]
        sc.reset_cache_stats()
        assert sc.get_global_stats()["total_cache_hits"] == 0 and sc.summary(m)["steps"] == 0
        with pytest.raises(ValueError, match="unknown strategy"):
            sc.set_global_config(default_strategy="turbo")
        with pytest.raises(ValueError, match="noise_scale"):
            sc.enable_cache(m, noise_scale=2.0)
        with pytest.raises(TypeError, match="unsupported model type"):
            sc.enable_cache(object())
    finally:
        sc.set_global_config(default_skip_interval=2, default_strategy="fixed", default_warmup_steps=2,
                             global_debug=False)


def test_retired_models_fold_into_global_totals(data: tuple) -> None:
    import gc

    x, y = data
    sc.reset_cache_stats()
    m = TinyDiT()
    sc.enable_cache(m, strategy="fixed", skip_interval=2, warmup_steps=2)
    euler(m, x, y)
    del m
    gc.collect()
    g = sc.get_global_stats()
    assert g["total_cache_hits"] == 4 and g["retired_models"] >= 1
    assert sc_state.live_states() is not None


# ---------------------------------------------------------------- diffusers transformers


def _flux() -> nn.Module:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        patch_size=1, in_channels=4, out_channels=4, num_layers=2, num_single_layers=2, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()


def _flux_sample(m: nn.Module, separate: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    x, enc = torch.randn(2, 16, 4, generator=g), torch.randn(2, 3, 32, generator=g)
    pooled = torch.randn(2, 16, generator=g)
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    with torch.no_grad():
        for i in range(STEPS):
            if separate:
                v = torch.cat([m(hidden_states=x[j:j + 1], encoder_hidden_states=enc[j:j + 1],
                                 pooled_projections=pooled[j:j + 1], timestep=TS[i].expand(1), img_ids=ids,
                                 txt_ids=torch.zeros(3, 3), return_dict=False)[0] for j in range(2)])
            else:
                v = m(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                      timestep=TS[i].expand(2), img_ids=ids, txt_ids=torch.zeros(3, 3)).sample
            x = x + (TS[i + 1] - TS[i]) * v
    return x


def test_diffusers_flux_transformer() -> None:
    m = _flux()
    ref = _flux_sample(m)
    counts = {"n": 0}
    m.single_transformer_blocks[0].attn.register_forward_hook(lambda *a: counts.__setitem__("n", counts["n"] + 1))
    sc.enable_cache(m, strategy="fixed", skip_interval=2, warmup_steps=2)
    out = _flux_sample(m)
    assert counts["n"] == 6  # a middle block: computed on the 6 computed steps only
    assert sc.summary(m)["reused_steps"] == 4
    assert 0 < rel(out, ref) < 0.05
    assert torch.allclose(_flux_sample(m, separate=True), out, atol=1e-4)
    sc.enable_cache(m, strategy="adaptive", threshold=0.0)
    assert torch.allclose(_flux_sample(m), ref, atol=1e-6)
    sc.disable_cache(m)
    assert torch.equal(_flux_sample(m), ref)


def test_diffusers_sd3_transformer() -> None:
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    m = diffusers.SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8).eval()
    g = torch.Generator().manual_seed(0)
    x0, enc = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 3, 32, generator=g)
    pooled = torch.randn(2, 16, generator=g)

    def run() -> torch.Tensor:
        x = x0.clone()
        with torch.no_grad():
            for i in range(STEPS):
                v = m(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                      timestep=(TS[i] * 1000).expand(2), return_dict=False)[0]
                x = x + (TS[i + 1] - TS[i]) * v
        return x

    ref = run()
    sc.enable_cache(m, strategy="dynamic", skip_interval=3, warmup_steps=2)
    out = run()
    assert sc.summary(m)["reused_steps"] == 3
    assert 0 < rel(out, ref) < 0.05
    sc.disable_cache(m)
    assert torch.equal(run(), ref)


def test_diffusers_pipeline_like_object_caches_its_transformer() -> None:
    m = _flux()

    class Pipe:
        transformer = m

    pipe = Pipe()
    assert sc.enable_cache(pipe, strategy="fixed") is pipe
    assert sc.summary(pipe)["strategy"] == "fixed"
    sc.disable_cache(pipe)
    assert sc.state_of(m) is None


def test_control_active_rule() -> None:
    z, nz = torch.zeros(1, 4, 8), torch.ones(1, 4, 8)
    assert not sc_state.control_active(None)
    assert not sc_state.control_active({"input": [None, z], "output": []})  # strength 0: all zeros
    assert sc_state.control_active({"input": [None, z], "output": [nz]})
    assert sc_state.control_active([z, nz]) and not sc_state.control_active((z,))


def test_diffusers_flux_controlnet_residuals_are_never_frozen() -> None:
    """ControlNet residuals (``controlnet_block_samples``) on steps 0..4 only: those steps compute and keep
    nothing, so step 5 (a reuse step by the rule) computes too instead of reusing a residual with control."""
    m = _flux()
    g = torch.Generator().manual_seed(7)
    ctrl = [torch.randn(2, 16, 32, generator=g) * 0.5 for _ in range(2)]
    x0, enc = torch.randn(2, 16, 4, generator=g), torch.randn(2, 3, 32, generator=g)
    pooled = torch.randn(2, 16, generator=g)
    ids = torch.zeros(16, 3)
    ids[:, 1], ids[:, 2] = torch.arange(16) // 4, torch.arange(16) % 4
    counts = {"n": 0}
    m.single_transformer_blocks[0].attn.register_forward_hook(lambda *a: counts.__setitem__("n", counts["n"] + 1))

    def run(last_control_step: int) -> torch.Tensor:
        x = x0.clone()
        with torch.no_grad():
            for i in range(STEPS):
                c = [s * (1 + x.mean()) for s in ctrl] if i <= last_control_step else None
                v = m(hidden_states=x, encoder_hidden_states=enc, pooled_projections=pooled,
                      timestep=TS[i].expand(2), img_ids=ids, txt_ids=torch.zeros(3, 3),
                      controlnet_block_samples=c, return_dict=False)[0]
                x = x + (TS[i + 1] - TS[i]) * v
        return x

    ref_all, ref_half = run(STEPS), run(4)
    sc.enable_cache(m, strategy="fixed", skip_interval=2, warmup_steps=0)
    counts["n"] = 0
    assert torch.allclose(run(STEPS), ref_all, atol=1e-5)  # control on every step: every step computes
    assert counts["n"] == STEPS
    counts["n"] = 0
    out = run(4)
    # rule: reuse on odd steps; 1, 3 forced by control; 5 has nothing cached; 7 and 9 reuse
    assert counts["n"] == 8
    assert 0 < rel(out, ref_half) < 0.05
    zero = [torch.zeros_like(s) for s in ctrl]  # strength 0: caches as without a ControlNet
    counts["n"] = 0
    with torch.no_grad():
        m(hidden_states=x0, encoder_hidden_states=enc, pooled_projections=pooled, timestep=TS[0].expand(2),
          img_ids=ids, txt_ids=torch.zeros(3, 3), controlnet_block_samples=zero)
        m(hidden_states=x0, encoder_hidden_states=enc, pooled_projections=pooled, timestep=TS[1].expand(2),
          img_ids=ids, txt_ids=torch.zeros(3, 3), controlnet_block_samples=zero)
    assert counts["n"] == 1 and sc.state_of(m).last_run_decisions == [False, True]
    sc.disable_cache(m)


# ---------------------------------------------------------------- quality targets


def psnr(a: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of the whole batch, the peak being the reference's mean per-sample value range."""
    flat = ref.flatten(1)
    peak = float((flat.amax(1) - flat.amin(1)).mean())
    mse = float((a - ref).pow(2).mean())
    return 100.0 if mse == 0 else 10 * math.log10(peak**2 / mse)


class FlowDiT(TinyDiT):
    """What a flow-matching model computes: the velocity ``(x - x0) / t`` towards its clean-sample prediction
    (here TinyDiT's output), so sampling contracts errors as t -> 0 as it does with trained models."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (x - super().forward(x, t, y)) / t.reshape(-1, 1, 1).clamp_min(0.05)


def calib_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(8, 16, 4, generator=g), torch.arange(8)


def other_data() -> tuple[torch.Tensor, torch.Tensor]:
    """Held-out seeds and classes: calibrate on ``calib_data``, measure on these."""
    g = torch.Generator().manual_seed(77)
    return torch.randn(8, 16, 4, generator=g), torch.arange(2, 10)


def schedule_run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> torch.Tensor:
    """Euler, CFG 2 as one batch, on a ``steps``-step linear schedule."""
    ts = torch.linspace(1.0, 0.0, steps + 1)
    x, null = x.clone(), torch.full_like(y, 10)
    with torch.no_grad():
        for i in range(steps):
            vc, vu = model(torch.cat([x, x]), ts[i].expand(2 * len(y)), torch.cat([y, null])).chunk(2)
            x = x + (ts[i + 1] - ts[i]) * (vu + 2.0 * (vc - vu))
    return x


def test_quality_target_calibrates_once_then_reuses(calibration_dir: Any) -> None:
    x, y = calib_data()
    xb, yb = other_data()
    m = FlowDiT()
    ref = euler(m, xb, yb)
    sc.enable_cache(m)  # no arguments: the balanced preset
    s = sc.summary(m)
    assert (s["strategy"], s["quality"]["target_psnr"], s["quality"]["preset"]) == ("target", 35.0, "balanced")
    assert s["level"] == "output"
    euler(m, x, y)  # first run: calibration, every step computes
    st = sc.state_of(m)
    assert st.last_run_decisions == [False] * STEPS and not list(calibration_dir.glob("*.json"))
    assert sc.summary(m)["quality"]["last_run"]["mode"] == "calibrate"
    base = m.counts()
    out = euler(m, xb, yb)  # second run, other seeds and classes: follows the plan
    s = sc.summary(m)
    q = s["quality"]
    (f,) = calibration_dir.glob("*.json")  # stored when the second run started
    assert f.name == f"{q['model_hash']}.json" and q["file"] == str(f)
    assert q["last_run"]["mode"] == "plan" and q["last_run"]["predicted_psnr"] >= 35.0
    reused = sum(st.last_run_decisions)
    assert reused == q["last_run"]["reused_steps"] >= 3 and st.last_run_decisions[0] is False
    assert [a - b for a, b in zip(m.counts(), base, strict=True)] == [STEPS - reused] * 4  # output level
    assert psnr(out, ref) >= 34.0 and not torch.equal(out, ref)
    (cal,) = q["calibrations"].values()
    assert cal["steps"] == STEPS and cal["plan"] == q["last_run"]["plan"]
    assert "".join("C" if c == "C" else "R" for c in cal["plan"]) == "".join(
        "R" if d else "C" for d in st.last_run_decisions)


def test_quality_presets_order_reuse() -> None:
    x, y = calib_data()
    xb, yb = other_data()
    m = FlowDiT(seed=3)
    ref = schedule_run(m, xb, yb, 24)
    reused = {}
    for preset, target in (("fast", 30.0), ("balanced", 35.0), ("quality", 40.0)):
        sc.enable_cache(m, preset=preset)
        assert sc.summary(m)["quality"]["target_psnr"] == target == sc.PRESETS[preset]
        schedule_run(m, x, y, 24)  # the first preset calibrates, the others find the stored calibration
        out = schedule_run(m, xb, yb, 24)
        reused[preset] = sum(sc.state_of(m).last_run_decisions)
        assert psnr(out, ref) >= target - 1.0, preset
    assert reused["fast"] >= reused["balanced"] >= reused["quality"] >= 1
    sc.enable_cache(m, target_psnr=60)
    schedule_run(m, x, y, 24)
    assert sum(sc.state_of(m).last_run_decisions) <= reused["quality"]


def test_quality_target_argument_errors() -> None:
    m = TinyDiT()
    with pytest.raises(ValueError, match="unknown preset 'turbo'"):
        sc.enable_cache(m, preset="turbo")
    with pytest.raises(ValueError, match=r"target_psnr must be in 10\.\.100"):
        sc.enable_cache(m, target_psnr=5)
    with pytest.raises(ValueError, match="not both"):
        sc.enable_cache(m, preset="fast", strategy="adaptive")
    with pytest.raises(ValueError, match="output level"):
        sc.enable_cache(m, target_psnr=35, level="block")
    with pytest.raises(ValueError, match="unknown preset"):
        sc.set_global_config(default_preset="turbo")
    assert sc.enable_cache(m, target_psnr=42.5) is m and sc.summary(m)["quality"]["preset"] is None


def test_default_preset_and_strategy_defaults() -> None:
    m = TinyDiT()
    sc.set_global_config(default_strategy="fixed")  # the seed's way: no-argument enable_cache uses strategies
    try:
        sc.enable_cache(m)
        assert sc.summary(m)["strategy"] == "fixed"
        sc.set_global_config(default_preset="fast")
        sc.enable_cache(m)
        assert sc.summary(m)["quality"]["target_psnr"] == 30.0
    finally:
        sc.set_global_config(default_strategy="fixed", default_preset="balanced")


def test_calibration_persists_per_model_fingerprint(data: tuple, calibration_dir: Any) -> None:
    x, y = data
    a = TinyDiT(seed=0)
    sc.enable_cache(a)
    euler(a, x, y)
    sc.disable_cache(a)  # ends the calibrating run: stored
    (f,) = calibration_dir.glob("*.json")
    body = json.loads(f.read_text())
    assert body["format"] == 1 and len(body["calibrations"]) == 1
    sc.set_calibration_dir(calibration_dir.parent / "elsewhere")  # forget what this process loaded
    sc.set_calibration_dir(calibration_dir)
    same = TinyDiT(seed=0)  # same weights, another object (another process would see the same)
    sc.enable_cache(same)
    euler(same, x, y)
    assert any(sc.state_of(same).last_run_decisions)  # its first run already follows the stored plan
    other = TinyDiT(seed=1)
    sc.enable_cache(other)
    euler(other, x, y)
    assert not any(sc.state_of(other).last_run_decisions)  # other weights: calibrates
    sc.disable_cache(other)
    assert len(list(calibration_dir.glob("*.json"))) == 2
    assert sc_cal.fingerprint(a) == sc_cal.fingerprint(same) != sc_cal.fingerprint(other)


def test_unreadable_calibration_is_reported_and_replaced(data: tuple, calibration_dir: Any,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    x, y = data
    m = TinyDiT()
    calibration_dir.mkdir(parents=True)
    f = calibration_dir / f"{sc_cal.fingerprint(m)}.json"
    f.write_text("{not json")
    with caplog.at_level(logging.WARNING, logger="comfy_autocloud.stepcache"):
        sc.enable_cache(m)
    q = sc.summary(m)["quality"]
    assert str(f) in q["error"] and "unreadable calibration" in q["error"] and str(f) in caplog.text
    euler(m, x, y)
    assert not any(sc.state_of(m).last_run_decisions)
    euler(m, x, y)
    assert any(sc.state_of(m).last_run_decisions)
    assert json.loads(f.read_text())["format"] == 1 and "error" not in sc.summary(m)["quality"]
    f.write_text(json.dumps({"format": 1, "calibrations": {"k": {"family": "", "schedule": [1.0], "times": [1.0],
                                                                  "calls": [1, 1], "dt": [1.0], "peak": 1.0,
                                                                  "err": [[]]}}}))
    sc.set_calibration_dir(calibration_dir.parent / "elsewhere")
    sc.set_calibration_dir(calibration_dir)
    sc.enable_cache(m)
    assert "inconsistent calibration record" in sc.summary(m)["quality"]["error"]


def test_few_step_schedules_compute_every_step(data: tuple) -> None:
    x, y = data
    m = TinyDiT()
    ref = schedule_run(m, x, y, 6)
    sc.enable_cache(m, preset="fast")
    schedule_run(m, x, y, 6)
    assert torch.equal(schedule_run(m, x, y, 6), ref)  # the second run follows an all-compute plan
    last = sc.summary(m)["quality"]["last_run"]
    assert last["mode"] == "plan" and last["plan"] == "C" * 6
    assert "few-step schedule (6 steps <= 8): every step computes" in last["note"]


def test_each_schedule_gets_its_own_calibration(data: tuple, calibration_dir: Any) -> None:
    x, y = data
    m = TinyDiT()
    sc.enable_cache(m)
    euler(m, x, y)  # 10 steps: calibrates
    schedule_run(m, x, y, 20)  # another schedule: calibrates too
    assert not any(sc.state_of(m).last_run_decisions)
    euler(m, x, y)
    assert any(sc.state_of(m).last_run_decisions)  # the 10-step plan
    schedule_run(m, x, y, 20)
    assert any(sc.state_of(m).last_run_decisions)  # the 20-step plan
    cals = sc.summary(m)["quality"]["calibrations"]
    assert sorted(c["steps"] for c in cals.values()) == [10, 20]
    heun(m, x, y)  # same timesteps as the 10-step Euler run, two calls per step from step 1: leaves that plan
    assert sc.summary(m)["quality"]["last_run"]["mode"] == "diverged"
    assert not any(sc.state_of(m).last_run_decisions[2:])  # the rest computed
    heun(m, x, y)  # matched at step 2 from now on: no calibration has its calls, so it calibrates
    assert not any(sc.state_of(m).last_run_decisions)
    heun(m, x, y)
    assert any(sc.state_of(m).last_run_decisions)  # its own plan
    euler(m, x, y)
    assert any(sc.state_of(m).last_run_decisions) and sc.state_of(m).last_run_decisions[:2] == [False, False]
    sc.disable_cache(m)
    (f,) = calibration_dir.glob("*.json")
    assert len(json.loads(f.read_text())["calibrations"]) == 3


def test_quality_target_second_order_sampler() -> None:
    x, y = calib_data()
    xb, yb = other_data()
    m = FlowDiT(seed=5)
    ref = heun(m, xb, yb)
    sc.enable_cache(m, preset="balanced")
    heun(m, x, y)
    out = heun(m, xb, yb)
    assert any(sc.state_of(m).last_run_decisions) and psnr(out, ref) >= 34.0


def _plan_error(cal: sc_cal.Calibration, ops: str) -> float:
    """Brute-force oracle of the planner's error model: per run of reuse, the sum of dt * error of each step's
    better predictor; runs combine as a SEGMENT_EXP-norm."""
    total, seg, comp = 0.0, 0.0, [0]
    for i in range(1, cal.steps):
        if ops[i] == "C":
            total += seg ** sc_cal.SEGMENT_EXP
            seg = 0.0
            comp.append(i)
            continue
        p, c = (comp[-2] if len(comp) > 1 else -1), comp[-1]
        cands = [cal.err[i].get(k) for k in ((p, c), (-1, c))]
        seg += abs(cal.dt[i]) * min(e for e in cands if e is not None)
    total += seg ** sc_cal.SEGMENT_EXP
    return total ** (1 / sc_cal.SEGMENT_EXP)


def test_planner_is_the_cheapest_plan_meeting_the_target() -> None:
    n = 12
    err = [{(p, c): (0.004 * (i - c) ** 2 * (1 + (i % 3)) if p >= 0 else 0.03 * (i - c))
            for c in range(max(0, i - 8), i) for p in [-1, *range(max(0, c - 9), c)]} for i in range(n)]
    ts = [1 - i / n for i in range(n)]
    cal = sc_cal.Calibration(family="sample_euler", schedule=ts, times=ts, calls=[1] * n, dt=[1 / n] * n, peak=2.0,
                             err=err)
    for target in (30.0, 40.0, 50.0):
        plan = sc_cal.make_plan(cal, target)
        budget = 2.0 * 10 ** (-target / 20)
        assert plan.ops[0] == "C" and len(plan.ops) == n
        assert _plan_error(cal, plan.ops) <= budget * (1 + 1e-9)
        assert plan.predicted_psnr == pytest.approx(20 * math.log10(2.0 / _plan_error(cal, plan.ops)), abs=1e-6)
        fewest = min(c.count("C") for c in ("C" + "".join(b) for b in itertools.product("CR", repeat=n - 1))
                     if _runs_ok(c) and _plan_error(cal, c) <= budget * (1 + 1e-9))
        assert plan.computed == fewest, target
    assert sc_cal.make_plan(cal, 30.0, first=3).ops[:3] == "CCC"  # plain torch runs matched at step 3


def _runs_ok(ops: str) -> bool:
    return all(len(r) <= sc_cal.MAX_REUSE for r in ops.split("C"))


def test_calibrations_live_in_the_store_private_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    monkeypatch.setenv("AUTOCLOUD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AUTOCLOUD_CONFIG", str(tmp_path / "none.yaml"))
    sc.set_calibration_dir(None)
    assert sc.calibration_dir() == tmp_path / "cache" / ".autocloud" / "stepcache"
    sc_cal.use_store_dir(tmp_path / "store" / ".autocloud")  # what the ComfyUI nodes set: the running store's
    try:
        assert sc.calibration_dir() == tmp_path / "store" / ".autocloud" / "stepcache"
    finally:
        sc_cal.use_store_dir(None)


def test_unwritable_calibration_dir_keeps_working_in_memory(data: tuple, tmp_path: Any) -> None:
    x, y = data
    (tmp_path / "a-file").write_text("")
    sc.set_calibration_dir(tmp_path / "a-file" / "stepcache")  # cannot be created
    m = TinyDiT()
    sc.enable_cache(m)
    euler(m, x, y)
    euler(m, x, y)
    assert any(sc.state_of(m).last_run_decisions)  # the calibration is kept in memory
    err = sc.summary(m)["quality"]["error"]
    assert "cannot save calibration" in err and str(tmp_path / "a-file" / "stepcache") in err


def test_later_runs_correct_an_optimistic_calibration(calibration_dir: Any) -> None:
    """Planned runs check their computed steps against the calibration (the error a reuse would have made there);
    errors larger than calibrated scale the plan up for the next runs and are stored."""
    x, y = calib_data()
    m = FlowDiT(seed=2)
    sc.enable_cache(m)
    euler(m, x, y)  # calibration
    euler(m, x, y)  # follows the plan, checks it
    sc.disable_cache(m)
    f = sc_cal.calibration_file(sc_cal.fingerprint(m))
    (cal,) = f.items.values()
    assert cal.checks >= 2 and cal.gain < 1.3  # same images: the calibration holds
    for row in cal.err:  # a calibration 4x too optimistic (as one from easier images would be)
        for k in row:
            row[k] /= 4
    cal.check_log_sum, cal.checks = 0.0, 0
    sc.enable_cache(m)
    euler(m, x, y)
    fewer = sum(not d for d in sc.state_of(m).last_run_decisions)
    euler(m, x, y)  # starting, it folds the previous run's checks in: errors ~4x the calibration's
    assert cal.gain > 2.5
    assert sum(not d for d in sc.state_of(m).last_run_decisions) > fewer
    sc.disable_cache(m)
    stored = json.loads(f.path.read_text())["calibrations"][cal.key]
    assert stored["checks"] == cal.checks > 0 and math.exp(stored["check_log_sum"] / stored["checks"]) > 2.5
