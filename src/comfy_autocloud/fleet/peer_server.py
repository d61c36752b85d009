"""The peer server: a node serves its verified files (and its downloads in progress) to other nodes.

Routes (all behind a shared-secret bearer token, compared in constant time):

- `GET|HEAD /v1/files/<folder>/<filename>`: a file of the store, only if the store's index lists it
  (so it was verified by sha256 on commit). The key goes through `Store.path_for` (no `..`, no
  absolute paths, no folder symlinked out of the cache) and the file is opened with `O_NOFOLLOW` and
  must be the regular file of the indexed size. Single byte ranges (206), `ETag` = the sha256,
  `If-Range`. The file is held `Store.in_use` while it streams, so eviction cannot pull it away.
- `GET|HEAD /v1/partial/<folder>/<filename>`: the download of that key this node is running, to let
  followers stream it while the origin download goes on. Only ranges that the engine's durable
  record (`<part>.state`, written after fdatasync) lists as finished are sent; a request for bytes not
  there yet waits for them. These bytes are *not* verified: the follower hashes the whole file and
  commits only if it matches the hash the holder announces after its own verification. A stream
  stops when the download stops (its single-flight lock is free and the file did not become final).
- `GET /metrics`: Prometheus text (requests by route and status, bytes served, errors, streams).

Per peer (client address) a token bucket limits requests, and optionally bytes per second. Failed
authentications are limited per client before the token is compared (fleet/auth_limit.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import hashlib
import hmac
import logging
import os
import stat
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from comfy_autocloud.aiothread import AppThread
from comfy_autocloud.errors import StoreError
from comfy_autocloud.fleet.auth_limit import AuthFailures
from comfy_autocloud.store import Store
from comfy_autocloud.transfer import RateLimiter
from comfy_autocloud.transfer.ranges import PartState, live_path, state_path

log = logging.getLogger("comfy_autocloud.fleet.peer")

CHUNK = 8 << 20              # bytes per sendfile call (limiter and metrics step)
PARTIAL_POLL = 0.05          # seconds between looks at a growing partial download
PARTIAL_STALL = 30.0         # give up on a partial that makes no progress for this long
COMMIT_WAIT = 15.0           # longest wait, lock held and no record, for a download's first bytes or its commit
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True)
class PeerLimits:
    """Per-peer limits: requests per second (token bucket with `burst`) and optional bytes per second;
    and whether `/metrics` (counters only, no file or key names) may be read without the token, so a
    Prometheus that discovers pods by annotation can scrape it."""

    requests_per_s: float = 200.0
    burst: int = 400
    bytes_per_s: float | None = None
    public_metrics: bool = False
    auth_failures_per_s: float = 1.0  # failed authentications a client may make (fleet/auth_limit.py)
    auth_failure_burst: int = 10


class _Bucket:
    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()

    def take(self) -> float:
        """0.0 if a request may go now, else seconds until it may."""
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class Metrics:
    """Counters rendered as Prometheus text; no labels carry secrets or file names."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, int], int] = defaultdict(int)
        self.bytes_served: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.active = 0

    def render(self, node: str) -> str:
        lines = [
            "# HELP autocloud_peer_requests_total Requests answered by the peer server.",
            "# TYPE autocloud_peer_requests_total counter",
        ]
        for (route, status), n in sorted(self.requests.items()):
            lines.append(f'autocloud_peer_requests_total{{node="{node}",route="{route}",status="{status}"}} {n}')
        lines += ["# HELP autocloud_peer_bytes_served_total Body bytes sent to peers.",
                  "# TYPE autocloud_peer_bytes_served_total counter"]
        for route in ("files", "partial"):
            lines.append(f'autocloud_peer_bytes_served_total{{node="{node}",route="{route}"}} '
                         f"{self.bytes_served[route]}")
        lines += ["# HELP autocloud_peer_errors_total Streams that ended early or failed.",
                  "# TYPE autocloud_peer_errors_total counter"]
        for kind, n in sorted(self.errors.items()):
            lines.append(f'autocloud_peer_errors_total{{node="{node}",kind="{kind}"}} {n}')
        lines += ["# HELP autocloud_peer_active_streams Bodies being sent right now.",
                  "# TYPE autocloud_peer_active_streams gauge",
                  f'autocloud_peer_active_streams{{node="{node}"}} {self.active}']
        return "\n".join(lines) + "\n"


def parse_range(header: str | None, size: int) -> tuple[int, int] | str | None:
    """One `bytes=` range -> (start, end inclusive); None: serve everything; "unsatisfiable": 416."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    lo, sep, hi = header[6:].strip().partition("-")
    if not sep:
        return None
    try:
        if lo == "":
            n = int(hi)
            if n <= 0:
                return "unsatisfiable"
            return max(0, size - n), size - 1
        start = int(lo)
        end = int(hi) if hi else size - 1
    except ValueError:
        return None
    if start >= size:
        return "unsatisfiable"
    if start < 0 or end < start:
        return None
    return start, min(end, size - 1)


def load_progress(part: Path) -> PartState | None:
    """How far a download in progress is: its live record (pwritten, refreshed ~10x a second) when it
    belongs to the same download as the durable one, else the durable record."""
    state = PartState.load(state_path(part))
    live = PartState.load(live_path(part))
    if live is None:
        return state
    if state is None or live.identity != state.identity:
        return live  # written first after a (re)start
    return live if live.done_bytes() >= state.done_bytes() else state


def download_running(lock_path: Path) -> bool:
    """Whether some process holds the key's single-flight lock (i.e. is downloading it now)."""
    try:
        fd = os.open(lock_path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


class PeerServer:
    """The aiohttp application serving one store to peers (see module docstring)."""

    def __init__(self, store: Store, token: str, *, node_id: str = "node", limits: PeerLimits | None = None) -> None:
        if not token or len(token) < 8:
            raise ValueError("the peer token must be set and at least 8 characters long")
        self.store = store
        self.node_id = node_id
        self._token = token.encode()
        self.limits = limits or PeerLimits()
        self.metrics = Metrics()
        self._buckets: dict[str, _Bucket] = {}
        self._auth_failures = AuthFailures(self.limits.auth_failures_per_s, self.limits.auth_failure_burst)
        self._byte_limiters: dict[str, RateLimiter] = {}

    # ---------------------------------------------------------------- app
    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard])
        app.router.add_get("/v1/files/{key:.+}", self._files)
        app.router.add_get("/v1/partial/{key:.+}", self._partial)
        app.router.add_get("/metrics", self._metrics)
        return app

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(given.strip().encode(), self._token)

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.path.split("/")[2] if request.path.startswith("/v1/") else request.path.strip("/")
        route = route if route in ("files", "partial", "metrics") else "other"
        public = route == "metrics" and self.limits.public_metrics  # counters only; the rest needs the token
        peer = request.remote or "?"
        if not public:
            wait = self._auth_failures.blocked(peer)  # before the token is looked at: no brute force
            if wait > 0:
                self.metrics.requests[(route, 429)] += 1
                return web.Response(status=429, text="too many failed authentications\n",
                                    headers={"Retry-After": f"{max(1, round(wait))}"})
            if not self._authorized(request):
                self._auth_failures.failed(peer, route)
                self.metrics.requests[(route, 401)] += 1
                return web.Response(status=401, text="missing or wrong peer token\n",
                                    headers={"WWW-Authenticate": 'Bearer realm="autocloud-peer"'})
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = _Bucket(self.limits.requests_per_s, self.limits.burst)
        wait = bucket.take()
        if wait > 0:
            self.metrics.requests[(route, 429)] += 1
            return web.Response(status=429, text="peer rate limit\n", headers={"Retry-After": f"{max(1, round(wait))}"})
        try:
            resp = await handler(request)
        except web.HTTPException as exc:
            self.metrics.requests[(route, exc.status)] += 1
            raise
        self.metrics.requests[(route, resp.status)] += 1
        return resp

    def _limiter(self, request: web.Request) -> RateLimiter | None:
        if self.limits.bytes_per_s is None:
            return None
        peer = request.remote or "?"
        if peer not in self._byte_limiters:
            self._byte_limiters[peer] = RateLimiter(self.limits.bytes_per_s)
        return self._byte_limiters[peer]

    def _key(self, request: web.Request) -> str:
        key = request.match_info["key"]
        try:
            self.store.path_for(key)
        except StoreError:
            raise web.HTTPBadRequest(text="not a model key\n") from None
        return key

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=self.metrics.render(self.node_id), content_type="text/plain",
                            charset="utf-8", headers={"X-Content-Type-Options": "nosniff"})

    # ---------------------------------------------------------------- verified files
    async def _files(self, request: web.Request) -> web.StreamResponse:
        return await self._send_committed(request, self._key(request), "files", "not in this node's store\n")

    async def _send_committed(self, request: web.Request, key: str, route: str,
                              missing: str) -> web.StreamResponse:
        """The store's verified file for `key` (held in use while it is sent); 404 `missing` if there is none.

        Its ETag: the sha256 on /files; on /partial the identity of the download it came from (the same
        inode), so a follower's remaining ranges continue from it instead of starting over.
        """
        entry = self.store.lookup(key)
        if entry is None:
            raise web.HTTPNotFound(text=missing)
        if route == "files" and not entry.hashed:  # never announced before it is: nothing to verify it by
            raise web.HTTPNotFound(text="its sha256 is still being computed on this node\n")
        try:
            fd = os.open(self.store.path_for(key), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise web.HTTPNotFound(text=missing) from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size != entry.size:
                raise web.HTTPNotFound(text=missing)
            etag = f'"{entry.sha256}"' if route == "files" else _partial_etag(fd, entry.size)
            with self.store.in_use(key):
                return await self._send(request, route, fd, entry.size, etag, None)
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- downloads in progress
    async def _partial(self, request: web.Request) -> web.StreamResponse:
        key = self._key(request)
        part = self.store.partial_path(key)
        lock = self.store.lock_path(key)
        state = load_progress(part)
        deadline = time.monotonic() + COMMIT_WAIT
        while state is None and download_running(lock) and self.store.lookup(key) is None \
                and time.monotonic() < deadline:
            # The key's download lock is held but there is no progress record: starting (no byte written
            # yet) or finishing (the engine drops the record once every byte is hashed, then the store
            # renames and indexes the file). A follower asking now waits for the first bytes or for the
            # commit instead of getting a 404 (at the end it would take that as "nothing to stream" and
            # start over elsewhere; at the start it would only ask again and again).
            await asyncio.sleep(PARTIAL_POLL)
            state = load_progress(part)
        if state is not None and download_running(lock):
            try:
                fd = os.open(part, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                raise web.HTTPNotFound(text="no download of this key in progress here\n") from None
            try:
                tracker = _PartialTracker(self.store.path_for(key), part, self.store.lock_path(key), fd, state)
                return await self._send(request, "partial", fd, state.size, _partial_etag(fd, state.size), tracker)
            finally:
                os.close(fd)
        # Finished meanwhile: the final file is the same inode, so the same ETag.
        return await self._send_committed(request, key, "partial", "no download of this key in progress here\n")

    # ---------------------------------------------------------------- body
    async def _send(self, request: web.Request, route: str, fd: int, size: int, etag: str,
                    tracker: _PartialTracker | None) -> web.StreamResponse:
        rng = parse_range(request.headers.get("Range"), size)
        if_range = request.headers.get("If-Range")
        if if_range is not None and if_range != etag:
            rng = None  # the client's copy is of other bytes: send the whole file
        headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "no-store"}
        if rng == "unsatisfiable":
            return web.Response(status=416, headers={**headers, "Content-Range": f"bytes */{size}"})
        if isinstance(rng, tuple):
            start, end = rng
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        else:
            start, end, status = 0, size - 1, 200
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_length = end - start + 1
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        if request.method == "HEAD" or end < start:
            return resp
        loop = asyncio.get_running_loop()
        limiter = self._limiter(request)
        transport = request.transport
        fobj = os.fdopen(fd, "rb", buffering=0, closefd=False)
        use_sendfile = transport is not None
        pos = start
        self.metrics.active += 1
        try:
            while pos <= end:
                want = min(CHUNK, end + 1 - pos)
                if tracker is not None:
                    avail = await tracker.wait_for(pos)
                    if avail <= 0:
                        self.metrics.errors["partial_stopped"] += 1
                        assert request.transport is not None
                        request.transport.close()  # the holder stopped: end early so the client notices
                        return resp
                    want = min(want, avail)
                if limiter is not None:
                    await limiter.acquire(want)
                sent = 0
                if use_sendfile:  # zero-copy from the page cache to the socket
                    try:
                        assert transport is not None
                        sent = await loop.sendfile(transport, fobj, pos, want)
                    except NotImplementedError:
                        use_sendfile = False
                if not use_sendfile:
                    data = await loop.run_in_executor(None, os.pread, fd, want, pos)
                    await resp.write(data)
                    sent = len(data)
                if not sent:
                    self.metrics.errors["short_read"] += 1
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                pos += sent
                self.metrics.bytes_served[route] += sent
        except (ConnectionResetError, ConnectionError, asyncio.CancelledError):
            self.metrics.errors["client_gone"] += 1
            raise
        finally:
            self.metrics.active -= 1
        await resp.write_eof()
        return resp


def _partial_etag(fd: int, size: int) -> str:
    """Identity of a download in progress: its inode (kept by the rename that commits it) and size."""
    st = os.fstat(fd)
    return '"partial-' + hashlib.sha256(f"{st.st_dev}:{st.st_ino}:{size}".encode()).hexdigest()[:32] + '"'


class _PartialTracker:
    """How many bytes from a position of a growing `.part` are known to be written and durable."""

    def __init__(self, final: Path, part: Path, lock: Path, fd: int, state: PartState) -> None:
        self.final = final
        self.part = part
        self.lock = lock
        st = os.fstat(fd)
        self.ident = (st.st_dev, st.st_ino)
        self.state = state
        self.identity = state.identity
        self.complete = False
        self.checked = 0.0

    def _refresh(self) -> bool:
        """Re-read the record; False when this download is over without becoming the final file."""
        with contextlib.suppress(OSError):
            st = os.stat(self.final, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == self.ident:
                self.complete = True  # committed: every byte is there (and was verified by the holder)
                return True
        state = load_progress(self.part)
        if state is not None:
            if state.identity != self.identity:
                return False  # the holder started over on other bytes: this stream is over
            self.state = state
            return True
        # No record: finishing (state removed just before the rename), restarted, or dead.
        return download_running(self.lock)

    def _available(self, pos: int) -> int:
        if self.complete:
            return self.state.size - pos
        for lo, hi in self.state.done:
            if lo <= pos < hi:
                return hi - pos
        return 0

    async def wait_for(self, pos: int) -> int:
        """Bytes available at `pos` (waiting for them to arrive); 0 when the download stopped."""
        last_progress = time.monotonic()
        while True:
            n = self._available(pos)
            if n > 0:
                return n
            if not self._refresh():
                return 0
            n = self._available(pos)
            if n > 0:
                return n
            if time.monotonic() - last_progress > PARTIAL_STALL:
                return 0
            await asyncio.sleep(PARTIAL_POLL)


class PeerServerThread:
    """Runs a PeerServer on its own event loop thread (tests, and the ComfyUI adapter's background server)."""

    def __init__(self, server: PeerServer, host: str = "127.0.0.1", port: int = 0) -> None:
        self.server = server
        self.host = host
        self._thread = AppThread(server.app, hosts=(host,), port=port, name="autocloud-peer-server",
                                 shutdown_timeout=5.0)

    @property
    def port(self) -> int:
        return self._thread.port

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self) -> PeerServerThread:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._thread.stop()

    def __enter__(self) -> PeerServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


async def serve_forever(server: PeerServer, host: str, port: int, on_ready: Callable[[int], None] | None = None,
                        stop: asyncio.Event | None = None) -> None:
    """Run the peer server on this event loop until `stop` is set (or forever)."""
    runner = web.AppRunner(server.app(), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    actual = port
    srv = site._server
    if srv is not None and getattr(srv, "sockets", None):
        actual = int(srv.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    if on_ready is not None:
        on_ready(actual)
    try:
        await (stop.wait() if stop is not None else asyncio.Event().wait())
    finally:
        await runner.cleanup()
