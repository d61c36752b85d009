"""Warmup as a user runs it: `autocloud warmup CONF` (a subprocess) vs `cp -r` and `cp -r && sync`.

    python bench/warmup.py [--size 2G] [--files 8] [--rounds 3]

8 files (2 GiB in all by default, each with its own content) on a "volume" directory are copied to a
cache directory on the same disk. Every round runs each case once, in an order that rotates from round
to round; before every run dirty pages are written back and the page cache dropped (`sync; echo 3 >
/proc/sys/vm/drop_caches`, said so when not permitted), so each tool reads the volume cold and pays
for its own writes. Cases:

- `cp`: `cp -r models DST` (its data is still in the page cache when it returns);
- `cp+sync`: `cp -r models DST && sync` (on disk when it returns);
- `ours`: `autocloud warmup CONF` into an empty cache, as on every new pod after the first: the hash
  sidecar on the volume already knows the files; the default durability ("deferred": nothing waits for
  the disk, as with `cp`; a detached process flushes later and settles the entries: here it is told to
  wait an hour (AUTOCLOUD_SETTLE_DELAY) so it never flushes during another case, and is stopped at the end);
- `ours_durable`: the same with `--durability durable` (each file fsynced before its rename: compare with
  `cp+sync`);
- `ours_eph`: the same with `--durability ephemeral` (no flush and no marks at all);
- `first`: the very first warmup of these files (no sidecar): by default their sha256 is computed after
  the command returns, by a detached low-priority hasher (warmup/hash_later.py) that records it in the
  index and the sidecar; not timed, it is waited for before the next case (`first_bg_hash`: how long
  after the command returned it was done);
- `first_hash_now`: the same with `--hash now` (sha256 computed while copying, as before);
- `rerun`: `autocloud warmup CONF` again with nothing to copy (page cache dropped first, like the others);
  `rerun_warm` the same with the page cache as the previous run and its background reader left it;
- every case starts once the background work of the one before (warmup's page-cache reader, the
  hasher) is done, so none is timed during another's; the deferred flush waits an hour, see above;
- with `--baseline-src DIR` (another tree's `src`, e.g. `git archive main src`), `rerun_baseline` and
  `rerun_warm_baseline`: the same two runs of that tree's code, in the same rounds (and their ratios);
  `--only-reruns` times only these rerun cases.

Prints medians, then one line with the ratios last (cp time / ours: > 1 means ours is faster;
targets: ours >= 1.0x `cp`, >= 1.5x `cp && sync`, rerun <= 0.2 s; `durable_ratio_vs_cp_sync` compares
the durable mode with `cp && sync`), then the library-level line
(`run_warmup` in this process, no interpreter start-up, same rounds) as a second line.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from comfy_autocloud.store import Store
from comfy_autocloud.units import parse_size
from comfy_autocloud.warmup.hashes import SIDECAR
from comfy_autocloud.warmup.run import WarmupPaths, load_plan, run_warmup
from servers import safetensors_header, stop_background, wait_hashed, wait_idle

DROP = Path("/proc/sys/vm/drop_caches")


def drop_caches() -> bool:
    """Write back dirty pages, then drop the page cache; False where that is not permitted."""
    os.sync()
    try:
        DROP.write_text("3\n")
        return True
    except OSError:
        return False


def make_volume(models: Path, files: int, size: int) -> list[Path]:
    """`files` files of `size` bytes each, each with different content (no dedupe can help anyone)."""
    block = bytearray(os.urandom(8 << 20))
    out = []
    for i in range(files):
        p = models / "checkpoints" / f"model_{i}.safetensors"
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "wb") as fh:  # a valid safetensors file: the store checks model files' format on commit
            header = safetensors_header(size)
            fh.write(header)
            left = size - len(header)
            n = 0
            while left:
                block[:16] = f"{i:08d}{n:08d}".encode()
                chunk = memoryview(block)[: min(left, len(block))]
                fh.write(chunk)
                left -= len(chunk)
                n += 1
        out.append(p)
    return out


def warmup_argv(command: str) -> list[str]:
    """`autocloud warmup` as a user runs it: the console script beside this interpreter (else the module),
    or (`module`) what runpod/warmup.sh runs: `python -m comfy_autocloud.cli.main warmup`."""
    if command == "module":
        return [sys.executable, "-m", "comfy_autocloud.cli.main", "warmup"]
    script = Path(sys.executable).with_name("autocloud")
    return [str(script), "warmup"] if script.is_file() else [sys.executable, "-m", "comfy_autocloud.cli.main",
                                                             "warmup"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2G", help="total size of the files (default 2G)")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--parallel", type=int, default=4, help="files ours copies at once (the CLI's default)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir; removed afterwards)")
    ap.add_argument("--cases", default="", help="comma-separated subset of the cases (default: all; the summary "
                    "lines need all)")
    ap.add_argument("--baseline-src", type=Path, default=None,
                    help="also time the reruns with another tree's src (PYTHONPATH), in the same rounds")
    ap.add_argument("--only-reruns", action="store_true",
                    help="time only the reruns (rerun, rerun_warm and their baseline columns), not the copies")
    ap.add_argument("--command", choices=("autocloud", "module"), default="autocloud",
                    help="time `autocloud warmup` (default) or runpod/warmup.sh's `python -m "
                         "comfy_autocloud.cli.main warmup`")
    args = ap.parse_args()
    total = parse_size(args.size)
    each = total // args.files
    work = Path(tempfile.mkdtemp(prefix="bench-warmup-", dir=args.dir))
    cold = True
    times: dict[str, list[float]] = {}
    try:
        comfy = work / "volume" / "ComfyUI"
        make_volume(comfy / "models", args.files, each)
        conf = work / "warmup_models.conf"
        conf.write_text("checkpoints/model_*.safetensors\n")
        cache = work / "cache"
        sidecar = comfy / "models" / SIDECAR
        env = {**os.environ, "COMFYUI_PATH": str(comfy), "CACHE_PATH": str(cache),
               "AUTOCLOUD_CONFIG": str(work / "none.yaml"), "AUTOCLOUD_CACHE": str(work / "autocloud")}
        env.pop("AUTOCLOUD_WARMUP_DURABILITY", None)
        env["AUTOCLOUD_SETTLE_DELAY"] = "3600"  # the deferred flush must not land inside another case's timing
        env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its .pyc files; so does this run
        cli = [*warmup_argv(args.command), str(conf), "--parallel", str(args.parallel)]

        base_env = {**env, "PYTHONPATH": str(args.baseline_src.resolve())} if args.baseline_src else None

        def run(argv: list[str], run_env: dict[str, str] = env) -> None:
            subprocess.run(argv, check=True, env=run_env, stdout=subprocess.DEVNULL)

        def ours(*extra: str) -> Callable[[], None]:
            return lambda: run([*cli, *extra])

        def library() -> None:
            with Store(cache) as store:
                report = run_warmup(store, load_plan(conf, WarmupPaths(comfy, cache)), parallel=args.parallel)
            if not report.ok or report.bytes_copied != each * args.files:
                raise SystemExit(f"warmup failed: {report.summary()}")

        run(cli)  # checks that the command works at all; its background hasher writes the sidecar
        wait_hashed(cache)
        if base_env is not None:
            run(cli, base_env)  # the baseline's .pyc files written before any of its runs is timed
        saved_sidecar = sidecar.read_bytes()

        def prepare(case: str) -> None:
            for d in (cache, work / "cp"):
                shutil.rmtree(d, ignore_errors=True)
            if case.startswith("first"):
                sidecar.unlink(missing_ok=True)
            else:
                sidecar.write_bytes(saved_sidecar)
            if case.startswith("rerun"):
                run(cli)

        cases: dict[str, Callable[[], None]] = {
            "cp": lambda: run(["cp", "-r", str(comfy / "models"), str(work / "cp")]),
            "cp+sync": lambda: run(["sh", "-c", f"cp -r '{comfy / 'models'}' '{work / 'cp'}' && sync"]),
            "ours": ours(),
            "ours_durable": ours("--durability", "durable"),
            "ours_eph": ours("--durability", "ephemeral"),
            "first": ours(),
            "first_hash_now": ours("--hash", "now"),
            "rerun": ours(),
            "library": library,
        }
        if base_env is not None:
            cases["rerun_baseline"] = lambda: run(cli, base_env)
        names = [n for n in cases if (not args.cases or n in args.cases.split(","))
                 and (not args.only_reruns or n.startswith("rerun"))]
        for r in range(args.rounds):
            order = names[r % len(names):] + names[: r % len(names)]
            for name in order:
                prepare(name)
                wait_idle(work)  # the last case's page-cache reader is done
                cold &= drop_caches()
                t0 = time.perf_counter()
                cases[name]()
                times.setdefault(name, []).append(time.perf_counter() - t0)
                if name == "first":  # not timed: its background hasher finishes before the next case starts
                    t0 = time.perf_counter()
                    wait_hashed(cache)
                    times.setdefault("first_bg_hash", []).append(time.perf_counter() - t0)
                    if len(json.loads(sidecar.read_text())["files"]) != args.files:
                        raise SystemExit("the background hasher did not record every file in the sidecar")
                if name.startswith("rerun"):  # and once more with the page cache as that run left it
                    wait_idle(work)
                    t0 = time.perf_counter()
                    cases[name]()
                    times.setdefault(name.replace("rerun", "rerun_warm"), []).append(time.perf_counter() - t0)
    finally:
        stop_background(work)
        shutil.rmtree(work, ignore_errors=True)

    med = {k: statistics.median(v) for k, v in times.items()}
    gib = each * args.files / 2**30
    print("  ".join(f"{k}={'/'.join(f'{x:.2f}' for x in v)}s" for k, v in times.items()))
    reruns = "".join(f"{k}={med[k]:.3f}s " for k in ("rerun", "rerun_warm", "rerun_baseline", "rerun_warm_baseline")
                     if k in med)
    for case in ("rerun", "rerun_warm"):
        if case in med and f"{case}_baseline" in med:
            reruns += f"{case}_ratio_vs_baseline={med[f'{case}_baseline'] / med[case]:.2f} "
    if args.only_reruns:
        print(f"warmup {args.command} reruns files={args.files} size={gib:.1f}GiB cold={'yes' if cold else 'no'} "
              f"rounds={args.rounds} {reruns.rstrip()}")
        return
    if args.cases:
        print("medians: " + "  ".join(f"{k}={v:.3f}s" for k, v in med.items()))
        return
    print(f"warmup {args.command} files={args.files} size={gib:.1f}GiB cold={'yes' if cold else 'no'} "
          f"rounds={args.rounds} cp={med['cp']:.2f}s cp_sync={med['cp+sync']:.2f}s ours={med['ours']:.2f}s "
          f"ours_durable={med['ours_durable']:.2f}s ours_ephemeral={med['ours_eph']:.2f}s "
          f"first={med['first']:.2f}s first_hash_now={med['first_hash_now']:.2f}s "
          f"first_bg_hash={med['first_bg_hash']:.2f}s {reruns}"
          f"first_ratio_vs_cp={med['cp'] / med['first']:.2f} "
          f"first_hash_now_ratio_vs_cp={med['cp'] / med['first_hash_now']:.2f} "
          f"ephemeral_ratio_vs_cp={med['cp'] / med['ours_eph']:.2f} "
          f"durable_ratio_vs_cp_sync={med['cp+sync'] / med['ours_durable']:.2f} "
          f"ratio_vs_cp_sync={med['cp+sync'] / med['ours']:.2f} ratio_vs_cp={med['cp'] / med['ours']:.2f}")
    print(f"warmup library files={args.files} size={gib:.1f}GiB run_warmup={med['library']:.2f}s "
          f"ratio_vs_cp={med['cp'] / med['library']:.2f}")

if __name__ == "__main__":
    main()
