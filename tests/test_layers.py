"""The layer rules of docs/architecture.md, checked on the source: imports point down, only
`comfy_autocloud.comfy` imports ComfyUI, the core never imports torch.

Read from the syntax tree (every import, also those inside functions), so a lazy import that breaks a
rule is caught as well as a top-level one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "comfy_autocloud"

# Rank of each top-level package/module of comfy_autocloud: a module may import only lower ranks
# (and its own package). docs/architecture.md draws the same table.
LAYERS: dict[str, int] = {
    # 0: small helpers everything may use
    "__init__": 0, "errors": 0, "units": 0, "redact": 0, "keys": 0, "fsutil": 0, "progress": 0,
    "aiothread": 0, "lazy": 0, "phases": 0, "detach": 0,
    # 1: settings (flag > environment > file > default)
    "config": 1,
    # 2: pure data: every input format -> ModelSpec
    "manifest": 2,
    # 3: bytes: the download engine; 4: what sits on it (sources) and the local cache (store)
    "transfer": 3,
    "sources": 4, "store": 4,
    # 5: the fleet's registry, leases, peer client/server (files from other nodes)
    "fleet": 5,
    # 6: the fetch service: ensure(spec) -> Path
    "fetch": 6,
    # 7: features built on fetch/store, or torch features that need nothing below
    "warmup": 7, "prefetch": 7, "preload": 7, "stepcache": 7, "parallel": 7, "doctor": 7,
    # 8: the one place that wires settings to services
    "services": 8,
    # 9: the faces: the CLI (with its offline demo) and the ComfyUI adapter
    "cli": 9, "demo": 9, "comfy": 9,
}
# Same-rank imports that are part of the design: the demo is a CLI command and draws with the CLI's views.
SAME_RANK_ALLOWED = {("demo", "cli"), ("cli", "demo")}

COMFYUI_MODULES = {"comfy", "folder_paths", "nodes", "server", "execution", "comfy_execution", "comfy_extras",
                   "comfy_api", "latent_preview", "node_helpers", "app", "main"}
TORCH_MODULES = {"torch", "diffusers", "transformers", "safetensors", "xfuser", "numpy"}
# The core: what runs in the CLI, the warmup, the fleet sidecar; never torch.
CORE = {name for name, rank in LAYERS.items() if rank <= 6} | {"warmup", "services", "cli", "demo"}


def _modules() -> Iterator[tuple[Path, str]]:
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        top = rel.parts[0].removesuffix(".py")
        yield path, top


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in the file, relative ones resolved."""
    rel = path.relative_to(SRC.parent).with_suffix("")
    package = list(rel.parts[:-1])
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                yield node.lineno, ".".join(base + ([node.module] if node.module else []))
            elif node.module:
                yield node.lineno, node.module


def _top_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_package_has_a_layer() -> None:
    unknown = sorted({top for _, top in _modules()} - set(LAYERS))
    assert not unknown, f"add these to LAYERS here and to docs/architecture.md: {unknown}"


def test_imports_point_down() -> None:
    wrong = []
    for path, top in _modules():
        for line, module in _imports(path):
            if not module.startswith("comfy_autocloud"):
                continue
            target = _top_of(module)
            if target == top or target not in LAYERS:
                continue
            if LAYERS[target] < LAYERS[top] or (top, target) in SAME_RANK_ALLOWED:
                continue
            wrong.append(f"{path.relative_to(SRC)}:{line} ({top}, layer {LAYERS[top]}) imports {module} "
                         f"(layer {LAYERS[target]})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_only_the_comfy_package_imports_comfyui() -> None:
    wrong = [f"{path.relative_to(SRC)}:{line} imports {module}"
             for path, top in _modules() if top != "comfy"
             for line, module in _imports(path) if module.split(".")[0] in COMFYUI_MODULES]
    assert not wrong, "ComfyUI imported outside comfy_autocloud/comfy:\n" + "\n".join(wrong)


def test_the_core_never_imports_torch() -> None:
    wrong = [f"{path.relative_to(SRC)}:{line} imports {module}"
             for path, top in _modules() if top in CORE
             for line, module in _imports(path) if module.split(".")[0] in TORCH_MODULES]
    assert not wrong, "torch-family imports in the core:\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", ["comfy_autocloud.cli.main", "comfy_autocloud.fetch", "comfy_autocloud.store"])
def test_core_imports_at_run_time_load_no_torch_and_no_comfyui(module: str) -> None:
    import subprocess
    import sys

    code = (f"import sys, {module}; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{sorted(TORCH_MODULES | COMFYUI_MODULES)!r}); print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, f"importing {module} loaded {r.stdout.strip()} {r.stderr[-500:]}"
