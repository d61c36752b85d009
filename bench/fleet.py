"""Benchmark: four fleet nodes warming the same model vs four independent downloads, same origin, same run.

    python bench/fleet.py [--size 1G] [--nodes 4] [--limit-rate 40m] [--connections N] [--cpus-per-node X]

The origin is nginx with `limit_rate` per connection (how CDNs throttle). Three cases, each on fresh
cache directories (page cache dropped first when /proc/sys/vm/drop_caches is writable):

- one:         one node alone, no fleet (the time to beat: all four should have it within 1.5x of it);
- independent: N nodes, no fleet, all at once (what happens without this feature);
- ours:        N nodes with Redis + peer servers, all at once (one origin download, the rest streamed
               while it runs, each from the downloader with the fewest followers: a chain).

Each node is real processes (`autocloud serve-peer` + `autocloud fetch`) with its own cache. So that
N nodes on one machine behave like N machines, each node's processes share a CPU quota of their own
(a cgroup, cores / N by default, `--cpus-per-node`; the lone node of case one gets the same quota);
without root or a cgroup cpu controller (or with `--cpus-per-node 0`) every node uses every core, and
the line then also gives the CPU floor: the CPU seconds the fleet case spent (fetch processes and peer
servers, start-up excluded) spread over all cores, over one node's time — the fleet case cannot end
sooner on a shared machine. Prints one line: origin bytes of ours / independent (target <= 0.3) and
time until all N have it / one node alone (target <= 1.5). `--connections N` fixes the connections
per download (0 = adaptive) for every case alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from comfy_autocloud.units import human_size, parse_size  # noqa: E402
from cpu_quota import CpuQuota  # noqa: E402
from redis_server import FleetNode, RedisServer, redis_running  # noqa: E402
from servers import NginxOrigin, nginx_running, write_random_file  # noqa: E402

KEY = "checkpoints/model.safetensors"
EXTRA: tuple[str, ...] = ()


def drop_caches() -> None:
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def proc_cpu(pid: int) -> float:
    """CPU seconds a running process has used so far (user + system)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_case(base: Path, origin: NginxOrigin, url: str, n: int, redis_url: str | None, sha: str,
             cpus: float) -> tuple[float, int, float]:
    """Start n nodes fetching `url` at once; (seconds until the last has it verified, origin bytes,
    CPU seconds of the nodes' processes: fetches and peer servers). `cpus` > 0: each node's processes
    share their own quota of that many cores (a cgroup), like a machine of its own."""
    quotas = [CpuQuota(f"node{i}", cpus) for i in range(n)] if cpus > 0 else []
    nodes = [FleetNode(f"node{i}", base, redis_url, cpu=quotas[i].join if quotas else None) for i in range(n)]
    cpu0 = children_cpu()
    took = served = 0.0
    try:
        if redis_url is not None:
            for node in nodes:
                node.start_peer()
            cpu0 += sum(proc_cpu(node.peer.pid) for node in nodes if node.peer is not None)  # start-up isn't the run
        drop_caches()
        origin.clear_log()
        t0 = time.monotonic()
        procs = [node.fetch(url, extra=EXTRA) for node in nodes]
        for p in procs:
            out, err = p.communicate(timeout=1800)
            if p.returncode != 0:
                raise SystemExit(f"a fetch failed ({p.returncode}): {err[-2000:]}")
            got = json.loads(out.strip().splitlines()[-1])
            if got["sha256"] != sha:
                raise SystemExit(f"wrong sha256 {got['sha256']}")
        took = time.monotonic() - t0
        served = origin.bytes_served(url.split(f":{origin.port}", 1)[1])
    finally:
        for node in nodes:
            node.stop()
        for quota in quotas:
            quota.remove()
        shutil.rmtree(base, ignore_errors=True)
    return took, int(served), children_cpu() - cpu0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1G", help="model size (default 1G)")
    ap.add_argument("--nodes", type=int, default=4)
    ap.add_argument("--limit-rate", default="40m", help="nginx limit_rate per connection (default 40m)")
    ap.add_argument("--connections", type=int, default=0, help="fixed connections per download (0 = adaptive)")
    ap.add_argument("--cpus-per-node", type=float, default=None,
                    help="cores each node gets to itself (a cgroup quota; default: cores / nodes when cgroups are "
                         "writable, else 0); 0 = every node shares every core")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    cpus = args.cpus_per_node
    if cpus is None:
        cpus = cores / args.nodes if CpuQuota.root() is not None else 0.0
    elif cpus > 0 and CpuQuota.root() is None:
        print("--cpus-per-node needs root and a cgroup cpu controller", file=sys.stderr)
        return 2
    global EXTRA
    EXTRA = ("--connections", str(args.connections)) if args.connections else ()
    if not NginxOrigin.available() or not RedisServer.available():
        print("needs nginx and redis-server: apt-get install -y nginx-light redis-server", file=sys.stderr)
        return 2
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp:
        t = Path(tmp)
        with nginx_running(t / "www", t / "nginx", limit_rate=args.limit_rate) as origin, \
                redis_running(t / "redis") as redis:
            sha = write_random_file(origin.data_dir / "model.safetensors", size, seed=7)
            url = origin.url("slow/model.safetensors")
            one_s, one_bytes, one_cpu = run_case(t / "one", origin, url, 1, None, sha, cpus)
            print(f"# one node alone: {one_s:.2f}s, origin {human_size(one_bytes)}, cpu {one_cpu:.1f}s", flush=True)
            indep_s, indep_bytes, indep_cpu = run_case(t / "indep", origin, url, args.nodes, None, sha, cpus)
            print(f"# {args.nodes} independent: {indep_s:.2f}s, origin {human_size(indep_bytes)}, cpu {indep_cpu:.1f}s",
                  flush=True)
            ours_s, ours_bytes, ours_cpu = run_case(t / "ours", origin, url, args.nodes, redis.url, sha, cpus)
            print(f"# {args.nodes} fleet nodes: {ours_s:.2f}s, origin {human_size(ours_bytes)}, cpu {ours_cpu:.1f}s",
                  flush=True)
    line = (f"fleet nodes={args.nodes} size={human_size(size)} origin_bytes_ratio={ours_bytes / indep_bytes:.3f} "
            f"time_all_vs_one={ours_s / one_s:.2f}")
    if cpus > 0:  # every node on cores of its own, as on separate machines
        line += f" cpus_per_node={cpus:.2f}"
    else:  # all nodes share every core: the fleet case cannot end before its CPU seconds spread over them
        line += f" cpu_floor_vs_one={ours_cpu / cores / one_s:.2f} cpus_per_node=shared"
    print(f"{line} ours_s={ours_s:.2f} independent_s={indep_s:.2f} one_s={one_s:.2f} "
          f"cpu_s(one/indep/ours)={one_cpu:.1f}/{indep_cpu:.1f}/{ours_cpu:.1f} cores={cores}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
