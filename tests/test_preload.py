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
from comfy_autocloud.preload.plan import load_plan  # noqa: E402
from comfy_autocloud.preload.registry import (  # noqa: E402
    BudgetExceeded,
    EntryState,
    LoadRequest,
    PreloadRegistry,
    derive_key,
)


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
    assert a.state == b.state == EntryState.READY
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
    assert reg.entry("diffusion_model:a.safetensors").state == EntryState.READY
    assert b.state == EntryState.FAILED and "RAM budget" in b.error
    with pytest.raises(BudgetExceeded):
        reg._get(req("b.safetensors"), preload=True)
    out = reg.get(req("b.safetensors"))  # a loader node still gets its model, it is just not kept
    assert isinstance(out, torch.nn.Module)
    assert reg.entry("diffusion_model:b.safetensors").state == EntryState.FAILED
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
    assert reg.entry("diffusion_model:a.safetensors").state == EntryState.LOADING
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
    assert [e.state for e in reg.entries()] == [EntryState.QUEUED, EntryState.QUEUED]
    reg.start()
    reg.get(req("b.safetensors"))  # needed now: loaded by this thread, not waiting for 'a' first
    assert reg.wait_idle(5)
    assert sorted(backend.loads) == [("a.safetensors",), ("b.safetensors",)]


def test_missing_file_fails_with_reason_and_others_load(models: Path) -> None:
    reg = PreloadRegistry(ModuleBackend(models))
    reg.preload([req("gone.safetensors"), req("a.safetensors")])
    gone = reg.entry("diffusion_model:gone.safetensors")
    assert gone.state == EntryState.FAILED and "FileNotFoundError" in gone.error
    assert reg.entry("diffusion_model:a.safetensors").state == EntryState.READY
    write_model(models / "gone.safetensors", 3)  # arrives later (downloaded): a loader gets and keeps it
    reg.get(req("gone.safetensors"))
    assert reg.entry("diffusion_model:gone.safetensors").state == EntryState.READY


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
