"""The RunPod wrappers pick an interpreter that can run the commands, or say clearly why none can.

A fresh machine's own python3 lacks rich/aiohttp/pydantic: these tests never rely on it. They build
interpreters with known contents (an empty venv, wrapper scripts around this venv's Python) and put
them where the wrappers look.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from comfy_autocloud.cli.deps import CORE_MODULES, missing_modules

REPO = Path(__file__).resolve().parents[1]
WARMUP = REPO / "runpod" / "warmup.sh"


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An interpreter with none of the project's dependencies (a venv without site packages)."""
    d = tmp_path_factory.mktemp("bare-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(d)], check=True, timeout=120)
    py = d / "bin" / "python"
    assert subprocess.run([py, "-c", "import rich"], capture_output=True).returncode != 0
    return py


def _wrapper(path: Path, target: str) -> Path:
    """An executable that runs `target` (stands in for a venv's python or a PATH python3)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'#!/bin/sh\nexec "{target}" "$@"\n')
    path.chmod(0o755)
    return path


def _env(tmp: Path, path_dirs: list[Path], **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "AUTOCLOUD_PYTHON", "COMFYUI_PATH"}}
    # Only our own directories and the system's tools: no python3 from the developer's PATH.
    env["PATH"] = os.pathsep.join([*map(str, path_dirs), "/usr/bin", "/bin"])
    env["HOME"] = str(tmp)
    env["COMFYUI_PATH"] = str(tmp / "ComfyUI")
    env.update(extra)
    return env


def _which_python(tmp: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """Source the wrappers' env script and print the interpreter it chose."""
    script = f'source "{REPO / "runpod" / "_autocloud_env.sh"}"; echo "chosen=$PYTHON"'
    return subprocess.run(["bash", "-c", script], env=env, capture_output=True, text=True, timeout=60, cwd=tmp)


def test_core_modules_list_matches_pyproject() -> None:
    tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from Python 3.11")
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = {d.split(">")[0].split("=")[0].split("<")[0].strip().lower() for d in deps}
    assert names == set(CORE_MODULES.values())
    assert missing_modules() == []


def test_interpreter_without_dependencies_gets_a_clear_error(tmp_path: Path, bare_python: Path) -> None:
    env = _env(tmp_path, [], AUTOCLOUD_PYTHON=str(bare_python))
    r = subprocess.run(["bash", str(WARMUP), "--list"], env=env, capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert str(bare_python) in r.stderr
    for dist in ("aiohttp", "pydantic", "click", "rich", "pyyaml"):
        assert dist in r.stderr
    assert "pip install comfyui-autocloud" in r.stderr and "AUTOCLOUD_PYTHON" in r.stderr


def test_autocloud_python_that_does_not_exist_is_named(tmp_path: Path) -> None:
    env = _env(tmp_path, [], AUTOCLOUD_PYTHON=str(tmp_path / "nope" / "python"))
    r = _which_python(tmp_path, env)
    assert r.returncode == 1 and "nope/python: not an executable" in r.stderr


def test_autocloud_python_is_used_when_it_works(tmp_path: Path, bare_python: Path) -> None:
    _wrapper(tmp_path / "bin" / "python3", str(bare_python))
    env = _env(tmp_path, [tmp_path / "bin"], AUTOCLOUD_PYTHON=sys.executable)
    r = _which_python(tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"chosen={sys.executable}"


def test_global_python3_without_dependencies_is_passed_over_for_the_autocloud_entry_point(
        tmp_path: Path, bare_python: Path) -> None:
    bindir = tmp_path / "bin"
    _wrapper(bindir / "python3", str(bare_python))
    entry = bindir / "autocloud"
    entry.write_text(f"#!{sys.executable}\nimport sys\n")
    entry.chmod(0o755)
    r = _which_python(tmp_path, _env(tmp_path, [bindir]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"chosen={sys.executable}"


def test_comfyui_venv_comes_before_python3(tmp_path: Path, bare_python: Path) -> None:
    bindir = tmp_path / "bin"
    _wrapper(bindir / "python3", str(bare_python))
    venv_py = _wrapper(tmp_path / "ComfyUI" / "venv" / "bin" / "python", sys.executable)
    r = _which_python(tmp_path, _env(tmp_path, [bindir]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"chosen={venv_py}"


def test_every_candidate_lacking_something_is_listed(tmp_path: Path, bare_python: Path) -> None:
    bindir = tmp_path / "bin"
    _wrapper(bindir / "python3", str(bare_python))
    venv_py = _wrapper(tmp_path / "ComfyUI" / "venv" / "bin" / "python", str(bare_python))
    r = _which_python(tmp_path, _env(tmp_path, [bindir]))
    assert r.returncode == 1
    assert f"{venv_py}: missing aiohttp" in r.stderr
    assert f"{bindir / 'python3'}: missing aiohttp" in r.stderr
