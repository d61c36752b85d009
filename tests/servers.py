"""Real origins for tests and benchmarks: nginx (generated config) and a chaos aiohttp server.

nginx is the honest origin (ranges, ETag, per-connection `limit_rate`, error locations, an access
log to count what was served). Behaviour nginx cannot produce (reset mid-body, lying
Content-Length, an ETag that changes, redirects to another host that record headers) comes from
`ChaosOrigin`, a real aiohttp server on its own event loop thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from comfy_autocloud.aiothread import AppThread

AUTH_TOKEN = "Bearer s3cr3t-test-token"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


MODEL_SUFFIXES = (".safetensors", ".sft")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt")  # a torch checkpoint: a zip, or (legacy) a pickle


def safetensors_header(size: int) -> bytes:
    """The header of a valid safetensors file of exactly `size` bytes holding one U8 tensor (what follows it)."""
    guess = 64
    for _ in range(8):
        data = size - 8 - guess
        if data < 0:
            break
        text = json.dumps({"w": {"dtype": "U8", "shape": [data], "data_offsets": [0, data]}})
        header = text + " " * (-len(text) % 8)
        if len(header) == guess:
            return struct.pack("<Q", len(header)) + header.encode()
        guess = len(header)
    raise ValueError(f"no safetensors file of exactly {size} bytes (too small?)")


def safetensors_of(fill: bytes, size: int) -> bytes:
    """A valid safetensors file of exactly `size` bytes whose tensor data repeats `fill`."""
    header = safetensors_header(size)
    return header + (fill * ((size - len(header)) // len(fill) + 1))[: size - len(header)]


def random_safetensors(size: int) -> bytes:
    """A valid safetensors file of exactly `size` bytes whose tensor data is `os.urandom`."""
    header = safetensors_header(size)
    return header + os.urandom(size - len(header))


def safetensors_bytes(size: int, seed: int = 0) -> bytes:
    """A valid safetensors file of exactly `size` bytes: one U8 tensor of pseudo-random bytes."""
    header = safetensors_header(size)
    return header + random_bytes(size - len(header), seed)


BACKGROUND_MODULES = ("comfy_autocloud.store.settle", "comfy_autocloud.warmup.hash_later")


def background_pids(under: Path, modules: tuple[str, ...] = BACKGROUND_MODULES) -> list[int]:
    """Detached processes warmup starts (`python -m MODULE CACHE ...`) working on a cache below `under`: the
    deferred-durability flush (waits ~35 s, or as told, before flushing) and the hasher of first copies."""
    prefix = str(under).encode()
    wanted = {m.encode() for m in modules}
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if wanted.intersection(argv) and any(a.startswith(prefix) for a in argv):
            with contextlib.suppress(ValueError):
                pids.append(int(proc.name))
    return pids


def stop_background(under: Path) -> None:
    """SIGTERM every detached warmup process (BACKGROUND_MODULES) still working on a cache below `under`."""
    for pid in background_pids(under):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)


def wait_idle(under: Path, timeout: float = 120.0) -> None:
    """Wait until no process but this one works on paths below `under`, the deferred flush aside (it sleeps):
    for a benchmark, so that one case's background work (warmup's page-cache reader, its hasher) is not
    timed as part of the next case."""
    prefix = str(under).encode()
    deadline = time.monotonic() + timeout
    while True:
        busy = []
        for proc in Path("/proc").iterdir():
            if not proc.name.isdigit() or int(proc.name) == os.getpid():
                continue
            try:
                argv = (proc / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"comfy_autocloud.store.settle" not in argv and any(a.startswith(prefix) for a in argv):
                busy.append(int(proc.name))
        if not busy:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"processes {busy} still work below {under} after {timeout:.0f} s")
        time.sleep(0.02)


def wait_hashed(cache: Path, timeout: float = 120.0) -> None:
    """Wait until the background hasher of warmup's first copies (warmup/hash_later.py) for `cache` is done:
    no entry left unhashed, and the process (which then writes the volume's sidecar) gone. Both, because a
    process that has just been exec'd can show an empty /proc/PID/cmdline for a moment."""
    from comfy_autocloud.store import Store

    deadline = time.monotonic() + timeout
    with Store(cache) as store:
        while store.unhashed():
            if time.monotonic() > deadline:
                raise TimeoutError(f"entries of {cache} still unhashed after {timeout:.0f} s")
            time.sleep(0.02)
    while background_pids(cache, ("comfy_autocloud.warmup.hash_later",)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the background hasher for {cache} still runs after {timeout:.0f} s")
        time.sleep(0.02)


def write_random_file(path: Path, size: int, seed: int = 0) -> str:
    """Write `size` deterministic pseudo-random bytes (seeded PRNG, 16 MiB blocks); return the sha256.

    A `.safetensors` name gets a valid safetensors file of that size (a header, then the random bytes as
    one tensor), a `.pth`/`.pt`/`.ckpt` name starts like a (legacy) pickle: the store refuses model files
    that are not what their name says.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        left = size
        if path.suffix.lower() in MODEL_SUFFIXES + PICKLE_SUFFIXES:
            header = safetensors_header(size) if path.suffix.lower() in MODEL_SUFFIXES else b"\x80\x02"
            f.write(header)
            digest.update(header)
            left -= len(header)
        while left:
            chunk = rng.randbytes(min(left, 16 << 20))
            f.write(chunk)
            digest.update(chunk)
            left -= len(chunk)
    return digest.hexdigest()


def random_bytes(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


@dataclass
class LogEntry:
    method: str
    uri: str
    status: int
    body_bytes: int
    range: str
    if_range: str


class NginxOrigin:
    """nginx serving `data_dir` on 127.0.0.1:<free port> from a config written into `work_dir`.

    Locations: `/` plain files; `/slow/` the same files with `limit_rate` per connection;
    `/norange/` without byte ranges (`max_ranges 0`); `/auth/` needing `Authorization: AUTH_TOKEN`;
    `/s500/`, `/s503/`, `/s429/` (with `Retry-After`), `/s410/` error answers. Every request lands in
    `access.log` (unbuffered) so tests can count requests and bytes served.
    """

    def __init__(self, data_dir: Path, work_dir: Path, *, limit_rate: str = "40m",
                 retry_after: str = "1", workers: int = 1) -> None:
        self.data_dir = Path(data_dir)
        self.work_dir = Path(work_dir)
        self.limit_rate = limit_rate
        self.retry_after = retry_after
        self.workers = workers
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("nginx") is not None

    @property
    def access_log(self) -> Path:
        return self.work_dir / "access.log"

    def _config(self) -> str:
        d = self.work_dir
        data = str(self.data_dir).rstrip("/") + "/"
        user = "user root;" if os.geteuid() == 0 else ""
        temps = "\n".join(
            f"    {name}_temp_path {d}/tmp_{name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        return f"""
{user}
worker_processes {self.workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    log_format ac
        '$request_method\\t$request_uri\\t$status\\t$body_bytes_sent\\t$http_range\\t$http_if_range';
    access_log {d}/access.log ac;
{temps}
    server {{
        listen 127.0.0.1:{self.port};
        server_name localhost;
        root {data};
        location /slow/ {{ alias {data}; limit_rate {self.limit_rate}; }}
        location /norange/ {{ alias {data}; max_ranges 0; }}
        location /auth/ {{
            alias {data};
            if ($http_authorization != "{AUTH_TOKEN}") {{ return 401; }}
        }}
        location /s500/ {{ return 500; }}
        location /s503/ {{ return 503; }}
        location /s410/ {{ return 410; }}
        location /s429/ {{ add_header Retry-After {self.retry_after} always; return 429; }}
    }}
}}
"""

    def start(self, timeout: float = 10.0) -> NginxOrigin:
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        conf = self.work_dir / "nginx.conf"
        conf.write_text(self._config())
        self.access_log.write_text("")
        self.proc = subprocess.Popen(
            ["nginx", "-c", str(conf), "-p", str(self.work_dir), "-e", str(self.work_dir / "error.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise RuntimeError(f"nginx exited at start: {err}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError("nginx did not start listening in time")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self.proc is not None and self.proc.stderr:
            self.proc.stderr.close()
        self.proc = None

    def __enter__(self) -> NginxOrigin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}"

    def _settle(self, quiet: float = 0.05, limit: float = 1.0) -> None:
        """nginx logs a request just after sending its answer: wait until the log stops growing."""
        deadline = time.monotonic() + limit
        size = self.access_log.stat().st_size
        while time.monotonic() < deadline:
            time.sleep(quiet)
            now = self.access_log.stat().st_size
            if now == size:
                return
            size = now

    def entries(self, path: str | None = None) -> list[LogEntry]:
        """Parsed access-log lines (optionally only those whose URI path equals `path`)."""
        self._settle()
        out: list[LogEntry] = []
        want = None if path is None else "/" + path.lstrip("/")
        for line in self.access_log.read_text().splitlines():
            parts = line.split("\t")
            if len(parts) < 6:
                continue
            method, uri, status, sent, rng, if_range = parts[:6]
            if want is not None and uri.split("?", 1)[0] != want:
                continue
            out.append(LogEntry(method, uri, int(status), int(sent), rng, if_range))
        return out

    def requests(self, path: str) -> int:
        return len(self.entries(path))

    def bytes_served(self, path: str) -> int:
        return sum(e.body_bytes for e in self.entries(path))

    def clear_log(self) -> None:
        """Truncate the access log in place (nginx keeps its O_APPEND descriptor)."""
        with open(self.access_log, "r+") as f:
            f.truncate(0)


@dataclass
class Behaviour:
    """How ChaosOrigin answers one path. Counters are per path and only ever grow."""

    data: bytes = b""
    etag: str | None = '"v1"'
    last_modified: str | None = "Mon, 01 Jan 2024 00:00:00 GMT"
    ranges: bool = True              # False: ignore Range, always 200 with the full body
    head_allowed: bool = True        # False: HEAD answers 405
    reset_after: int | None = None   # close the connection after this many body bytes ...
    reset_times: int = 0             # ... for the first N GET responses
    lie_length: int | None = None    # announce this Content-Length but send `data` (shorter)
    changing_etag: bool = False      # every response carries a new ETag
    head_etag: str | None = None     # HEAD answers with this (stale) ETag instead
    trickle: int | None = None       # bytes per second per response
    stall_after: int | None = None   # send this many body bytes, then go silent (idle timeout)
    fail_first: int = 0              # the first N requests (any method) answer `fail_status`
    fail_status: int = 503
    retry_after: str | None = None
    redirect_to: str | None = None   # 302 to this absolute URL
    status: int | None = None        # always answer this status (no body)
    requests: int = 0
    resets_done: int = 0
    etag_counter: int = 0


@dataclass
class SeenRequest:
    host: str
    path: str
    method: str
    headers: dict[str, str] = field(default_factory=dict)


class ChaosOrigin:
    """A real aiohttp server (own loop in a thread) on 127.0.0.1 and 127.0.0.2, misbehaving per path."""

    def __init__(self) -> None:
        self.behaviours: dict[str, Behaviour] = {}
        self.seen: list[SeenRequest] = []
        self._server = AppThread(self._app, hosts=("127.0.0.1", "127.0.0.2"), name="chaos-origin")
        self._lock = threading.Lock()

    def add(self, path: str, behaviour: Behaviour) -> str:
        self.behaviours["/" + path.lstrip("/")] = behaviour
        return self.url(path)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{path.lstrip('/')}"

    def seen_for(self, path: str) -> list[SeenRequest]:
        want = "/" + path.lstrip("/")
        with self._lock:
            return [s for s in self.seen if s.path == want]

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        b = self.behaviours.get(request.path)
        with self._lock:
            self.seen.append(SeenRequest(request.host, request.path, request.method, dict(request.headers)))
        if b is None:
            return web.Response(status=404, text="not here")
        b.requests += 1
        if b.fail_first and b.requests <= b.fail_first:
            headers = {"Retry-After": b.retry_after} if b.retry_after else {}
            return web.Response(status=b.fail_status, headers=headers, text="busy")
        if b.status is not None:
            return web.Response(status=b.status, text="no")
        if b.redirect_to is not None:
            raise web.HTTPFound(b.redirect_to)
        if request.method == "HEAD" and not b.head_allowed:
            return web.Response(status=405)
        etag = b.etag
        if b.changing_etag:
            b.etag_counter += 1
            etag = f'"v{b.etag_counter}"'
        if request.method == "HEAD" and b.head_etag is not None:
            etag = b.head_etag
        data = b.data
        total = len(data)
        start, end = 0, total - 1
        status = 200
        rng = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if rng and b.ranges and total and (if_range is None or if_range in (etag, b.last_modified)):
            spec = rng.split("=", 1)[1].split(",")[0]
            lo, _, hi = spec.partition("-")
            start = int(lo)
            end = min(int(hi), total - 1) if hi else total - 1
            status = 206
        headers: dict[str, str] = {}
        if etag:
            headers["ETag"] = etag
        if b.last_modified:
            headers["Last-Modified"] = b.last_modified
        if b.ranges:
            headers["Accept-Ranges"] = "bytes"
        body = data[start : end + 1] if total else b""
        length = len(body) if b.lie_length is None else b.lie_length
        if status == 206:
            announced = total if b.lie_length is None else b.lie_length
            headers["Content-Range"] = f"bytes {start}-{end}/{announced}"
        headers["Content-Length"] = str(length)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        reset_now = b.reset_after is not None and b.resets_done < b.reset_times
        if reset_now:
            b.resets_done += 1
            body = body[: b.reset_after]
        if b.stall_after is not None:
            await resp.write(body[: b.stall_after])
            await asyncio.sleep(3600)
        step = 64 * 1024
        for i in range(0, len(body), step):
            piece = body[i : i + step]
            await resp.write(piece)
            if b.trickle:
                await asyncio.sleep(len(piece) / b.trickle)
        if reset_now or b.lie_length is not None:
            assert request.transport is not None
            request.transport.abort() if reset_now else request.transport.close()
            return resp
        await resp.write_eof()
        return resp

    @property
    def port(self) -> int:
        return self._server.port

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        return app

    def start(self) -> ChaosOrigin:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> ChaosOrigin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def nginx_running(data_dir: Path, work_dir: Path, **kwargs: object) -> Iterator[NginxOrigin]:
    origin = NginxOrigin(data_dir, work_dir, **kwargs)  # type: ignore[arg-type]
    origin.start()
    try:
        yield origin
    finally:
        origin.stop()


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """Blocking GET for test assertions about the origins themselves."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class RawOrigin:
    """A socket server that answers each path with exact bytes: what no HTTP library will send on purpose.

    `add(path, head, body, close=...)`: `head` is the status line and headers (no blank line), `body` what
    follows on GET. With `close` the connection ends after the body (a close-delimited body, or one cut
    short); without it the connection stays open for the next request, so bytes beyond Content-Length land
    where the client expects its next answer. Every request is counted in `requests[path]`.
    """

    def __init__(self) -> None:
        self.answers: dict[str, tuple[bytes, bytes, bool]] = {}
        self.requests: dict[str, int] = {}
        origin = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                sock = self.request
                sock.settimeout(10)
                buf = b""
                with contextlib.suppress(OSError):
                    for _ in range(100):  # requests on one connection
                        while b"\r\n\r\n" not in buf:
                            chunk = sock.recv(65536)
                            if not chunk:
                                return
                            buf += chunk
                        raw, buf = buf.split(b"\r\n\r\n", 1)
                        method, path = raw.split(b" ", 2)[:2]
                        key = path.decode().split("?", 1)[0]
                        origin.requests[key] = origin.requests.get(key, 0) + 1
                        head, body, close = origin.answers.get(key, (b"HTTP/1.1 404 Not Found\r\n"
                                                                     b"Content-Length: 0", b"", False))
                        sock.sendall(head + b"\r\n\r\n" + (body if method != b"HEAD" else b""))
                        if close:
                            return

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="raw-origin", daemon=True)

    def add(self, path: str, head: str, body: bytes, *, close: bool = True) -> str:
        self.answers["/" + path.lstrip("/")] = (head.replace("\n", "\r\n").encode(), body, close)
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/{path.lstrip('/')}"

    def __enter__(self) -> RawOrigin:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
