"""kill -9 of `autocloud fetch` at many points: never a partial file at the final path, resume is bounded."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfy_autocloud.store import Store
from comfy_autocloud.transfer.ranges import PartState, state_path
from servers import NginxOrigin, nginx_running, write_random_file

MiB = 2**20
KEY = "checkpoints/big.safetensors"
pytestmark = pytest.mark.skipif(not NginxOrigin.available(), reason="nginx is not installed (./dev test installs it)")


def _spawn(cache: Path, url: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "comfy_autocloud.cli.main", "--cache-dir", str(cache), "fetch", url,
         "--folder", "checkpoints", "--connections", "4", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _recorded(part: Path) -> int:
    st = PartState.load(state_path(part))
    return st.done_bytes() if st else 0


def _wait_for(cond, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_kill9_at_six_points_then_resume(tmp_path: Path) -> None:
    size = 40 * MiB + 12345
    with nginx_running(tmp_path / "www", tmp_path / "nginx", limit_rate="2m") as origin:
        sha = write_random_file(origin.data_dir / "big.safetensors", size, seed=42)
        url = origin.url("slow/big.safetensors")
        cache = tmp_path / "cache"
        final = cache / "checkpoints" / "big.safetensors"
        part = Store(cache).partial_path(KEY)

        # Each kill point: a predicate on the partial download, checked while the process runs.
        points = [
            ("during start-up", lambda: True),
            ("as the part file appears", lambda: part.exists()),
            ("at 20% recorded", lambda: _recorded(part) >= 0.2 * size),
            ("at 45% recorded", lambda: _recorded(part) >= 0.45 * size),
            ("at 70% recorded", lambda: _recorded(part) >= 0.70 * size),
            ("at 90% recorded", lambda: _recorded(part) >= 0.90 * size),
        ]
        recorded_history = []
        for name, cond in points:
            proc = _spawn(cache, url)
            try:
                assert _wait_for(lambda c=cond, p=proc: c() or p.poll() is not None, 60), f"never reached: {name}"
                assert proc.poll() is None, f"finished before the kill point {name}: {proc.communicate()}"
            finally:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(10)
            assert not final.exists(), f"a file appeared at the final path after a kill {name}"
            assert Store(cache).lookup(KEY) is None
            recorded_history.append(_recorded(part))
        # Recorded progress never goes backwards across kills: nothing finished is thrown away.
        assert recorded_history == sorted(recorded_history), recorded_history
        before_final = recorded_history[-1]
        assert before_final >= 0.9 * size

        proc = _spawn(cache, url)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["sha256"] == sha
        assert hashlib.sha256(final.read_bytes()).hexdigest() == sha
        # Only what was unfinished was fetched again (plus at most one read buffer per connection).
        assert result["bytes_downloaded"] <= size - before_final + 4 * MiB, (result, before_final)
        # Across all runs the origin sent the file once plus what each kill lost in flight.
        served = origin.bytes_served("/slow/big.safetensors")
        assert served <= size + len(points) * 10 * MiB, (served, size)
        assert not part.exists() and not state_path(part).exists()
        entry = Store(cache).lookup(KEY)
        assert entry is not None and entry.sha256 == sha and entry.size == size


def test_ctrl_c_cancels_promptly_and_keeps_partial(tmp_path: Path) -> None:
    size = 48 * MiB
    with nginx_running(tmp_path / "www", tmp_path / "nginx", limit_rate="2m") as origin:
        sha = write_random_file(origin.data_dir / "big.safetensors", size, seed=43)
        url = origin.url("slow/big.safetensors")
        cache = tmp_path / "cache"
        part = Store(cache).partial_path(KEY)
        proc = _spawn(cache, url)
        assert _wait_for(lambda: _recorded(part) >= 0.2 * size or proc.poll() is not None, 60)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=20)
        assert time.monotonic() - t0 < 5, "Ctrl-C must stop downloads promptly"
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        assert not (cache / "checkpoints" / "big.safetensors").exists()
        kept = _recorded(part)
        assert kept >= 0.2 * size
        proc = _spawn(cache, url)
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        result = json.loads(out.strip().splitlines()[-1])
        assert result["sha256"] == sha and result["bytes_downloaded"] <= size - kept + 4 * MiB
