"""A real HTTP proxy for tests: Debian's tinyproxy on loopback, its log listing every proxied URL."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from servers import free_port


class TinyProxy:
    """`tinyproxy -d -c CONF` on 127.0.0.1:<free port>; `auth=(user, password)` requires Basic auth."""

    def __init__(self, work_dir: Path, auth: tuple[str, str] | None = None) -> None:
        self.work_dir = Path(work_dir)
        self.auth = auth
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("tinyproxy") is not None

    @property
    def log_path(self) -> Path:
        return self.work_dir / "tinyproxy.log"

    def url(self, with_auth: bool = True) -> str:
        creds = f"{self.auth[0]}:{self.auth[1]}@" if self.auth and with_auth else ""
        return f"http://{creds}127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> TinyProxy:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = [f"Port {self.port}", "Listen 127.0.0.1", "Allow 127.0.0.1", f'LogFile "{self.log_path}"',
                "LogLevel Info", "MaxClients 200", "Timeout 60"]
        if self.auth:
            conf.append(f"BasicAuth {self.auth[0]} {self.auth[1]}")
        (self.work_dir / "tinyproxy.conf").write_text("\n".join(conf) + "\n")
        self.proc = subprocess.Popen(["tinyproxy", "-d", "-c", str(self.work_dir / "tinyproxy.conf")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"tinyproxy exited with {self.proc.returncode}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tinyproxy did not listen on {self.port} in {timeout}s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def proxied(self) -> list[str]:
        """Every request line tinyproxy received ('GET http://host/path HTTP/1.1')."""
        if not self.log_path.exists():
            return []
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            marker = "Request (file descriptor"
            if marker in line:
                out.append(line.split("): ", 1)[-1].strip())
        return out
