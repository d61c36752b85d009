"""The benchmarks still run, at tiny sizes: a store rule (such as the format checks) once broke two of them
unnoticed, because nothing ran them between measurements. Figures are not checked here, only that each
script finishes and prints its result line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

CASES = {
    "startup": (["startup.py", "--rounds", "1"], "startup cmd=fetch_cached_--json"),
    "eviction_startup": (["eviction_startup.py", "--rows", "300"], "eviction-startup rows=300"),
    "cache_hit": (["cache_hit.py", "--size", "8M", "--n", "20"], "cache_hit size=8.0 MiB"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_benchmark_runs_at_a_tiny_size(name: str, tmp_path: Path) -> None:
    argv, expect = CASES[name]
    done = subprocess.run([sys.executable, str(BENCH / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, check=False)
    assert done.returncode == 0, f"bench/{argv[0]} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert expect in done.stdout, done.stdout[-2000:]
