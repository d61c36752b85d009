"""Partial files on a RAM disk (`--temp-dir`, a real 16 MiB tmpfs), falling back to the cache disk."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from comfy_autocloud.config import load_settings
from comfy_autocloud.fetch import FetchService
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.store import Store
from comfy_autocloud.transfer.ranges import PartState, state_path
from mounts import tmpfs
from servers import NginxOrigin, nginx_running, write_random_file

MiB = 2**20
pytestmark = pytest.mark.skipif(not NginxOrigin.available(), reason="nginx is not installed (./dev test installs it)")


@pytest.fixture
def ram(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "ram", "16m") as path:
        yield path


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[NginxOrigin]:
    with nginx_running(tmp_path / "www", tmp_path / "nginx", limit_rate="2m") as o:
        yield o


def test_partial_path_chooses_ram_when_it_fits(tmp_path: Path, ram: Path) -> None:
    store = Store(tmp_path / "cache", temp_dir=ram)
    assert store.temp_dir is not None and store.temp_dir.parent == ram
    small = store.partial_path("loras/a.safetensors", 4 * MiB)
    assert store.in_temp_dir(small)
    big = store.partial_path("checkpoints/b.safetensors", 15 * MiB)  # 16 MiB tmpfs, reserve kept free
    assert not store.in_temp_dir(big) and big.parent == store.private / "partial"
    unknown = store.partial_path("vae/c.safetensors")
    assert not store.in_temp_dir(unknown)
    # Sticky: a later call (another process, no size) finds the same place, so a resume finds it.
    assert Store(tmp_path / "cache", temp_dir=ram).partial_path("loras/a.safetensors") == small
    assert store.partial_path("loras/a.safetensors", 4 * MiB, disk=True).parent == store.private / "partial"


def test_setting_and_env() -> None:
    s = load_settings(env={"AUTOCLOUD_TEMP_DIR": "/dev/shm/ac"})
    assert s.temp_dir == "/dev/shm/ac" and s.origins["temp_dir"] == "env AUTOCLOUD_TEMP_DIR"
    assert load_settings(env={}).temp_dir is None


def test_fetch_through_ram_and_fallback(tmp_path: Path, ram: Path, origin: NginxOrigin) -> None:
    small_sha = write_random_file(origin.data_dir / "small.bin", 6 * MiB, seed=1)
    big_sha = write_random_file(origin.data_dir / "big.bin", 20 * MiB, seed=2)  # larger than the tmpfs
    store = Store(tmp_path / "cache", temp_dir=ram)
    svc = FetchService(store)
    for name, sha in (("small.bin", small_sha), ("big.bin", big_sha)):
        spec = ModelSpec(folder="checkpoints", filename=name, sources=(origin.url(name),), sha256=sha)
        res = svc.fetch(spec)
        assert res.sha256 == sha and res.path == tmp_path / "cache" / "checkpoints" / name
        assert os.stat(res.path).st_dev != os.stat(ram).st_dev  # copied off the RAM disk, not linked
    assert store.temp_dir is not None and not list(store.temp_dir.iterdir())  # nothing left in RAM
    assert not list((store.private / "partial").iterdir())


def _spawn(cache: Path, ram: Path, url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "comfy_autocloud.cli.main", "--cache-dir", str(cache), "--temp-dir", str(ram),
         "fetch", url, "--folder", "checkpoints", "--connections", "4", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _recorded(part: Path) -> int:
    st = PartState.load(state_path(part))
    return st.done_bytes() if st else 0


def test_kill9_on_ram_disk_then_resume(tmp_path: Path, ram: Path, origin: NginxOrigin) -> None:
    size = 10 * MiB + 777
    sha = write_random_file(origin.data_dir / "m.safetensors", size, seed=3)
    cache = tmp_path / "cache"
    final = cache / "checkpoints" / "m.safetensors"
    part = Store(cache, temp_dir=ram).partial_path("checkpoints/m.safetensors", size)
    assert part.parent.parent == ram
    proc = _spawn(cache, ram, origin.url("slow/m.safetensors"))
    try:
        deadline = time.monotonic() + 30
        while _recorded(part) < 0.3 * size and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, f"finished before the kill: {proc.communicate()}"
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    recorded = _recorded(part)
    assert recorded >= 0.3 * size
    assert not final.exists() and part.exists()  # the partial is on the RAM disk, nothing at the final path

    proc = _spawn(cache, ram, origin.url("slow/m.safetensors"))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["sha256"] == sha and final.exists()
    assert result["bytes_downloaded"] <= size - recorded + MiB  # resumed, not started over
    assert not part.exists()
