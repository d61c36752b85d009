"""Benchmark: `autocloud fetch` as a user runs it vs aria2c and hf_transfer, same nginx, same run.

    python bench/download.py [--size 1G] [--quick] [--rounds 3] [--limit 40m]

Cases: (a) nginx `limit_rate 40m` per connection (how CDNs throttle), (b) no limit (loopback).
Every tool runs as a process, timed wall clock from start to exit:

- cli:         `autocloud --cache-dir DIR fetch URL --folder checkpoints --sha256 H --json` (start-up,
               probe, transfer, sha256 check, atomic rename, index; the JSON's sha256 is checked). With
               the default durability ("deferred") the flush is a detached process that waits out the
               kernel's writeback window: here it is told to wait an hour and is stopped before the next
               run, so it never lands inside another tool's timing (the `sync` before every run flushes
               every tool's writes alike, untimed);
- aria2c:      `aria2c -x16 -s16 -k1M` (no hash check, no fsync);
- hf_transfer: `python -c "hf_transfer.download(..., max_files=16, chunk_size=10 MiB)"` (likewise);
- library:     our `transfer.download()` called in this process (no start-up, no commit): the second line.

Rounds run the tools in rotating order; before every run the outputs are removed, dirty pages are
flushed (`sync`), the page cache is dropped (when /proc/sys/vm/drop_caches is writable) and the
origin's file is read back into it, so each run pays for its own writes and nobody profits from
another's cached pages (the CLI's Python modules are cold too, as for a user's first command).
Medians per tool. Prints per case: the CLI line (ratios = their time / ours), the library line, the
median CPU seconds of each process, and one extra `-v` CLI run's breakdown of where its time went.
The load average is printed first and last: on a shared machine the ratios move with it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

_spec = importlib.util.spec_from_file_location("_servers", ROOT / "tests" / "servers.py")
assert _spec is not None and _spec.loader is not None
servers = importlib.util.module_from_spec(_spec)
sys.modules["_servers"] = servers  # dataclasses look their module up while the class is built
_spec.loader.exec_module(servers)

from comfy_autocloud.transfer import TransferOptions, download  # noqa: E402
from comfy_autocloud.units import human_size, parse_size  # noqa: E402

HF_SCRIPT = ("import sys, hf_transfer; hf_transfer.download(url=sys.argv[1], filename=sys.argv[2], "
             "max_files=16, chunk_size=10485760)")


def drop_caches(keep: Path) -> bool:
    """Flush dirty pages, drop the page cache, read the origin's file back (the origin is not measured)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        dropped = True
    except OSError:
        dropped = False
    with open(keep, "rb") as f:
        while f.read(16 << 20):
            pass
    return dropped


def data_file(workdir: Path, size: int) -> tuple[Path, str]:
    path = workdir / "data" / f"bench-{size}.bin"
    sidecar = path.with_suffix(".sha256")
    if path.exists() and sidecar.exists() and path.stat().st_size == size:
        return path, sidecar.read_text().strip()
    digest = servers.write_random_file(path, size, seed=1234)
    sidecar.write_text(digest)
    return path, digest


ENV = {**os.environ, "AUTOCLOUD_SETTLE_DELAY": "3600"}


def autocloud_command() -> list[str]:
    """The installed `autocloud` script beside this interpreter (what a user runs), else the module."""
    exe = Path(sys.executable).parent / "autocloud"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "comfy_autocloud.cli.main"]


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


class Runner:
    """Times one tool per call, from a clean output folder and a dropped page cache."""

    def __init__(self, src: Path, want: str, size: int, out: Path) -> None:
        self.src, self.want, self.size, self.out = src, want, size, out
        self.dropped = False

    def fresh(self) -> None:
        servers.stop_background(self.out)
        shutil.rmtree(self.out, ignore_errors=True)
        self.out.mkdir(parents=True)
        self.dropped = drop_caches(self.src)

    def process(self, argv: list[str]) -> tuple[float, float, subprocess.CompletedProcess[str]]:
        """(wall seconds, CPU seconds, result) of one process."""
        self.fresh()
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        done = subprocess.run(argv, capture_output=True, text=True, check=False, env=ENV)
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[0]} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), done

    def cli(self, url: str, verbose: bool = False) -> tuple[float, float, subprocess.CompletedProcess[str]]:
        argv = [*autocloud_command(), *(["-v"] if verbose else []), "--cache-dir", str(self.out / "cache"),
                "fetch", url, "--folder", "checkpoints", "--sha256", self.want, "--json"]
        wall, cpu, done = self.process(argv)
        result = json.loads(done.stdout.strip().splitlines()[-1])
        assert result.get("sha256") == self.want and result.get("cached") is False, f"bad fetch: {result}"
        return wall, cpu, done

    def aria2c(self, url: str) -> tuple[float, float]:
        wall, cpu, _ = self.process(["aria2c", "-q", "-x16", "-s16", "-k1M", "--file-allocation=falloc",
                                     "--allow-overwrite=true", "-d", str(self.out), "-o", "aria.bin", url])
        assert (self.out / "aria.bin").stat().st_size == self.size
        return wall, cpu

    def hf_transfer(self, url: str) -> tuple[float, float]:
        wall, cpu, _ = self.process([sys.executable, "-c", HF_SCRIPT, url, str(self.out / "hf.bin")])
        assert (self.out / "hf.bin").stat().st_size == self.size
        return wall, cpu

    def library(self, url: str) -> tuple[float, float, int]:
        self.fresh()
        before = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        res = download(url, self.out / "ours.part", TransferOptions())
        wall = time.perf_counter() - t0
        after = resource.getrusage(resource.RUSAGE_SELF)
        assert res.sha256 == self.want, "our download is corrupt"
        return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), res.connections


def ratio(theirs: list[float], ours: list[float]) -> str:
    return f"{statistics.median(theirs) / statistics.median(ours):.2f}x" if theirs and ours else "n/a"


def med(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f}s" if xs else "n/a"


def run_case(label: str, url: str, runner: Runner, tools: list[str], rounds: int) -> None:
    wall: dict[str, list[float]] = {t: [] for t in tools}
    cpu: dict[str, list[float]] = {t: [] for t in tools}
    peaks: list[int] = []
    calls: dict[str, Callable[[], tuple[float, ...]]] = {
        "cli": lambda: runner.cli(url)[:2],
        "aria2c": lambda: runner.aria2c(url),
        "hf_transfer": lambda: runner.hf_transfer(url),
        "library": lambda: runner.library(url),
    }
    for r in range(rounds):
        for tool in tools[r % len(tools):] + tools[:r % len(tools)]:
            got = calls[tool]()
            wall[tool].append(got[0])
            cpu[tool].append(got[1])
            if tool == "library":
                peaks.append(int(got[2]))
    size = human_size(runner.size).replace(" ", "")
    print(f"download {label} size={size} cli={med(wall['cli'])} aria2c={med(wall.get('aria2c', []))} "
          f"hf_transfer={med(wall.get('hf_transfer', []))} "
          f"cli_vs_aria2c={ratio(wall.get('aria2c', []), wall['cli'])} "
          f"cli_vs_hf_transfer={ratio(wall.get('hf_transfer', []), wall['cli'])}", flush=True)
    print(f"  library ours={med(wall['library'])} peak_conns={max(peaks) if peaks else 0} "
          f"ratio_vs_aria2c={ratio(wall.get('aria2c', []), wall['library'])} "
          f"ratio_vs_hf_transfer={ratio(wall.get('hf_transfer', []), wall['library'])}", flush=True)
    print("  cpu " + " ".join(f"{t}={med(cpu[t])}" for t in tools), flush=True)
    _, _, done = runner.cli(url, verbose=True)
    lines = [ln for ln in done.stderr.splitlines() if " s = " in ln]
    print(f"  cli -v: {lines[-1].split(': ', 1)[-1] if lines else 'no breakdown printed'}", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--quick", action="store_true", help="256 MiB, one round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "autocloud-bench"))
    ap.add_argument("--limit", default="40m", help="nginx limit_rate per connection for case (a)")
    args = ap.parse_args()
    size = parse_size("256M" if args.quick else args.size)
    rounds = 1 if args.quick else max(1, args.rounds)
    workdir = Path(args.workdir)
    src, want = data_file(workdir, size)
    if shutil.which("nginx") is None:
        print("nginx not found: apt-get install -y nginx-light", file=sys.stderr)
        return 2
    tools = ["cli", "library"]
    if shutil.which("aria2c") is not None:
        tools.insert(1, "aria2c")
    if importlib.util.find_spec("hf_transfer") is not None:
        tools.append("hf_transfer")
    runner = Runner(src, want, size, workdir / "out")
    origin = servers.NginxOrigin(src.parent, workdir / "nginx", limit_rate=args.limit)
    origin.start()
    print(f"# load average {load()} on {os.cpu_count()} CPUs; tools {', '.join(tools)}; {rounds} rounds", flush=True)
    try:
        for label, prefix in ((f"limit={args.limit.upper()}B/s/conn", "slow/"), ("limit=none", "")):
            run_case(label, origin.url(prefix + src.name), runner, tools, rounds)
    finally:
        origin.stop()
        servers.stop_background(runner.out)
        shutil.rmtree(runner.out, ignore_errors=True)
    if not runner.dropped:
        print("# the page cache could not be dropped (not root): runs were not cold", flush=True)
    print(f"# load average {load()}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
