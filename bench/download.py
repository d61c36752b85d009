"""Benchmark: our transfer engine vs aria2c, hf_transfer and one curl stream, same nginx, same run.

    python bench/download.py [--size 1G] [--quick] [--reps 3]

Cases: (a) nginx `limit_rate 40m` per connection (how CDNs throttle), (b) no limit. Every run
starts with the page cache dropped (when /proc/sys/vm/drop_caches is writable) and the origin's file
read back into it, so each client pays for writing its own output but no one profits from another's
cached pages. Each tool's median over `--reps` runs is reported (curl once: it is the slow baseline).
Prints one line per case, ratio last.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
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


def drop_caches(keep: Path) -> None:
    """Cold page cache for the client side, warm origin file (the origin is not what we measure)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
    except OSError:
        pass
    with open(keep, "rb") as f:
        while f.read(16 << 20):
            pass


def data_file(workdir: Path, size: int) -> tuple[Path, str]:
    path = workdir / "data" / f"bench-{size}.bin"
    sidecar = path.with_suffix(".sha256")
    if path.exists() and sidecar.exists() and path.stat().st_size == size:
        return path, sidecar.read_text().strip()
    digest = servers.write_random_file(path, size, seed=1234)
    sidecar.write_text(digest)
    return path, digest




def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G")
    ap.add_argument("--quick", action="store_true", help="256 MiB, one run per tool, curl skipped")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "autocloud-bench"))
    ap.add_argument("--limit", default="40m", help="nginx limit_rate per connection for case (a)")
    args = ap.parse_args()
    size = parse_size("256M" if args.quick else args.size)
    reps = 1 if args.quick else max(1, args.reps)
    workdir = Path(args.workdir)
    out = workdir / "out"
    out.mkdir(parents=True, exist_ok=True)
    src, want = data_file(workdir, size)
    if shutil.which("nginx") is None:
        print("nginx not found: apt-get install -y nginx-light", file=sys.stderr)
        return 2
    origin = servers.NginxOrigin(src.parent, workdir / "nginx", limit_rate=args.limit)
    origin.start()
    have_aria = shutil.which("aria2c") is not None
    have_curl = shutil.which("curl") is not None
    try:
        import hf_transfer  # type: ignore[import-not-found]
    except ImportError:
        hf_transfer = None

    def clean() -> None:
        for p in out.iterdir():
            p.unlink()

    def timed(fn: Callable[[], object]) -> tuple[float, object]:
        clean()
        drop_caches(src)
        t0 = time.perf_counter()
        res = fn()
        return time.perf_counter() - t0, res

    try:
        for label, prefix in ((f"limit={args.limit.upper()}B/s/conn", "slow/"), ("limit=none", "")):
            url = origin.url(prefix + src.name)
            times: dict[str, list[float]] = {"ours": [], "aria2c": [], "hf_transfer": [], "curl": []}
            peaks: list[int] = []
            for _ in range(reps):
                secs, res = timed(lambda url=url: download(url, out / "ours.part", TransferOptions()))
                assert res.sha256 == want, "our download is corrupt"  # type: ignore[attr-defined]
                times["ours"].append(secs)
                peaks.append(res.connections)  # type: ignore[attr-defined]
                if have_aria:
                    secs, _ = timed(lambda url=url: subprocess.run(
                        ["aria2c", "-q", "-x16", "-s16", "-k1M", "--file-allocation=falloc",
                         "--allow-overwrite=true", "-d", str(out), "-o", "aria.bin", url], check=True))
                    assert (out / "aria.bin").stat().st_size == size
                    times["aria2c"].append(secs)
                if hf_transfer is not None:
                    secs, _ = timed(lambda url=url: hf_transfer.download(
                        url=url, filename=str(out / "hf.bin"), max_files=16, chunk_size=10485760))
                    assert (out / "hf.bin").stat().st_size == size
                    times["hf_transfer"].append(secs)
            if have_curl and not args.quick:
                secs, _ = timed(lambda url=url: subprocess.run(["curl", "-sS", "-o", str(out / "curl.bin"), url],
                                                              check=True))
                assert (out / "curl.bin").stat().st_size == size
                times["curl"].append(secs)

            def rate(name: str, times: dict[str, list[float]] = times) -> float | None:
                return size / 1e6 / statistics.median(times[name]) if times[name] else None

            parts = [f"download {label} size={human_size(size).replace(' ', '')}"]
            for name in ("ours", "aria2c", "hf_transfer", "curl"):
                r = rate(name)
                parts.append(f"{name}={r:.0f}MB/s" if r is not None else f"{name}=n/a")
            parts.append(f"ours_peak_conns={max(peaks)}")
            ours, aria = rate("ours"), rate("aria2c")
            ratio = f"{ours / aria:.2f}" if ours and aria else "n/a"
            parts.append(f"ratio_vs_aria2c={ratio}")
            print(" ".join(parts), flush=True)
    finally:
        origin.stop()
        clean()
    return 0


if __name__ == "__main__":
    sys.exit(main())
