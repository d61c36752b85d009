"""What the adaptive default policy costs the first download that needs room in a fresh process.

Usage: python bench/eviction_startup.py [--rows 5000,20000,50000]

For each size of access log, a cache is built from the tail of a realistic trace (tests/traces.py,
sizes scaled from GB to KB so the files are real but small): the cache full at 10% of the library,
the access log holding the trace's newest N rows. Then, each in a fresh Python process:

* `reserve`: `Store(...)` and one `reserve()` of a new key that must evict, timed alone; first with
  the policy's saved state absent (the first eviction after an upgrade, or after the state file was
  lost), then with the state a previous process saved (the usual cold start), then with LRU (no
  learning: the floor);
* `fetch`: an `autocloud -v fetch --json file://...` CLI process that must evict, default without and
  with the saved state, and LRU: the `reserve` phase it reports (where the eviction happens).

One line per access-log size, medians of three runs:

  eviction-startup rows=50000 reserve_cold=0.424s reserve_saved=0.036s reserve_lru=0.010s
    fetch_cold=0.541s fetch_saved=0.028s fetch_lru=0.028s
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))

from comfy_autocloud.store import Store  # noqa: E402
from comfy_autocloud.store.layout import INDEX_NAME, PRIVATE_DIR  # noqa: E402
from comfy_autocloud.store.layout import POLICY_STATE_NAME as POLICY_STATE  # noqa: E402
from servers import random_safetensors, safetensors_of  # noqa: E402
from traces import realistic_trace  # noqa: E402

SCALE = 10**6  # GB-sized models become KB-sized files
ROUNDS = 3  # medians of three runs each (the machine is shared)
NEW_SIZE = 20_000  # the new download: as big as a large checkpoint, so it must evict
MIN_SIZE = 256  # room for a safetensors header (the store checks the files' format)

_RESERVE = f"""
import sys, time
from comfy_autocloud.store import Store
root, cap, policy = sys.argv[1], int(sys.argv[2]), sys.argv[3]
t = time.perf_counter()
store = Store(root, max_size=cap, policy=policy, high_watermark=1.0, low_watermark=1.0, min_free_disk=0)
with store.reserve("checkpoints/new.safetensors", {NEW_SIZE}) as r:
    assert r.evicted, "the bench must evict"
print(time.perf_counter() - t)
"""


def model_file(key: str, size: int) -> bytes:
    """A valid file of `size` bytes of the format its name says (the trace's keys end in .safetensors
    or another model suffix; others get plain bytes)."""
    fill = hashlib.sha256(key.encode()).digest()
    if key.endswith(".safetensors"):
        return safetensors_of(fill, size)
    return (fill * (size // 32 + 1))[:size]


def build(root: Path, rows: int) -> int:
    """A full cache whose access log holds the newest `rows` accesses of a realistic trace; returns the cap."""
    days = max(42, rows * 84 // 15_000 + 7)
    trace = [(t, k, max(MIN_SIZE, s // SCALE)) for t, k, s in realistic_trace(0, days=days)][-rows:]
    sizes = {k: s for _t, k, s in trace}
    cap = sum(sizes.values()) // 10
    store = Store(root, max_size=None, policy="lru", min_free_disk=0)
    used = 0
    for key in dict.fromkeys(reversed([k for _t, k, _s in trace])):  # the most recently used first
        size = sizes[key]
        if used + size > cap:
            continue
        data = model_file(key, size)  # the store checks that a .safetensors file is one
        with store.reserve(key, size):
            part = store.partial_path(key)
            part.write_bytes(data)
            store.commit(key, part, size=size, sha256=hashlib.sha256(data).hexdigest(), source="bench")
        used += size
    store.close()
    with sqlite3.connect(root / PRIVATE_DIR / INDEX_NAME) as db:
        db.execute("DELETE FROM access_log")
        db.executemany("INSERT INTO access_log(ts, key, size) VALUES (?, ?, ?)", trace)
    return cap


def copy(src: Path, dst: Path) -> None:
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)


def saved_state(base: Path, root: Path, cap: int) -> None:
    """Put into `root` the policy state a previous process saved after evicting once from `base`."""
    other = root.with_name(root.name + "-prev")
    copy(base, other)
    reserve_time(other, cap, "default")
    state = other / PRIVATE_DIR / POLICY_STATE
    if state.exists():
        copy(state, root / PRIVATE_DIR / POLICY_STATE)


def reserve_time(root: Path, cap: int, policy: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", _RESERVE, str(root), str(cap), policy], env=env,
                         check=True, capture_output=True, text=True)
    return float(out.stdout.strip())


def fetch_reserve_time(root: Path, cap: int, policy: str, src: Path) -> float:
    """`autocloud -v fetch --json file://...` in a fresh process; the seconds its `reserve` phase took."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "AUTOCLOUD_CACHE": str(root),
           "AUTOCLOUD_MAX_SIZE": str(cap), "AUTOCLOUD_POLICY": policy}
    exe = Path(sys.executable).with_name("autocloud")
    out = subprocess.run([str(exe), "-v", "fetch", "--json", "-f", "checkpoints", f"file://{src}"], env=env,
                         check=True, capture_output=True, text=True)
    doc = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    return float(doc["phases"]["reserve"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="5000,20000,50000")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="evict-startup-") as tmp:
        tmpd = Path(tmp)
        src = tmpd / "new.safetensors"
        src.write_bytes(random_safetensors(NEW_SIZE))
        for rows in (int(r) for r in args.rows.split(",")):
            base = tmpd / f"base{rows}"
            cap = build(base, rows)
            t: dict[str, list[float]] = {}
            for _round in range(ROUNDS):
                for name, policy, warm in (("reserve_cold", "default", False), ("reserve_saved", "default", True),
                                           ("reserve_lru", "lru", False)):
                    root = tmpd / f"{name}{rows}-{_round}"
                    copy(base, root)
                    if warm:
                        saved_state(base, root, cap)
                    t.setdefault(name, []).append(reserve_time(root, cap, policy))
                for name, policy in (("fetch_cold", "default"), ("fetch_saved", "default"), ("fetch_lru", "lru")):
                    root = tmpd / f"{name}{rows}-{_round}"
                    copy(base, root)
                    if name == "fetch_saved":
                        saved_state(base, root, cap)
                    t.setdefault(name, []).append(fetch_reserve_time(root, cap, policy, src))
            med = {k: statistics.median(v) for k, v in t.items()}
            print(f"eviction-startup rows={rows} " + " ".join(f"{k}={v:.3f}s" for k, v in med.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
