"""Real fleet infrastructure for tests and benchmarks: a redis-server on a free port, and fleet nodes.

`RedisServer` runs `redis-server --port <free> --save '' --appendonly no` in a temp dir (kill it to
test Redis loss). `FleetNode` is one node of a fleet as separate processes, like production: its own
cache directory, an `autocloud serve-peer` on its own loopback port, and `autocloud fetch` runs
that share that cache and node id.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from servers import free_port

TOKEN = "fleet-test-token-0123456789"


class RedisServer:
    def __init__(self, work_dir: Path) -> None:
        self.work_dir = Path(work_dir)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("redis-server") is not None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, port: int | None = None, timeout: float = 10.0) -> RedisServer:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = port or self.port or free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.work_dir), "--logfile", str(self.work_dir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited at start; see {self.work_dir / 'redis.log'}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return self
            time.sleep(0.02)
        self.kill()
        raise RuntimeError("redis-server did not answer PING in time")

    def kill(self) -> None:
        """SIGKILL: Redis vanishes mid-run, as in a crash."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> RedisServer:
        """Start it, unless `start()` already did (`with RedisServer(d).start() as r:` would otherwise start a
        second one on the same port and leave the first running after the block)."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()


@contextlib.contextmanager
def redis_running(work_dir: Path) -> Iterator[RedisServer]:
    server = RedisServer(work_dir).start()
    try:
        yield server
    finally:
        server.kill()


def wait_port(port: int, timeout: float = 15.0, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return
        time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port} after {timeout}s")


class FleetNode:
    """One node: a cache dir, a peer server process on 127.0.0.1:<port>, and fetch processes."""

    def __init__(self, name: str, base: Path, redis_url: str | None, *, env: dict[str, str] | None = None,
                 cpu: Callable[[], None] | None = None) -> None:
        self.name = name
        self.cpu = cpu  # run in each child before exec (e.g. CpuQuota.join: this node's own cores)
        self.dir = Path(base) / name
        self.cache = self.dir / "cache"
        self.port = free_port()
        self.redis_url = redis_url
        self.extra_env = env or {}
        self.peer: subprocess.Popen[bytes] | None = None
        self.fetches: list[subprocess.Popen[str]] = []

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AUTOCLOUD_")}
        env.update({"AUTOCLOUD_CACHE": str(self.cache), "AUTOCLOUD_NODE_ID": self.name,
                    "AUTOCLOUD_PEER_TOKEN": TOKEN, "AUTOCLOUD_PEER_URL": f"http://127.0.0.1:{self.port}",
                    "AUTOCLOUD_CONFIG": str(self.dir / "no-config.yaml"), "AUTOCLOUD_FLEET_HEARTBEAT_TTL": "3",
                    "AUTOCLOUD_FLEET_LEASE_TTL": "3", "AUTOCLOUD_FLEET_DOWNLOADS_PER_MINUTE": "0"})
        if self.redis_url:
            env["AUTOCLOUD_REDIS_URL"] = self.redis_url
        env.update(self.extra_env)
        return env

    def start_peer(self) -> FleetNode:
        self.dir.mkdir(parents=True, exist_ok=True)
        log = open(self.dir / "peer.log", "wb")  # noqa: SIM115 - the child owns it
        self.peer = subprocess.Popen(
            [sys.executable, "-m", "comfy_autocloud.cli.main", "-v", "serve-peer", "--host", "127.0.0.1",
             "--port", str(self.port)], env=self.env(), stdout=log, stderr=subprocess.STDOUT, preexec_fn=self.cpu)
        log.close()
        wait_port(self.port, proc=self.peer)  # type: ignore[arg-type]
        return self

    def fetch(self, url: str, *, folder: str = "checkpoints", extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
        self.dir.mkdir(parents=True, exist_ok=True)
        proc = subprocess.Popen(
            [sys.executable, "-m", "comfy_autocloud.cli.main", "-v", "fetch", url, "--folder", folder, "--json",
             *extra], env=self.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=self.cpu)
        self.fetches.append(proc)
        return proc

    def final(self, key: str) -> Path:
        return self.cache / key

    def kill(self) -> None:
        """kill -9 every process of this node."""
        for p in [*self.fetches, self.peer]:
            if p is not None and p.poll() is None:
                os.kill(p.pid, signal.SIGKILL)
                p.wait(10)

    def stop(self) -> None:
        for p in self.fetches:
            if p.poll() is None:
                p.kill()
                p.wait(10)
        if self.peer is not None and self.peer.poll() is None:
            self.peer.send_signal(signal.SIGTERM)
            try:
                self.peer.wait(10)
            except subprocess.TimeoutExpired:
                self.peer.kill()
                self.peer.wait(10)

    def peer_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.dir / "peer.log").read_text(errors="replace")
        return ""
