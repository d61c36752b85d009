"""Warmup copy speed: `autocloud warmup` (through the API) vs `cp -r` vs `rsync -a`, then a rerun.

8 files (4 GiB in all by default) on a "volume" directory are copied to a cache directory. Before each
timed copy the page cache is dropped when /proc/sys/vm/drop_caches is writable (`cold=yes`). Ours
hashes every byte (sha256) and fsyncs each file before its atomic rename; so that all three promise the
same durability, cp and rsync are timed up to an fsync of every copied file (`sync FILE…`), and their
times without it are printed too. Prints one line, ratio last (cp time / ours: >1 means ours is faster).
Targets: ratio >= 1.0, rerun <= 1 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from comfy_autocloud.store import Store
from comfy_autocloud.units import parse_size
from comfy_autocloud.warmup.run import WarmupPaths, load_plan, run_warmup
from servers import safetensors_header

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


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--size", default="4G", help="total size of the files (default 4G)")
    ap.add_argument("--files", type=int, default=8)
    ap.add_argument("--parallel", type=int, default=4, help="files ours copies at once")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir; removed afterwards)")
    args = ap.parse_args()
    total = parse_size(args.size)
    each = total // args.files
    work = Path(tempfile.mkdtemp(prefix="bench-warmup-", dir=args.dir))
    try:
        comfy = work / "volume" / "ComfyUI"
        sources = make_volume(comfy / "models", args.files, each)
        conf = work / "warmup_models.conf"
        conf.write_text("checkpoints/model_*.safetensors\n")
        cache = work / "cache"
        paths = WarmupPaths(comfy, cache)

        def fresh(target: Path) -> None:
            shutil.rmtree(target, ignore_errors=True)

        def run_cp() -> None:
            dst = work / "cp"
            subprocess.run(["cp", "-r", str(comfy / "models"), str(dst)], check=True)

        def run_rsync() -> None:
            subprocess.run(["rsync", "-a", f"{comfy / 'models'}/", f"{work / 'rsync'}/"], check=True)

        def fsync_all(root: Path) -> None:
            subprocess.run(["sync", *map(str, sorted(root.rglob("*.safetensors")))], check=True)

        cold = True
        results: dict[str, float] = {}
        for name, target, fn in (("cp", work / "cp", run_cp), ("rsync", work / "rsync", run_rsync)):
            fresh(target)
            cold &= drop_caches()
            copy_s = timed(fn)
            results[f"{name}_nosync"] = copy_s
            results[name] = copy_s + timed(lambda t=target: fsync_all(t))
            fresh(target)

        fresh(cache)
        cold &= drop_caches()

        def ours() -> None:
            with Store(cache) as store:
                report = run_warmup(store, load_plan(conf, paths), parallel=args.parallel)
            if not report.ok or report.bytes_copied != each * args.files:
                raise SystemExit(f"warmup failed: {report.summary()}")

        results["ours"] = timed(ours)

        def rerun() -> None:
            with Store(cache) as store:
                report = run_warmup(store, load_plan(conf, paths), parallel=args.parallel)
            if report.bytes_copied or not report.ok:
                raise SystemExit(f"rerun copied bytes: {report.summary()}")

        results["rerun"] = timed(rerun)
        assert all(os.path.getsize(cache / "checkpoints" / p.name) == each for p in sources)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    gib = each * args.files / 2**30
    print(f"warmup files={args.files} size={gib:.1f}GiB cold={'yes' if cold else 'no'} parallel={args.parallel} "
          f"ours={results['ours']:.2f}s cp={results['cp']:.2f}s rsync={results['rsync']:.2f}s "
          f"cp_nosync={results['cp_nosync']:.2f}s rsync_nosync={results['rsync_nosync']:.2f}s "
          f"rerun={results['rerun']:.3f}s ours_rate={gib / results['ours']:.2f}GiB/s "
          f"ratio_vs_rsync={results['rsync'] / results['ours']:.2f} "
          f"ratio_vs_cp_nosync={results['cp_nosync'] / results['ours']:.2f} "
          f"ratio_vs_cp={results['cp'] / results['ours']:.2f}")


if __name__ == "__main__":
    main()
