"""`autocloud start`: run ComfyUI's main.py under a small supervisor (what RunPod's start_with_warmup.sh does).

Why a supervisor and not `exec`: on a pod nobody is watching, a crashed or wedged ComfyUI must come
back by itself. A crash (non-zero exit) or a hang (`GET /system_stats` failing for `health_timeout`
seconds after it once answered, or never answering within `startup_timeout`) restarts it with
exponential backoff; more than `max_restarts` restarts in a row and we exit non-zero so the platform
sees the failure. A run that stayed healthy for `stable_after` seconds resets the count. SIGTERM and
SIGINT are forwarded to ComfyUI and we exit with its code; a clean exit 0 is not restarted.
"""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

DEFAULT_ARGS = "--listen --disable-metadata"
DEFAULT_PORT = 8188


@dataclass(frozen=True)
class SuperviseOptions:
    max_restarts: int = 5
    health_timeout: float = 120.0
    startup_timeout: float = 600.0
    health_interval: float = 5.0
    backoff_initial: float = 1.0
    backoff_max: float = 60.0
    stable_after: float = 300.0
    stop_grace: float = 20.0

    def backoff(self, restart: int) -> float:
        """Delay before restart number `restart` (1-based): initial, 2x, 4x … capped."""
        return min(self.backoff_max, self.backoff_initial * 2 ** max(0, restart - 1))


def comfyui_args(env_args: str | None, *, vram: str | None = None, extra: Sequence[str] = ()) -> list[str]:
    """COMFYUI_ARGS (shell-split; default `--listen --disable-metadata`) + --highvram/--lowvram + extra."""
    args = shlex.split(DEFAULT_ARGS if env_args is None else env_args)
    if vram and vram not in args:
        args.append(vram)
    return [*args, *extra]


def health_url(args: Sequence[str]) -> str:
    """Where ComfyUI answers /system_stats, from its own `--listen [ADDR]` and `--port N` (last one wins)."""
    port = DEFAULT_PORT
    host = "127.0.0.1"
    i = 0
    while i < len(args):
        a = args[i]
        nxt = args[i + 1] if i + 1 < len(args) else None
        if a == "--port" and nxt is not None:
            port = int(nxt)
            i += 1
        elif a.startswith("--port="):
            port = int(a.split("=", 1)[1])
        elif a == "--listen" or a.startswith("--listen="):
            value = a.split("=", 1)[1] if "=" in a else (nxt if nxt and not nxt.startswith("-") else None)
            if value is not None and "=" not in a:
                i += 1
            host = _connect_host(value)
        i += 1
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/system_stats"


def _connect_host(listen: str | None) -> str:
    """ComfyUI's --listen takes 'addr[,addr]'; bare or wildcard means every interface: use loopback."""
    if not listen:
        return "127.0.0.1"
    first = listen.split(",")[0].strip()
    if first in ("", "0.0.0.0"):
        return "127.0.0.1"
    if first == "::":
        return "::1"
    return first


def check_health(url: str, timeout: float) -> bool:
    """One GET of /system_stats; any 2xx within `timeout` counts as alive."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            resp.read(1 << 16)
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def exit_code(returncode: int) -> int:
    """A child killed by signal N exits like a shell reports it: 128 + N."""
    return 128 - returncode if returncode < 0 else returncode


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl PR_SET_PDEATHSIG)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG


class Supervisor:
    """Runs one command at a time, restarting it per `SuperviseOptions`; `run()` returns our exit code."""

    def __init__(self, cmd: Sequence[str], *, url: str, options: SuperviseOptions | None = None,
                 cwd: Path | None = None, env: Mapping[str, str] | None = None,
                 log: Callable[[str], None] | None = None) -> None:
        self.cmd = list(cmd)
        self.url = url
        self.opts = options or SuperviseOptions()
        self.cwd = cwd
        self.env = dict(os.environ if env is None else env)
        self._log = log or (lambda msg: print(f"[autocloud start] {msg}", file=sys.stderr, flush=True))
        self.child: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._signal: int | None = None
        self._signal_at = 0.0
        self._stop = threading.Event()

    # -- signals ---------------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        first = self._signal is None
        self._signal = signum
        if first:
            self._signal_at = time.monotonic()
        self._stop.set()
        child = self.child
        if child is not None and child.poll() is None:
            try:
                child.send_signal(signum)
            except ProcessLookupError:
                pass

    # -- one run ---------------------------------------------------------------------------------------

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._log(f"starting: {shlex.join(self.cmd)}")
        # Own session: a terminal's Ctrl-C reaches only us, and we forward it once (no double signal).
        # Death signal: if the supervisor itself is killed (kill -9, OOM), ComfyUI goes too instead of
        # holding the port as an orphan that a restarted supervisor could never replace.
        return subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, start_new_session=True,
                                preexec_fn=_die_with_parent)

    def _terminate(self, child: subprocess.Popen[bytes]) -> int:
        """SIGTERM the child's process group, SIGKILL after the grace period; returns its returncode."""
        for sig, wait in ((signal.SIGTERM, self.opts.stop_grace), (signal.SIGKILL, 30.0)):
            try:
                os.killpg(child.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                return child.wait(timeout=wait)
            except subprocess.TimeoutExpired:
                continue
        return child.wait()

    def _watch(self, child: subprocess.Popen[bytes]) -> tuple[str, int, float]:
        """Wait for exit, hang or a signal: (what, returncode, seconds it was healthy)."""
        o = self.opts
        started = time.monotonic()
        first_ok: float | None = None
        last_ok: float | None = None
        req_timeout = max(0.5, min(10.0, o.health_timeout / 2))
        while True:
            try:
                rc = child.wait(timeout=o.health_interval)
                healthy = (last_ok - first_ok) if first_ok is not None and last_ok is not None else 0.0
                return ("signal" if self._signal is not None else "exit"), rc, healthy
            except subprocess.TimeoutExpired:
                pass
            now = time.monotonic()
            if self._signal is not None:
                if now - self._signal_at > o.stop_grace:
                    self._log(f"ComfyUI did not stop {o.stop_grace:.0f} s after the signal; killing it")
                    return "signal", self._terminate(child), 0.0
                continue
            if check_health(self.url, req_timeout):
                last_ok = time.monotonic()
                if first_ok is None:
                    first_ok = last_ok
                    self._log(f"ComfyUI is up ({self.url}, {last_ok - started:.1f} s after start)")
                continue
            now = time.monotonic()
            if last_ok is None and now - started > o.startup_timeout:
                self._log(f"ComfyUI did not answer {self.url} within {o.startup_timeout:g} s of starting; "
                          "treating it as hung")
                return "hang", self._terminate(child), 0.0
            if last_ok is not None and now - last_ok > o.health_timeout:
                self._log(f"ComfyUI stopped answering {self.url} for {now - last_ok:.0f} s; treating it as hung")
                return "hang", self._terminate(child), last_ok - (first_ok or last_ok)

    # -- loop ------------------------------------------------------------------------------------------

    def run(self) -> int:
        handlers = {}
        in_main = threading.current_thread() is threading.main_thread()
        if in_main:
            for sig in (signal.SIGTERM, signal.SIGINT):
                handlers[sig] = signal.signal(sig, self._on_signal)
        try:
            return self._loop()
        finally:
            for sig, h in handlers.items():
                signal.signal(sig, h)

    def _loop(self) -> int:
        while True:
            if self._signal is not None:
                return 128 + self._signal
            self.child = self._spawn()
            if self._signal is not None:  # arrived between spawn and assignment: forward it now
                self.child.send_signal(self._signal)
            what, rc, healthy = self._watch(self.child)
            self.child = None
            if what == "signal":
                self._log(f"ComfyUI stopped after signal {signal.Signals(self._signal or 0).name} (exit {rc})")
                return exit_code(rc)
            if what == "exit" and rc == 0:
                self._log("ComfyUI exited normally")
                return 0
            if healthy >= self.opts.stable_after:
                self.restarts = 0
            why = f"crashed (exit {exit_code(rc)})" if what == "exit" else "hung"
            if self.restarts >= self.opts.max_restarts:
                self._log(f"ComfyUI {why}; giving up after {self.restarts} restarts")
                return exit_code(rc) or 1
            self.restarts += 1
            delay = self.opts.backoff(self.restarts)
            self._log(f"ComfyUI {why}; restart {self.restarts}/{self.opts.max_restarts} in {delay:g} s")
            if self._stop.wait(delay):
                return 128 + (self._signal or signal.SIGTERM)
