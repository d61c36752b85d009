"""The README's first command: `autocloud demo` runs offline end to end and tells the truth about it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from comfy_autocloud.demo.models import read_safetensors_header, write_safetensors


def test_generated_files_are_real_safetensors(tmp_path: Path) -> None:
    from safetensors.numpy import load_file

    sha = write_safetensors(tmp_path / "m.safetensors", 3 * 2**20 + 5, seed=1)
    assert (tmp_path / "m.safetensors").stat().st_size == 3 * 2**20 + 5
    assert len(sha) == 64
    tensors = load_file(str(tmp_path / "m.safetensors"))
    header = read_safetensors_header(tmp_path / "m.safetensors")
    assert tensors["weight"].shape == tuple(header["weight"]["shape"])  # type: ignore[index]


def test_demo_end_to_end(tmp_path: Path) -> None:
    env = {**os.environ, "AUTOCLOUD_CONFIG": str(tmp_path / "none.yaml")}
    p = subprocess.run([sys.executable, "-m", "comfy_autocloud.cli.main", "demo", "--dir", str(tmp_path / "d"),
                        "--json"], capture_output=True, text=True, timeout=240, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["files"] == 6
    assert summary["evicted"], "the demo must show an eviction"
    assert "checkpoints/demo-sd15-tiny.safetensors" not in summary["evicted"]  # pinned
    assert summary["usage_bytes"] <= summary["cap"]
    assert summary["origin_bytes"] == summary["bytes_downloaded"]  # nothing fetched twice
    assert summary["hit_ms"] < 50
    assert "Demo done" in p.stderr
    cache = tmp_path / "d" / "cache"
    assert (cache / "checkpoints" / "demo-sdxl-tiny.safetensors").is_file()
    assert not list(cache.rglob("*.part"))
