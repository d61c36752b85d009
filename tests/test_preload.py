"""Preload registry logic on plain torch modules (no ComfyUI): keys, reloads, budget, clones, concurrency."""

from __future__ import annotations

import copy
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

torch = pytest.importorskip("torch", reason="torch not installed: the preload registry tests need plain torch modules")
safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors not installed")

from comfy_autocloud.preload import snapshot  # noqa: E402
from comfy_autocloud.preload.held_models import (  # noqa: E402
    BudgetExceeded,
    HeldState,
    LoadRequest,
    PreloadRegistry,
    derive_key,
)
from comfy_autocloud.preload.load_requests import load_plan  # noqa: E402


def make_module(seed: int, width: int = 64) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.GELU(), torch.nn.Linear(width, 4))


def write_model(path: Path, seed: int, width: int = 64) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    safetensors_torch.save_file({k: v.contiguous() for k, v in make_module(seed, width).state_dict().items()},
                                str(path))
    return path


def clone_module(m: torch.nn.Module) -> torch.nn.Module:
    """Like ComfyUI's ModelPatcher.clone: shares the weight tensors, but replacing one on the clone
    (how a patch is applied) leaves the original's module tree alone."""
    c = copy.copy(m)
    c._parameters = dict(m._parameters)
    c._buffers = dict(m._buffers)
    c._modules = {k: clone_module(v) if v is not None else None for k, v in m._modules.items()}
    return c


class ModuleBackend:
    """Plain torch backend: files are safetensors state dicts of `make_module` models."""

    def __init__(self, root: Path, delay: float = 0.0) -> None:
        self.root = root
        self.delay = delay
        self.loads: list[tuple[str, ...]] = []
        self.lock = threading.Lock()

    def resolve(self, req: LoadRequest) -> list[Path]:
        paths = [self.root / f for f in req.files]
        for p in paths:
            if not p.is_file():
                raise FileNotFoundError(f"{p.name} not found in {self.root}")
        return paths

    def load(self, req: LoadRequest, paths: list[Path]) -> Any:
        with self.lock:
            self.loads.append(req.files)
        time.sleep(self.delay)
        sd = safetensors_torch.load_file(str(paths[0]))
        m = make_module(0, sd["0.weight"].shape[1])
        m.load_state_dict(sd)
        return m

    def clone(self, req: LoadRequest, value: Any) -> Any:
        return clone_module(value)

    def tensors(self, value: Any) -> dict[str, Any]:
        return dict(value.state_dict())

    def to_device(self, value: Any, device: str) -> str:
        target = "cuda" if device == "gpu" and torch.cuda.is_available() else "cpu"
        value.to(target)
        return target


@pytest.fixture
def models(tmp_path: Path) -> Path:
    write_model(tmp_path / "a.safetensors", 1)
    write_model(tmp_path / "b.safetensors", 2)
    return tmp_path


def req(name: str, **kw: Any) -> LoadRequest:
    return LoadRequest.make("diffusion_model", [name], {"weight_dtype": "default"}, **kw)


def test_keys_derived_from_names_options_and_identity(models: Path) -> None:
    reg = PreloadRegistry(ModuleBackend(models))
    reg.preload([req("a.safetensors"), req("b.safetensors", cache_key="my-b")])
    a = reg.entry("diffusion_model:a.safetensors")
    b = reg.entry("my-b")
    assert a is not None and b is not None
    assert a.state == b.state == HeldState.READY
    assert a.key.startswith("diffusion_model:a.safetensors@") and b.key == "my-b"
    other_opts = LoadRequest.make("diffusion_model", ["a.safetensors"], {"weight_dtype": "fp8_e5m2"})
    assert other_opts.slot != req("a.safetensors").slot
    assert derive_key(other_opts, a.identity) != a.key
    assert reg.status()["counts"]["ready"] == 2


def test_changed_file_is_reloaded_unchanged_is_not(models: Path) -> None:
    backend = ModuleBackend(models)
    reg = PreloadRegistry(backend)
    first = reg.get(req("a.safetensors"))
    again = reg.get(req("a.safetensors"))
    assert len(backend.loads) == 1
    assert torch.equal(first[0].weight, again[0].weight)
    old_key = reg.entry("diffusion_model:a.safetensors").key
    write_model(models / "a.tmp", 7)
    os.replace(models / "a.tmp", models / "a.safetensors")  # a new inode, like a finished download
    changed = reg.get(req("a.safetensors"))
    assert len(backend.loads) == 2
    assert not torch.equal(changed[0].weight, first[0].weight)
    assert reg.entry("diffusion_model:a.safetensors").key != old_key


def test_budget_refuses_preload_and_get_still_answers(models: Path) -> None:
    backend = ModuleBackend(models)
    one = os.path.getsize(models / "a.safetensors")
    reg = PreloadRegistry(backend, ram_budget=int(one * 1.5))
    reg.preload([req("a.safetensors"), req("b.safetensors")])
    b = reg.entry("diffusion_model:b.safetensors")
    assert reg.entry("diffusion_model:a.safetensors").state == HeldState.READY
    assert b.state == HeldState.FAILED and "RAM budget" in b.error
    with pytest.raises(BudgetExceeded):
        reg._get(req("b.safetensors"), preload=True)
    out = reg.get(req("b.safetensors"))  # a loader node still gets its model, it is just not kept
    assert isinstance(out, torch.nn.Module)
    assert reg.entry("diffusion_model:b.safetensors").state == HeldState.FAILED
    assert reg.status()["bytes_held"] <= reg.ram_budget


def test_clones_do_not_alter_the_base(models: Path) -> None:
    reg = PreloadRegistry(ModuleBackend(models), fingerprints=True)
    reg.preload([req("a.safetensors")])
    base = reg.entry("diffusion_model:a.safetensors").value
    before = base[0].weight.clone()
    c = reg.get(req("a.safetensors"))
    c[0].weight = torch.nn.Parameter(c[0].weight + 1.0)  # a patch, applied the way ComfyUI applies one
    assert torch.equal(base[0].weight, before)
    assert reg.verify("diffusion_model:a.safetensors") is True
    fresh = reg.get(req("a.safetensors"))
    assert torch.equal(fresh[0].weight, before)
    with torch.no_grad():  # writing the shared tensor in place is what the fingerprint catches
        fresh[0].weight.add_(1.0)
    assert reg.verify("diffusion_model:a.safetensors") is False


def test_concurrent_gets_while_loading_load_once(models: Path) -> None:
    backend = ModuleBackend(models, delay=0.5)
    reg = PreloadRegistry(backend)
    reg.start([req("a.safetensors")])
    time.sleep(0.1)
    assert reg.entry("diffusion_model:a.safetensors").state == HeldState.LOADING
    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(reg.get(req("a.safetensors")))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(results) == 6 and backend.loads == [("a.safetensors",)]
    assert reg.entry("diffusion_model:a.safetensors").hits == 6
    assert reg.wait_idle(5)


def test_get_claims_a_queued_entry_before_the_background_thread(models: Path) -> None:
    backend = ModuleBackend(models, delay=0.3)
    reg = PreloadRegistry(backend)
    reg.queue([req("a.safetensors"), req("b.safetensors")])
    assert [e.state for e in reg.entries()] == [HeldState.QUEUED, HeldState.QUEUED]
    reg.start()
    reg.get(req("b.safetensors"))  # needed now: loaded by this thread, not waiting for 'a' first
    assert reg.wait_idle(5)
    assert sorted(backend.loads) == [("a.safetensors",), ("b.safetensors",)]


def test_missing_file_fails_with_reason_and_others_load(models: Path) -> None:
    reg = PreloadRegistry(ModuleBackend(models))
    reg.preload([req("gone.safetensors"), req("a.safetensors")])
    gone = reg.entry("diffusion_model:gone.safetensors")
    assert gone.state == HeldState.FAILED and "FileNotFoundError" in gone.error
    assert reg.entry("diffusion_model:a.safetensors").state == HeldState.READY
    write_model(models / "gone.safetensors", 3)  # arrives later (downloaded): a loader gets and keeps it
    reg.get(req("gone.safetensors"))
    assert reg.entry("diffusion_model:gone.safetensors").state == HeldState.READY


def test_duplicate_cache_key_reported(models: Path) -> None:
    reg = PreloadRegistry(ModuleBackend(models))
    reg.queue([req("a.safetensors", cache_key="k"), req("b.safetensors", cache_key="k")])
    assert len(reg.entries()) == 1 and "already used" in reg.status()["config_errors"][0]


def test_plan_reports_broken_entry_and_keeps_others(tmp_path: Path) -> None:
    cfg = tmp_path / "preload_config.json"
    cfg.write_text(json.dumps({"version": "1.0", "models": {
        "checkpoints": [{"name": "ok.safetensors"}, {"nmae": "typo.safetensors"}],
        "diffusion_models": [{"model_name": "u.safetensors", "weight_dtype": "fp16"}],
        "vaes": [{"vae_name": "v.safetensors", "enabled": False}, {"vae_name": "w.safetensors"}]},
        "settings": {"auto_gpu_load": True}}))
    plan = load_plan(cfg)
    assert [r.name for r in plan.requests] == ["checkpoint:ok.safetensors", "vae:w.safetensors"]
    assert len(plan.errors) == 2
    assert "models.checkpoints[1]" in plan.errors[0] and "nmae" in plan.errors[0]
    assert "models.diffusion_models[0].weight_dtype" in plan.errors[1]
    assert plan.settings.auto_gpu_load is True


def test_snapshot_phases_on_cpu(models: Path) -> None:
    backend = ModuleBackend(models)
    reg = PreloadRegistry(backend)
    reg.queue([req("a.safetensors"), req("b.safetensors")])
    status = snapshot.load_all(device="cpu", registry=reg)  # before the snapshot: everything in RAM
    assert status["counts"]["ready"] == 2 and {e["device"] for e in status["entries"]} == {"cpu"}
    after = snapshot.to_gpu(registry=reg)  # after restore: GPU where there is one, else stays on the CPU
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert set(after["devices"].values()) == {expected}
    reg.get(req("a.safetensors"))
    assert len(backend.loads) == 2


def test_deleted_file_keeps_serving_the_memory_copy(models: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A held model whose file is deleted (or moved away) is still exactly what was loaded: serve it, say so once;
    a file that is there but changed is still reloaded."""
    backend = ModuleBackend(models)
    reg = PreloadRegistry(backend)
    reg.preload([req("a.safetensors"), req("b.safetensors")])
    before = reg.get(req("a.safetensors"))[0].weight.clone()
    (models / "a.safetensors").unlink()
    os.rename(models / "b.safetensors", models / "b-moved.safetensors")
    with caplog.at_level("WARNING", logger="comfy_autocloud.preload"):
        for _ in range(3):
            out = reg.get(req("a.safetensors"))
            assert torch.equal(out[0].weight, before)
            reg.get(req("b.safetensors"))
    assert len(backend.loads) == 2, "a deleted file must not be loaded (or fetched) again"
    gone = [r.getMessage() for r in caplog.records if "file gone from disk" in r.getMessage()]
    assert len(gone) == 2 and any("a.safetensors" in m for m in gone), gone  # once per entry
    st = {e["name"]: e for e in reg.status()["entries"]}
    a = st["diffusion_model:a.safetensors"]
    assert a["state"] == "ready" and a["file_missing"] is True and "serving the copy" in a["note"]
    assert a["hits"] == 4 and st["diffusion_model:b.safetensors"]["file_missing"] is True

    os.rename(models / "b-moved.safetensors", models / "b.safetensors")  # back, unchanged: no reload
    reg.get(req("b.safetensors"))
    b = reg.entry("diffusion_model:b.safetensors")
    assert b.file_missing is False and b.note is None and len(backend.loads) == 2

    write_model(models / "a.safetensors", 9)  # a different file under the name: reloaded as before
    changed = reg.get(req("a.safetensors"))
    assert len(backend.loads) == 3 and not torch.equal(changed[0].weight, before)
    assert reg.entry("diffusion_model:a.safetensors").file_missing is False


class GatedBackend(ModuleBackend):
    """Records, for every load, whether a 'prompt' (a foreground holder) was running at that moment."""

    def __init__(self, root: Path, delay: float = 0.0) -> None:
        super().__init__(root, delay)
        self.prompt_running = threading.Event()
        self.overlaps: list[tuple[str, ...]] = []
        self.load_started = threading.Event()
        self.threads: dict[tuple[str, ...], str] = {}

    def load(self, req: LoadRequest, paths: list[Path]) -> Any:
        self.load_started.set()
        self.threads[req.files] = threading.current_thread().name
        if self.prompt_running.is_set():
            self.overlaps.append(req.files)
        out = super().load(req, paths)
        if self.prompt_running.is_set():
            self.overlaps.append(req.files)
        return out


def test_background_preload_never_overlaps_a_running_prompt(models: Path) -> None:
    """ComfyUI's model management is not thread-safe (see preload/gate.py): the preload thread must not call a
    loader while the prompt worker executes. Here the 'prompt' holds the gate's foreground, as the wrapped
    PromptExecutor.execute does, and runs longer than a load; no load may start before it ends."""
    from comfy_autocloud.preload.gate import WorkGate

    gate = WorkGate()
    backend = GatedBackend(models, delay=0.05)
    reg = PreloadRegistry(backend, gate=gate)
    with gate.foreground():
        backend.prompt_running.set()
        reg.start([req("a.safetensors"), req("b.safetensors")])
        time.sleep(0.5)  # without the gate both loads would have run by now
        assert backend.loads == [] and {e.state for e in reg.entries()} == {HeldState.QUEUED}
        assert reg.status()["gate"]["foreground"] == 1
        backend.prompt_running.clear()
    assert reg.wait_idle(10)
    assert sorted(backend.loads) == [("a.safetensors",), ("b.safetensors",)] and backend.overlaps == []
    assert gate.background_waits >= 1


def test_prompt_arriving_mid_preload_waits_for_that_load_then_goes_first(models: Path) -> None:
    """A prompt queued while a model is being preloaded waits for that one load (it cannot stop half-way), then
    runs before the next preload step; a loader node in it needing an entry still queued loads it itself, one
    that was being preloaded is a hit: every file loaded once, no deadlock."""
    from comfy_autocloud.preload.gate import WorkGate

    gate = WorkGate()
    backend = GatedBackend(models, delay=0.4)
    reg = PreloadRegistry(backend, gate=gate)
    reg.start([req("a.safetensors"), req("b.safetensors")])
    assert backend.load_started.wait(5)
    t0 = time.monotonic()
    with gate.foreground():  # blocks until the running load of 'a' is done
        assert time.monotonic() - t0 > 0.1
        backend.prompt_running.set()
        assert reg.entry("diffusion_model:a.safetensors").state == HeldState.READY
        assert reg.entry("diffusion_model:b.safetensors").state == HeldState.QUEUED
        time.sleep(0.3)  # the preload thread is free to take 'b' now: it must not
        assert backend.loads == [("a.safetensors",)]
        reg.get(req("a.safetensors"))  # hit
        backend.prompt_running.clear()  # the loader node's own load is part of the prompt
        reg.get(req("b.safetensors"))  # claimed and loaded by the 'prompt' thread
        backend.prompt_running.set()
        assert backend.threads[("b.safetensors",)] == threading.current_thread().name
        backend.prompt_running.clear()
    assert reg.wait_idle(10)
    assert backend.loads == [("a.safetensors",), ("b.safetensors",)] and backend.overlaps == []


def test_background_waits_while_prompts_are_queued(models: Path) -> None:
    """busy() is ComfyUI's queue length: a queued prompt (not yet started) also keeps preloading back."""
    from comfy_autocloud.preload.gate import WorkGate

    queued = threading.Event()
    queued.set()
    gate = WorkGate(busy=queued.is_set, poll=0.02)
    backend = ModuleBackend(models)
    reg = PreloadRegistry(backend, gate=gate)
    reg.start([req("a.safetensors")])
    time.sleep(0.3)
    assert backend.loads == []
    queued.clear()
    assert reg.wait_idle(10) and backend.loads == [("a.safetensors",)]


def test_gate_reentry_and_foreground_inside_background(models: Path) -> None:
    """A loader call from a thread that already holds the gate (either side) never waits for itself."""
    from comfy_autocloud.preload.gate import WorkGate

    gate = WorkGate()
    reg = PreloadRegistry(ModuleBackend(models), gate=gate)
    done = threading.Event()

    def nested() -> None:
        with gate.foreground(), gate.foreground(), gate.background():
            reg.get(req("a.safetensors"))
        with gate.background(), gate.background(), gate.foreground():
            reg.get(req("b.safetensors"))
        done.set()

    t = threading.Thread(target=nested, daemon=True)
    t.start()
    assert done.wait(10), "deadlock"
    assert gate.wait_quiet(1) and gate.state()["background"] is False


def test_startup_phases_warm_up_inside_the_gate(models: Path) -> None:
    """auto_gpu_load: after the loads, each entry is put on its device and warmed up, as one background step each
    (the warm-up runs ComfyUI code too); `phase` says when a first prompt would pay none of it."""
    from comfy_autocloud.preload.gate import WorkGate

    gate = WorkGate()
    seen: list[tuple[str, bool, str]] = []

    class Warming(ModuleBackend):
        def warm_up(self, req: LoadRequest, value: Any) -> list[str]:
            seen.append((req.files[0], bool(gate.state()["background"]), reg.phase))
            value(torch.zeros(1, value[0].in_features))
            return ["forward"]

    reg = PreloadRegistry(Warming(models), gate=gate)
    reg.queue([req("a.safetensors"), req("b.safetensors")])
    assert reg.status()["phase"] == "idle"
    reg.startup(auto_gpu_load=True)
    assert seen == [("a.safetensors", True, "device"), ("b.safetensors", True, "device")]
    st = reg.status()
    assert st["phase"] == "ready" and all(e["warmed"] == ["forward"] for e in st["entries"])
    reg.warm_up = False
    reg.to_device("gpu")
    assert len(seen) == 2


def test_startup_warms_the_executor_last_and_reports_it(models: Path) -> None:
    """The adapter's executor warm-up (`then`) runs after the loads and the device step, in phase 'executor';
    what it returns is in the status; 'ready' only comes after it."""
    reg = PreloadRegistry(ModuleBackend(models))
    reg.queue([req("a.safetensors")])
    phases: list[tuple[str, int]] = []

    def then() -> dict[str, Any]:
        phases.append((reg.phase, reg.status()["counts"]["ready"]))
        return {"seconds": 0.01, "error": None}

    reg.startup(auto_gpu_load=True, then=then)
    assert phases == [("executor", 1)]
    st = reg.status()
    assert st["phase"] == "ready" and st["executor_warmup"] == {"seconds": 0.01, "error": None}
    assert PreloadRegistry(ModuleBackend(models)).status()["executor_warmup"] is None


def test_executor_warmup_outside_comfyui_reports_why_and_never_raises() -> None:
    from comfy_autocloud.comfy.executor_warmup import warm_executor
    from comfy_autocloud.preload.gate import WorkGate

    gate = WorkGate()
    result = warm_executor(gate)
    assert result.error is not None and "execution" in result.error and result.execute_seconds == 0
    assert gate.wait_quiet(1), "the gate was left held"
