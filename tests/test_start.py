"""`autocloud start`: a real child process (a small fake ComfyUI main.py) under the real supervisor.

The fake answers GET /system_stats like ComfyUI and can crash, hang, or exit on SIGTERM writing a
marker, so restarts, the restart cap, hang detection and signal forwarding are observed from outside.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from comfy_autocloud.warmup.supervise import SuperviseOptions, comfyui_args, exit_code, health_url
from servers import free_port, random_safetensors

REPO = Path(__file__).resolve().parents[1]

FAKE_MAIN = r'''
import json, os, signal, sys, time
from http.server import BaseHTTPRequestHandler, HTTPServer

args = sys.argv[1:]
port = int(args[args.index("--port") + 1]) if "--port" in args else 8188
state = os.environ["FAKE_DIR"]
mode = os.environ.get("FAKE_MODE", "ok")
after = float(os.environ.get("FAKE_AFTER", "0.3"))
t0 = time.monotonic()
ckpts = os.path.join(os.environ["CACHE_PATH"], "checkpoints")
cached = sorted(os.listdir(ckpts)) if os.path.isdir(ckpts) else []
with open(os.path.join(state, "starts.log"), "a") as fh:
    fh.write(json.dumps({"pid": os.getpid(), "args": args, "cached": cached}) + "\n")

def on_term(signum, frame):
    with open(os.path.join(state, "sigterm.marker"), "a") as fh:
        fh.write(f"{os.getpid()} {signum}\n")
    os._exit(int(os.environ.get("FAKE_TERM_CODE", "0")))

signal.signal(signal.SIGTERM, on_term)
signal.signal(signal.SIGINT, on_term)

class H(BaseHTTPRequestHandler):
    def do_GET(self):
        if mode == "hang" and time.monotonic() - t0 > after:
            time.sleep(3600)
        body = json.dumps({"system": {"os": "fake"}}).encode()
        self.send_response(200 if self.path == "/system_stats" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass

srv = HTTPServer(("127.0.0.1", port), H)
srv.timeout = 0.05
while True:
    if mode == "crash" and time.monotonic() - t0 > after:
        os._exit(3)
    srv.handle_request()
'''


class Fake:
    def __init__(self, tmp: Path) -> None:
        self.comfy = tmp / "ComfyUI"
        self.state = tmp / "state"
        self.cache = tmp / "cache"
        (self.comfy / "models" / "checkpoints").mkdir(parents=True)
        self.state.mkdir()
        (self.comfy / "main.py").write_text(FAKE_MAIN)
        self.port = free_port()
        self.env = {**os.environ, "COMFYUI_PATH": str(self.comfy), "CACHE_PATH": str(self.cache),
                    "FAKE_DIR": str(self.state), "COMFYUI_ARGS": "--listen --disable-metadata",
                    "WARMUP_CONFIG": str(tmp / "warmup_models.conf"), "AUTOCLOUD_CONFIG": str(tmp / "none.yaml"),
                    "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.env.pop("SKIP_WARMUP", None)
        (tmp / "warmup_models.conf").write_text("checkpoints/m.safetensors\n")
        (self.comfy / "models" / "checkpoints" / "m.safetensors").write_bytes(random_safetensors(1 << 20))

    def start(self, *args: str, **env: str) -> subprocess.Popen[str]:
        argv = [sys.executable, "-m", "comfy_autocloud.cli.start_cmd", "--health-interval", "0.1", "--backoff", "0.05",
                *args, "--", "--port", str(self.port)]
        return subprocess.Popen(argv, env={**self.env, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True)

    def starts(self) -> list[dict]:
        p = self.state / "starts.log"
        return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/system_stats", timeout=0.5) as r:
                return r.status == 200
        except OSError:
            return False

    def wait_for(self, cond, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError("condition not met in time")
            time.sleep(0.02)


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_restart_after_kill_then_sigterm_is_forwarded(fake: Fake) -> None:
    proc = fake.start("--max-restarts", "3", "--highvram", FAKE_TERM_CODE="7")
    try:
        fake.wait_for(lambda: len(fake.starts()) == 1 and fake.healthy())
        first = fake.starts()[0]
        # Warmup ran before ComfyUI started; ComfyUI got COMFYUI_ARGS + --highvram + the extra args.
        assert first["cached"] == ["m.safetensors"]
        assert first["args"] == ["--listen", "--disable-metadata", "--highvram", "--port", str(fake.port)]
        os.kill(first["pid"], signal.SIGKILL)
        fake.wait_for(lambda: len(fake.starts()) == 2 and fake.healthy())
        second = fake.starts()[1]["pid"]
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    finally:
        _stop(proc)
    assert proc.returncode == 7, err  # the child's own exit code
    assert (fake.state / "sigterm.marker").read_text().split() == [str(second), str(int(signal.SIGTERM))]
    assert "restart 1/3" in err


def test_comfyui_does_not_outlive_a_killed_supervisor(fake: Fake) -> None:
    """kill -9 of the supervisor (OOM killer, a bad deploy): ComfyUI gets SIGTERM instead of lingering."""
    proc = fake.start("--skip-warmup")
    try:
        fake.wait_for(lambda: len(fake.starts()) == 1 and fake.healthy())
        child = fake.starts()[0]["pid"]
        proc.kill()
        proc.wait(10)
        fake.wait_for(lambda: (fake.state / "sigterm.marker").exists(), timeout=10)
        fake.wait_for(lambda: not fake.healthy(), timeout=10)
    finally:
        _stop(proc)
    assert (fake.state / "sigterm.marker").read_text().split()[0] == str(child)


def test_gives_up_after_the_restart_cap(fake: Fake) -> None:
    t0 = time.monotonic()
    proc = fake.start("--skip-warmup", "--max-restarts", "2", FAKE_MODE="crash", FAKE_AFTER="0.2")
    try:
        _out, err = proc.communicate(timeout=30)
    finally:
        _stop(proc)
    assert proc.returncode == 3, err
    assert len(fake.starts()) == 3  # the first run + 2 restarts
    assert "giving up after 2 restarts" in err and "crashed (exit 3)" in err
    assert time.monotonic() - t0 < 20


def test_hang_is_detected_and_restarted(fake: Fake) -> None:
    proc = fake.start("--skip-warmup", "--max-restarts", "1", "--health-timeout", "0.6", FAKE_MODE="hang",
                      FAKE_AFTER="0.5")
    try:
        _out, err = proc.communicate(timeout=30)
    finally:
        _stop(proc)
    assert proc.returncode == 1, err
    assert len(fake.starts()) == 2 and "hung" in err
    assert len((fake.state / "sigterm.marker").read_text().splitlines()) == 2  # stopped with SIGTERM each time


def test_sigint_is_forwarded(fake: Fake) -> None:
    proc = fake.start("--skip-warmup")
    try:
        fake.wait_for(lambda: fake.healthy())
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=20)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err
    assert (fake.state / "sigterm.marker").read_text().split()[1] == str(int(signal.SIGINT))
    assert len(fake.starts()) == 1


def test_warmup_only_copies_and_does_not_start(fake: Fake) -> None:
    r = subprocess.run([sys.executable, "-m", "comfy_autocloud.cli.start_cmd", "--warmup-only"], env=fake.env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (fake.cache / "checkpoints" / "m.safetensors").read_bytes() == \
        (fake.comfy / "models" / "checkpoints" / "m.safetensors").read_bytes()
    assert fake.starts() == []
    assert (fake.comfy / "extra_model_paths.yaml").is_file()


def test_skip_warmup_env_starts_without_copying(fake: Fake) -> None:
    proc = fake.start(SKIP_WARMUP="1")
    try:
        fake.wait_for(lambda: fake.healthy())
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    finally:
        _stop(proc)
    assert proc.returncode == 0, err
    assert fake.starts()[0]["cached"] == [] and not (fake.cache / "checkpoints").exists()
    assert "warmup skipped" in err


def test_runpod_start_wrapper_warmup_only(fake: Fake) -> None:
    env = {k: v for k, v in fake.env.items() if k != "PYTHONPATH"} | {"AUTOCLOUD_PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "runpod" / "start_with_warmup.sh"), "--warmup-only"], env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (fake.cache / "checkpoints" / "m.safetensors").is_file() and fake.starts() == []


def test_health_url_and_args() -> None:
    assert health_url(["--listen", "--disable-metadata"]) == "http://127.0.0.1:8188/system_stats"
    assert health_url(["--listen", "10.1.2.3", "--port", "9000"]) == "http://10.1.2.3:9000/system_stats"
    assert health_url(["--listen=0.0.0.0,::", "--port=81"]) == "http://127.0.0.1:81/system_stats"
    assert health_url(["--port", "1", "--port", "2"]) == "http://127.0.0.1:2/system_stats"
    assert health_url(["--listen", "::"]) == "http://[::1]:8188/system_stats"
    assert comfyui_args(None, vram="--lowvram", extra=["--port", "1"]) == [
        "--listen", "--disable-metadata", "--lowvram", "--port", "1"]
    assert comfyui_args("--listen 0.0.0.0 --extra-model-paths-config 'a b.yaml'") == [
        "--listen", "0.0.0.0", "--extra-model-paths-config", "a b.yaml"]
    opts = SuperviseOptions(backoff_initial=1, backoff_max=10)
    assert [opts.backoff(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 8, 10]
    assert exit_code(-15) == 143 and exit_code(3) == 3
