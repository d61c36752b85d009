"""`autocloud` start-up as a user meets it: wall clock of whole processes, medians of N rounds.

Times `autocloud --help`, `--version`, `status --json` and `fetch URL --json` of a file already in the
cache, each in a fresh interpreter, and the floor every Python command pays (`python -c pass`).
With `--baseline-src DIR` (another checkout's `src`; the tree before the start-up work is
`git archive f3d6dcf src | tar -x -C /tmp/before`) both trees run alternately in the same rounds and the
ratio baseline/ours is printed last (>1: ours starts faster). Targets (issue 14): --help <= 0.15 s, a
cached fetch <= 0.25 s. One line per command, ratio last; `aria2c --version` (when installed) is the
plain tool's start-up for comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC.parent / "tests"))

from servers import random_safetensors  # noqa: E402  (a valid file: the store checks a model's format)

MAIN = "import sys; from comfy_autocloud.cli.main import main; sys.exit(main())"
TARGETS = {"--help": 0.15, "fetch_cached --json": 0.25}


def _run(argv: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[3:]) or argv}: exit {proc.returncode}: {err.strip()[-400:]}")
    return wall, usage.ru_utime + usage.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--baseline-src", type=Path, default=None, help="another tree's src to compare with")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="autocloud-startup-") as tmp:
        work = Path(tmp)
        model = work / "origin" / "tiny.safetensors"
        model.parent.mkdir()
        model.write_bytes(random_safetensors(1 << 20))
        trees = {"ours": SRC, **({"baseline": args.baseline_src.resolve()} if args.baseline_src else {})}
        envs = {}
        for name, src in trees.items():
            envs[name] = {**os.environ, "PYTHONPATH": str(src), "AUTOCLOUD_CACHE": str(work / f"cache-{name}"),
                          "XDG_CONFIG_HOME": str(work / "config")}
        fetch = ["fetch", model.as_uri(), "--folder", "checkpoints", "--json"]
        cases = {"--help": ["--help"], "--version": ["--version"], "status --json": ["status", "--json"],
                 "fetch_cached --json": fetch}
        for env in envs.values():  # the file enters each cache once; every timed fetch is a hit
            _run([sys.executable, "-c", MAIN, *fetch], env)
        floor = statistics.median(_run([sys.executable, "-c", "pass"], envs["ours"])[0] for _ in range(args.rounds))
        aria2c = shutil.which("aria2c")
        plain = (statistics.median(_run([aria2c, "--version"], envs["ours"])[0] for _ in range(args.rounds))
                 if aria2c else None)
        for label, cmd in cases.items():
            samples: dict[str, list[tuple[float, float]]] = {name: [] for name in envs}
            for i in range(args.rounds):
                order = list(envs) if i % 2 == 0 else list(reversed(envs))  # alternate who goes first
                for name in order:
                    samples[name].append(_run([sys.executable, "-c", MAIN, *cmd], envs[name]))
            wall = {name: statistics.median(w for w, _ in got) for name, got in samples.items()}
            cpu = {name: statistics.median(c for _, c in got) for name, got in samples.items()}
            fields = [f"startup cmd={label.replace(' ', '_')}", f"ours={wall['ours']:.3f}s",
                      f"ours_cpu={cpu['ours']:.3f}s"]
            if "baseline" in wall:
                fields += [f"baseline={wall['baseline']:.3f}s", f"baseline_cpu={cpu['baseline']:.3f}s"]
            fields += [f"python_pass={floor:.3f}s"] + ([f"aria2c_version={plain:.3f}s"] if plain is not None else [])
            fields.append(f"target<={TARGETS[label]}s" if label in TARGETS else "")
            if "baseline" in wall:
                fields.append(f"ratio_vs_baseline={wall['baseline'] / wall['ours']:.2f}")
            print(" ".join(f for f in fields if f), flush=True)

if __name__ == "__main__":
    main()
