"""Multi-device sampling on CPU with gloo: 2 and 4 real worker processes running a tiny Flux-architecture DiT.

The worker groups are started once per module (spawning and initialising torch.distributed is the
slow part) and reused by every test, which is also what the product does across prompts.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (pip install comfyui-autocloud[torch])")

from comfy_autocloud.parallel.attention import balanced_split, merge_attention  # noqa: E402
from comfy_autocloud.parallel.cfg import plan_for  # noqa: E402
from comfy_autocloud.parallel.flux_sp import FluxDiT, flux_forward, tiny_flux_config  # noqa: E402
from comfy_autocloud.parallel.shm import SharedWeights, memory_status  # noqa: E402
from comfy_autocloud.parallel.workers import (  # noqa: E402
    ParallelConfig,
    WorkerDiedError,
    WorkerGroup,
    get_worker_group,
    shutdown_all_groups,
)

ATOL = 1e-5


def make_model(heads: int = 4, hidden: int = 64, depth: int = 2, single: int = 2, seed: int = 0) -> FluxDiT:
    torch.manual_seed(seed)
    model = FluxDiT(tiny_flux_config(hidden=hidden, heads=heads, depth=depth, single=single))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    return model.eval()


def make_inputs(batch: int = 2, h: int = 10, w: int = 14, txt: int = 7, seed: int = 1) -> dict:
    """h=10, w=14 -> 5x7 = 35 image tokens: not divisible by 2 or 4, so shards are uneven."""
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(batch, 4, h, w, generator=g), timestep=torch.rand(batch, generator=g),
                context=torch.randn(batch, txt, 48, generator=g), y=torch.randn(batch, 32, generator=g),
                guidance=torch.full((batch,), 3.5))


def share(model: FluxDiT) -> SharedWeights:
    return SharedWeights.pack(model, rebind=True, meta={"builder": "flux", "config": asdict(model.params)})


@pytest.fixture(scope="module")
def groups() -> Iterator[dict[int, WorkerGroup]]:
    # The process-wide registry's groups: the ComfyUI wrapper test below gets the same ones.
    made = {n: get_worker_group(("cpu",) * n, threads_per_rank=1) for n in (2, 4)}
    starters = [threading.Thread(target=g.ensure_started) for g in made.values()]
    for t in starters:
        t.start()
    for t in starters:
        t.join()
    try:
        yield made
    finally:
        shutdown_all_groups()


@pytest.fixture(scope="module")
def models(groups: dict[int, WorkerGroup]) -> dict[str, tuple[FluxDiT, SharedWeights]]:
    out = {"h4": make_model(heads=4), "h3": make_model(heads=3, hidden=48, seed=2)}
    shared = {}
    for key, model in out.items():
        sw = share(model)
        shared[key] = (model, sw)
        for g in groups.values():
            g.register(key, sw)
    return shared


@pytest.mark.parametrize("ranks", [2, 4])
@pytest.mark.parametrize(("strategy", "key", "expect"), [
    ("ulysses", "h4", "ulysses x"),
    ("ring", "h4", "ring x"),
    ("ulysses", "h3", "ring x"),  # 3 heads do not divide 2 or 4 ranks: falls back to ring, says so
    ("cfg", "h4", "cfg x2"),      # 2 ranks: pure CFG parallel; 4 ranks: CFG x2 + Ulysses x2
    ("cfg", "h3", "cfg x2"),      # 4 ranks: CFG x2 + ring x2
])
def test_parallel_equals_single_process(groups, models, ranks, strategy, key, expect) -> None:
    model, _ = models[key]
    inputs = make_inputs()
    with torch.inference_mode():
        ref = flux_forward(model, **inputs)
    out, plan = groups[ranks].forward(key, inputs, strategy)
    assert expect in plan
    if strategy == "cfg" and ranks == 4:
        assert ("ulysses x2" if key == "h4" else "ring x2") in plan
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_cfg_falls_back_to_sequence_parallel_for_odd_batch(groups, models) -> None:
    model, _ = models["h4"]
    inputs = make_inputs(batch=1, h=8, w=8, txt=5)
    with torch.inference_mode():
        ref = flux_forward(model, **inputs)
    out, plan = groups[4].forward("h4", inputs, "cfg")
    assert plan.startswith("ulysses x4") and "no cond/uncond pair" in plan
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)


def test_weights_are_shared_not_copied(groups) -> None:
    """A 24 MiB model: every rank maps the dispatcher's one shm block; no rank's private memory grows by it."""
    big = make_model(heads=4, hidden=256, depth=2, single=4, seed=3)
    sw = share(big)
    assert sw.nbytes > 20 * 2**20
    name = sw.shm_name()
    assert name and "torch_" in name
    # The dispatcher's own module now lives in the block too (one host copy).
    assert all(sw.buffer.data_ptr() <= p.data_ptr() < sw.buffer.data_ptr() + sw.nbytes for p in big.parameters())
    g = groups[2]
    before = {i["rank"]: i["memory"] for i in g.info()}
    g.register("big", sw)
    out, _ = g.forward("big", make_inputs(), "ulysses")
    with torch.inference_mode():
        torch.testing.assert_close(out, flux_forward(big, **make_inputs()), atol=ATOL, rtol=0)
    after = g.info()
    for info in after:
        m = info["models"]["big"]
        assert m["shm"] == [name], "each rank maps the same shared-memory block"
        assert m["ptrs_in_buffer"], "parameters are views of the block, not copies"
        grown = info["memory"]["RssAnon"] - before[info["rank"]]["RssAnon"]
        assert grown < sw.nbytes / 2, f"rank {info['rank']} private memory grew by {grown} bytes"
        assert info["memory"]["RssShmem"] >= sw.nbytes * 0.9
    g.unregister("big")


def test_group_is_reused_across_runs(groups, models) -> None:
    g = groups[4]
    gen, pids = g.generation, g.pids
    for _ in range(3):
        g.forward("h4", make_inputs(seed=5), "auto")
    infos = g.info()
    assert g.generation == gen and g.pids == pids
    assert [i["init_count"] for i in infos] == [1] * 4, "torch.distributed initialised once per worker"


def test_killed_worker_gives_clear_error_and_next_run_works(groups, models) -> None:
    g = groups[2]
    model, _ = models["h4"]
    gen, pids = g.generation, g.pids
    big_inputs = make_inputs(batch=1, h=64, w=64, txt=16)
    killer = threading.Timer(1.0, os.kill, args=(pids[1], signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(WorkerDiedError) as err:
        g.bench("h4", big_inputs, "ulysses", steps=100000)
    killer.join()
    msg = str(err.value)
    assert f"rank 1 (pid {pids[1]}" in msg and "SIGKILL" in msg and "'bench'" in msg and "next run" in msg
    assert time.monotonic() - t0 < 30
    assert not g.alive
    # The next run restarts the group, re-sends the weights handle and is correct.
    inputs = make_inputs()
    out, _ = g.forward("h4", inputs, "ring")
    with torch.inference_mode():
        torch.testing.assert_close(out, flux_forward(model, **inputs), atol=ATOL, rtol=0)
    assert g.generation == gen + 1 and set(g.pids).isdisjoint(pids)
    assert [i["init_count"] for i in g.info()] == [1, 1]


def test_worker_exception_is_reported_with_rank_and_group_survives(groups, models) -> None:
    g = groups[2]
    pids = g.pids
    with pytest.raises(Exception, match="no weights registered"):
        g.forward("missing", make_inputs(), "auto")
    bad = make_inputs()
    bad["context"] = bad["context"][:, :, :10]  # wrong width: every rank raises the same error
    with pytest.raises(Exception, match=r"(?s)^parallel .forward. failed:\nrank 0: .*mat1 and mat2"):
        g.forward("h4", bad, "ulysses")
    assert g.pids == pids
    g.forward("h4", make_inputs(), "ulysses")


# ---------------------------------------------------------------------------------------------- no processes

def test_plan_for() -> None:
    assert plan_for(2, "auto", 24, 2).describe() == "cfg x2"
    assert plan_for(4, "auto", 24, 2).describe() == "cfg x2 + ulysses x2"
    assert plan_for(4, "auto", 24, 1).describe() == "ulysses x4"
    assert plan_for(4, "ulysses", 3, 1).attention == "ring"
    assert "do not divide" in plan_for(4, "ulysses", 3, 1).note
    assert plan_for(2, "ring", 24, 2).describe() == "ring x2"
    with pytest.raises(ValueError, match="unknown parallel strategy 'bogus'"):
        plan_for(2, "bogus", 24, 1)


def test_balanced_split_and_merge() -> None:
    assert balanced_split(35, 4) == [9, 9, 9, 8]
    assert balanced_split(3, 4) == [1, 1, 1, 0]
    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    from comfy_autocloud.parallel.attention import attention_with_lse

    o1, l1 = attention_with_lse(q, k[:, :, :2], v[:, :, :2])
    o2, l2 = attention_with_lse(q, k[:, :, 2:], v[:, :, 2:])
    merged, _ = merge_attention(o1, l1, o2, l2)
    torch.testing.assert_close(merged, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=0)
    from comfy_autocloud.parallel.attention import math_attention_with_lse

    mo, ml = math_attention_with_lse(q, k, v, chunk=2)  # the kernel used where no fused one returns the LSE
    fo, fl = attention_with_lse(q, k, v)
    torch.testing.assert_close(mo, fo, atol=1e-6, rtol=0)
    torch.testing.assert_close(ml, fl, atol=1e-5, rtol=0)


def test_parallel_config_parse() -> None:
    assert ParallelConfig.parse("cpu", 4).devices == ("cpu",) * 4
    assert ParallelConfig.parse("cuda:0, cuda:1", 0, "ring").devices == ("cuda:0", "cuda:1")
    assert ParallelConfig.parse("cpu:0,cpu:1,cpu:2", 2).world_size == 2
    with pytest.raises(ValueError, match="world_size 3 is larger than the 2 devices"):
        ParallelConfig.parse("cpu:0,cpu:1", 3)
    with pytest.raises(ValueError, match="mixed device types"):
        ParallelConfig.parse("cpu,cuda:0")
    with pytest.raises(RuntimeError):
        ParallelConfig.parse("tpu:banana")


def test_shared_weights_roundtrip_and_dedupe() -> None:
    lin = torch.nn.Linear(8, 8)
    sd = {"a": lin.weight.detach(), "b": lin.weight.detach(), "c": lin.bias.detach(), "h": torch.ones(3).half()}
    sw = SharedWeights.pack(sd)
    views = sw.unpack()
    assert views["a"].data_ptr() == views["b"].data_ptr()
    for k, t in sd.items():
        assert torch.equal(views[k], t) and views[k].dtype == t.dtype
    assert sw.buffer.is_shared()
    assert memory_status()["VmRSS"] > 0


class _StockExecutor:
    """Stands in for ComfyUI's WrapperExecutor: ``class_obj`` is the diffusion model, calling it is the stock path."""

    def __init__(self, model: FluxDiT) -> None:
        self.class_obj = model
        self.calls = 0

    def __call__(self, x, timestep, context, y, guidance, ref_latents, control, transformer_options, **kw):
        self.calls += 1
        return flux_forward(self.class_obj, x, timestep, context, y, guidance)


def test_comfy_wrapper_dispatches_and_falls_back_per_call(groups, models) -> None:
    from comfy_autocloud.comfy.parallel_runner import ParallelRunner, apply_parallel, unsupported_reason

    model = make_model(seed=9)
    runner = ParallelRunner(ParallelConfig(("cpu", "cpu"), "auto", threads_per_rank=1))
    assert runner.group is groups[2]
    ex = _StockExecutor(model)
    inputs = make_inputs()
    with torch.inference_mode():
        ref = flux_forward(model, **inputs)
    out = runner(ex, inputs["x"], inputs["timestep"], inputs["context"], inputs["y"], inputs["guidance"], None,
                 None, {})
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert ex.calls == 0
    # the dispatcher's module now lives in the shared block: one host copy of the weights
    key = runner.key
    assert key is not None and runner.group._models[key].buffer.is_shared()
    out = runner(ex, inputs["x"], inputs["timestep"], inputs["context"], inputs["y"], inputs["guidance"], None,
                 {"input": []}, {})
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=0)
    assert ex.calls == 1
    assert runner.summary() == "1 model calls on 2 ranks (cfg x2); 1 calls ran the stock forward because of " \
                               "ControlNet inputs"
    # a later prompt (new runner, same loaded model) reuses the registered block: no second copy
    registered = len(runner.group._models)
    again = ParallelRunner(ParallelConfig(("cpu", "cpu"), "auto", threads_per_rank=1))
    again(ex, inputs["x"], inputs["timestep"], inputs["context"], inputs["y"], inputs["guidance"], None, None, {})
    assert again.key == key and len(runner.group._models) == registered
    # a changed weight set (LoRA-like) replaces the old block
    with torch.no_grad():
        model.img_in.weight.data = model.img_in.weight.data + 0.01
    again(ex, inputs["x"], inputs["timestep"], inputs["context"], inputs["y"], inputs["guidance"], None, None, {})
    assert again.key != key and not runner.group.has_model(key) and runner.group.has_model(again.key)
    assert len(runner.group._models) == registered
    # the model going away (ComfyUI unloaded it) frees its block; the workers drop it on the next call
    last = again.key
    del model, ex, runner, again
    import gc

    gc.collect()
    assert not groups[2].has_model(last)
    groups[2].forward("h4", make_inputs(), "auto")
    assert last not in groups[2]._live.loaded
    # without ComfyUI objects: the stock path, with the reason
    assert unsupported_reason(object()) == "object is not a ComfyUI MODEL"
    same, none, why = apply_parallel("model", ParallelConfig(("cpu",)))
    assert same == "model" and none is None and why == "one device (cpu): stock sampling"


def test_nodes_without_comfyui_and_no_torch_on_import() -> None:
    from comfy_autocloud.comfy import nodes_parallel
    from comfy_autocloud.parallel.cfg import STRATEGIES

    assert nodes_parallel.STRATEGIES == STRATEGIES
    (cfg,) = nodes_parallel.AutoCloudParallelDispatcher().build("cpu", "ring", 4)
    assert cfg == ParallelConfig(("cpu",) * 4, "ring")
    with pytest.raises(ValueError, match="unknown strategy 'x'"):
        nodes_parallel.AutoCloudParallelDispatcher().build("cpu", "x", 2)
    code = ("import sys, comfy_autocloud.parallel, comfy_autocloud.comfy.nodes_parallel as n; "
            "n.AutoCloudParallelDispatcher.INPUT_TYPES(); assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
