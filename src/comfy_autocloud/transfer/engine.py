"""The download engine: ranged, parallel, adaptive, resumable, verified while it downloads.

One call downloads one URL into `part_path` (never a final path: the store renames it after its own
checks). The shape of a run:

1. probe: HEAD (or `GET Range: bytes=0-` when HEAD is refused), redirects followed by hand so that
   credentials are dropped when the redirect leaves the origin; learn size, ETag, Last-Modified and
   whether byte ranges work;
2. resume or start afresh: `<part>.state` (see `ranges.py`) is trusted only when URL key, size and a
   validator match; every ranged request then carries `If-Range`, and a 200 answer means the file
   changed, so the download restarts from zero on that very response;
3. ranged workers on a preallocated file take pieces in file order and `pwrite` what they receive;
   a controller adds connections while aggregate throughput rises (past 16 when an origin throttles
   each connection) and backs off when more stop helping; free workers steal half of the largest
   remaining piece;
4. a hasher thread hashes the contiguous finished prefix while bytes arrive (`hashlib` drops the GIL),
   a saver thread fdatasyncs the part and then records finished ranges atomically every ~0.5 s;
5. the result is checked against the announced/expected size; errors name the redacted URL.

Mirrors (`TransferOptions.mirrors`): more URLs serving the same bytes (fleet peers holding a verified
copy). Ranged workers spread over the URL and its mirrors; a mirror that fails, answers without a
range or announces another size is dropped for the rest of the call and its piece goes to the
others. Mirrors are not probed and carry no If-Range, so a caller that passes mirrors must check the
result's sha256 (the fetch service does; it only passes mirrors when it knows the hash).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
from yarl import URL

from ..errors import Cancelled, IntegrityError, NotEnoughSpace, TransferError
from ..progress import CancelToken
from ..redact import redact_text, redact_url
from .ranges import PartState, Segment, SegmentTable, live_path, remove_state, state_path, url_key
from .ratelimit import RateLimiter
from .retry import FATAL_STATUSES, RetryPolicy

log = logging.getLogger("comfy_autocloud.transfer")

ProgressFn = Callable[[int, "int | None"], None]

START_CONNECTIONS = 8
MIN_SPLIT = 1 << 20           # never steal less than 1 MiB per side
MIN_PIECE = 4 << 20           # a worker's request when nothing is known yet
MAX_PIECE = 64 << 20
SAVE_INTERVAL = 0.5           # seconds between durable state records
LIVE_INTERVAL = 0.1           # seconds between live progress records (for peers streaming this download)
PROGRESS_INTERVAL = 0.1       # at most ~10 progress calls a second
TICK = 0.05                   # main loop: cancel checks, progress, the controller
MAX_REDIRECTS = 10
MAX_RESTARTS = 3
HASH_BLOCK = 8 << 20
READ_BUFSIZE = 1 << 20
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key",
                                 "x-amz-security-token"})
_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


@dataclass(frozen=True)
class Mirror:
    """Another URL for the same bytes; its headers replace the call's (each peer has its own token)."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    display: str = ""


@dataclass
class TransferOptions:
    connections: int | None = None      # None = adaptive; N = fixed
    max_connections: int = 64
    rate_limit: int | None = None       # bytes/s for this download
    limiter: RateLimiter | None = None  # shared, process-wide bucket
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    connect_timeout: float = 15.0
    read_timeout: float = 60.0          # idle read timeout
    headers: Mapping[str, str] = field(default_factory=dict)  # may contain secrets (Authorization)
    expected_size: int | None = None
    mirrors: tuple[Mirror, ...] = ()    # ranged mode only; the caller verifies the sha256
    # The caller verifies the sha256 of the whole file: resume a recorded partial of the same size even
    # when it came from another URL or validator (a follower switching from a peer's download in
    # progress to its finished file, or to another peer, keeps what it has).
    resume_any_source: bool = False
    # A finished download leaves a complete `.live` record (and no `.state`): peers streaming it read the
    # last bytes at once instead of waiting for the caller's checks and commit; the caller removes it
    # (`ranges.remove_live`) after committing, or with `discard_partial`.
    keep_live_record: bool = False


@dataclass
class TransferResult:
    size: int
    sha256: str
    etag: str | None
    last_modified: str | None
    bytes_downloaded: int   # bytes received over the network by THIS call
    resumed_bytes: int      # bytes reused from an earlier partial
    seconds: float
    connections: int        # peak connections used
    source_ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # [start, end) each delivered

    @property
    def by_source(self) -> dict[str, int]:
        """Body bytes each source (redacted) delivered in this call."""
        return {src: sum(end - start for start, end in ranges) for src, ranges in self.source_ranges.items()}


class _Retryable(Exception):
    """One attempt failed in a way that may succeed when tried again."""

    def __init__(self, reason: str, status: int | None = None, retry_after: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after


class _Switch(Exception):
    """A mirror was dropped: retry the piece at once on another source (no retry budget spent)."""


class _Restart(Exception):
    """A ranged request got the whole (changed or unrangeable) file: continue as one stream on it."""

    def __init__(self, response: aiohttp.ClientResponse, url: str, headers: dict[str, str]) -> None:
        super().__init__("restart")
        self.response = response
        self.url = url
        self.headers = headers


@dataclass
class _Remote:
    url: str                      # after redirects
    headers: dict[str, str]       # request headers valid for `url` (credentials dropped cross-origin)
    size: int | None
    etag: str | None
    last_modified: str | None
    ranges: bool
    response: aiohttp.ClientResponse | None = None  # an open GET to reuse as the first stream
    response_offset: int = 0


@dataclass
class _Source:
    """Where ranged requests go: the probed URL, or a mirror."""

    url: str
    headers: dict[str, str]
    display: str
    if_range: str | None = None
    alive: bool = True
    ranges: list[tuple[int, int]] = field(default_factory=list)  # [start, end) this source delivered

    def delivered(self, start: int, end: int) -> None:
        if end > start:
            if self.ranges and self.ranges[-1][1] == start:
                self.ranges[-1] = (self.ranges[-1][0], end)
            else:
                self.ranges.append((start, end))


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    port = p.port or {"http": 80, "https": 443}.get(p.scheme)
    return p.scheme, (p.hostname or "").lower(), port


def _strong_etag(etag: str | None) -> str | None:
    """If-Range takes only strong validators; a weak ETag (W/"...") can't be used."""
    if etag and not etag.startswith("W/"):
        return etag
    return None


def _write_all(fd: int, data: bytes | memoryview, offset: int, where: str) -> None:
    try:
        n = os.pwrite(fd, data, offset)
        while n < len(data):
            data = memoryview(data)[n:]
            offset += n
            n = os.pwrite(fd, data, offset)
    except OSError as e:
        raise TransferError(where, f"cannot write the partial file: {e.strerror or e}") from None


class _Hasher(threading.Thread):
    """Hashes [0, prefix()) of the part file while the download goes on, reading from the page cache."""

    def __init__(self, fd: int, prefix: Callable[[], int]) -> None:
        super().__init__(name="autocloud-hash", daemon=True)
        self.fd = fd
        self.prefix = prefix
        self.digest = hashlib.sha256()
        self.done = 0
        self.target: int | None = None
        self.error: BaseException | None = None
        self._stop_event = threading.Event()
        self._buf = bytearray(HASH_BLOCK)

    def run(self) -> None:
        view = memoryview(self._buf)
        try:
            while not self._stop_event.is_set():
                limit = self.prefix()
                if self.target is not None:
                    limit = min(limit, self.target)
                if limit > self.done:
                    n = os.preadv(self.fd, [view[: min(HASH_BLOCK, limit - self.done)]], self.done)
                    if n <= 0:
                        raise OSError(f"unexpected end of the partial file at {self.done}")
                    self.digest.update(view[:n])
                    self.done += n
                elif self.target is not None and self.done >= self.target:
                    return
                else:
                    self._stop_event.wait(0.01)
        except BaseException as e:  # reported to the engine, which raises it
            self.error = e

    def finish(self, size: int) -> None:
        self.target = size

    def abort(self) -> None:
        self._stop_event.set()


class _Saver(threading.Thread):
    """Every SAVE_INTERVAL: fdatasync the part, then atomically record the ranges that sync covered.

    Every LIVE_INTERVAL in between: the `.live` record (ranges pwritten so far, no fsync) for a peer
    server streaming this download to other nodes, so they trail it by ~0.1 s instead of ~0.5 s.
    """

    def __init__(self, fd: int, part_path: Path, table: SegmentTable, meta: PartState) -> None:
        super().__init__(name="autocloud-state", daemon=True)
        self.fd = fd
        self.path = state_path(part_path)
        self.live = live_path(part_path)
        self._live_last: list[tuple[int, int]] | None = None
        self.table = table
        self.meta = meta
        self._stop_event = threading.Event()
        self._lock = threading.Lock()
        self._last: list[tuple[int, int]] | None = None
        self.error: BaseException | None = None

    def save_now(self) -> None:
        with self._lock:
            done = self.table.done_intervals()  # snapshot first: everything in it is already pwritten
            if done == self._last:
                return
            os.fdatasync(self.fd)
            self.meta.with_done(done).save(self.path)
            self._last = done

    def save_live(self) -> None:
        done = self.table.done_intervals()
        if done != self._live_last:
            self.meta.with_done(done).save(self.live, durable=False)
            self._live_last = done

    def run(self) -> None:
        ticks = 0
        every = max(1, round(SAVE_INTERVAL / LIVE_INTERVAL))
        while not self._stop_event.wait(LIVE_INTERVAL):
            ticks += 1
            try:
                if ticks % every == 0:
                    self.save_now()
                else:
                    self.save_live()
            except OSError as e:  # a missed record only costs re-fetching; report, keep downloading
                self.error = e
                log.warning("cannot record download progress in %s: %s", self.path, e.strerror or e)

    def stop(self) -> None:
        self._stop_event.set()


class _Download:
    """State of one `download_async` call."""

    def __init__(self, url: str, part_path: Path, options: TransferOptions,
                 progress: ProgressFn | None, cancel: CancelToken | None) -> None:
        self.url = url
        self.part_path = Path(part_path)
        self.opt = options
        self.progress = progress
        self.cancel = cancel
        self.display = redact_url(url)
        self.secrets = sorted({s for m in [Mirror(url, options.headers), *options.mirrors]
                               for s in self._collect_secrets(m.url, m.headers)}, key=len, reverse=True)
        self.limiters = [x for x in (RateLimiter(options.rate_limit) if options.rate_limit else None,
                                     options.limiter) if x is not None]
        self.received = 0          # network body bytes this call
        self.resumed = 0
        self.peak = 0
        self.rtt = 0.001
        self.fd = -1
        self.table: SegmentTable | None = None
        self.remote: _Remote | None = None
        self.session: aiohttp.ClientSession | None = None
        self.workers: dict[int, asyncio.Task[None]] = {}
        self.target = 1
        self.piece = MIN_PIECE
        self.hasher: _Hasher | None = None
        self.saver: _Saver | None = None
        self.last_progress = 0.0
        self.if_range: str | None = None
        self.samples: list[tuple[float, float]] = []  # (request start, bytes/s) of finished requests
        self.sources: list[_Source] = []

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _collect_secrets(url: str, headers: Mapping[str, str]) -> list[str]:
        out = [v for v in headers.values() if v]
        for v in headers.values():
            out.extend(v.split()[1:])  # "Bearer TOKEN" -> also "TOKEN"
        p = urlsplit(url)
        if p.password:
            out.append(p.password)
        if p.username:
            out.append(p.username)
        out.extend(v for _, v in parse_qsl(p.query) if len(v) >= 4)
        return sorted(set(out), key=len, reverse=True)

    def _clean(self, text: str) -> str:
        return redact_text(text, self.secrets)

    def _fail(self, reason: str, status: int | None = None, retryable: bool = False) -> TransferError:
        return TransferError(self.display, self._clean(reason), status=status, retryable=retryable)

    async def _open(self, url: str, headers: dict[str, str], method: str = "GET"
                    ) -> tuple[aiohttp.ClientResponse, str, dict[str, str]]:
        """One request, redirects followed here: leaving the origin drops credential headers."""
        assert self.session is not None
        for _ in range(MAX_REDIRECTS + 1):
            try:
                resp = await self.session.request(method, URL(url, encoded=True), headers=headers,
                                                  allow_redirects=False)
            except asyncio.TimeoutError:
                raise _Retryable("timed out connecting or waiting for the answer") from None
            except (aiohttp.ClientError, OSError) as e:
                raise _Retryable(f"connection failed ({type(e).__name__}: {e})") from None
            if resp.status in (301, 302, 303, 307, 308) and "Location" in resp.headers:
                location = resp.headers["Location"]
                resp.release()
                new = str(URL(url, encoded=True).join(URL(location, encoded=True)))
                if _origin(new) != _origin(url):
                    headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS}
                    log.info("redirected from %s to another origin %s; credentials not forwarded",
                             redact_url(url), redact_url(new))
                if resp.status == 303:
                    method = "GET" if method != "HEAD" else method
                url = new
                continue
            return resp, url, headers
        raise self._fail(f"more than {MAX_REDIRECTS} redirects")

    def _check_status(self, resp: aiohttp.ClientResponse, ok: tuple[int, ...]) -> None:
        status = resp.status
        if status in ok:
            return
        retry_after = resp.headers.get("Retry-After")
        resp.release()
        if self.opt.retry.is_retryable_status(status):
            raise _Retryable(f"HTTP {status} {resp.reason or ''}".strip(), status, retry_after)
        if status in FATAL_STATUSES or 400 <= status < 600:
            raise self._fail(f"HTTP {status} {resp.reason or ''}".strip(), status=status)
        raise self._fail(f"unexpected HTTP {status}", status=status)

    async def _with_retries(self, what: Callable[[], Any], progress_ref: Callable[[], int] | None = None) -> Any:
        """Run `what` until it succeeds, retrying _Retryable per the policy; progress resets the count."""
        failures = 0
        last_progress = progress_ref() if progress_ref else 0
        while True:
            try:
                return await what()
            except _Switch:
                continue  # a mirror was dropped; another source takes the piece
            except _Retryable as e:
                now_progress = progress_ref() if progress_ref else 0
                if now_progress > last_progress:
                    failures = 0
                    last_progress = now_progress
                failures += 1
                if not self.opt.retry.can_retry(failures):
                    raise self._fail(f"{e.reason}; gave up after {failures} attempts", status=e.status,
                                     retryable=True) from None
                delay = self.opt.retry.delay(failures, e.retry_after)
                log.warning("%s: %s; retry %d/%d in %.2fs", self.display, self._clean(e.reason),
                            failures, self.opt.retry.attempts - 1, delay)
                await asyncio.sleep(delay)

    # ---------------------------------------------------------------- probe
    async def _probe(self) -> _Remote:
        headers = {"Accept-Encoding": "identity", **self.opt.headers}

        async def attempt() -> _Remote:
            t0 = time.monotonic()
            resp, url, hdrs = await self._open(self.url, dict(headers), "HEAD")
            self.rtt = max(0.0005, time.monotonic() - t0)
            if resp.status in (401, 404, 410) or self.opt.retry.is_retryable_status(resp.status):
                self._check_status(resp, (200,))
            if 200 <= resp.status < 300:
                h = resp.headers
                resp.release()
                size = int(h["Content-Length"]) if h.get("Content-Length", "").isdigit() else None
                ranges = "bytes" in h.get("Accept-Ranges", "").lower() and size is not None
                return _Remote(url, hdrs, size, h.get("ETag"), h.get("Last-Modified"), ranges)
            resp.release()
            # HEAD refused (405/501/403 on presigned URLs...): ask for everything, as a range.
            resp, url, hdrs = await self._open(self.url, {**headers, "Range": "bytes=0-"})
            self._check_status(resp, (200, 206))
            h = resp.headers
            if resp.status == 206:
                m = _CONTENT_RANGE.match(h.get("Content-Range", ""))
                if not m or m.group(1) != "0" or m.group(3) == "*":
                    resp.close()
                    raise _Retryable("malformed Content-Range in the answer to bytes=0-")
                return _Remote(url, hdrs, int(m.group(3)), h.get("ETag"), h.get("Last-Modified"), True, resp)
            size = int(h["Content-Length"]) if h.get("Content-Length", "").isdigit() else None
            return _Remote(url, hdrs, size, h.get("ETag"), h.get("Last-Modified"), False, resp)

        return await self._with_retries(attempt)

    # ---------------------------------------------------------------- file
    def _open_part(self, size: int | None, keep: bool) -> None:
        self.part_path.parent.mkdir(parents=True, exist_ok=True)
        if self.fd < 0:
            self.fd = os.open(self.part_path, os.O_RDWR | os.O_CREAT, 0o644)
        if keep:
            return
        os.ftruncate(self.fd, 0)
        if size:
            try:
                os.posix_fallocate(self.fd, 0, size)
            except OSError as e:
                if e.errno == 28:  # ENOSPC
                    os.ftruncate(self.fd, 0)
                    raise NotEnoughSpace(str(self.part_path), f"no space for {size} bytes") from None
                os.ftruncate(self.fd, size)  # file systems without fallocate: sparse file

    def _start_hasher(self, prefix: Callable[[], int]) -> None:
        if self.hasher is not None:
            self.hasher.abort()
            self.hasher.join()
        self.hasher = _Hasher(self.fd, prefix)
        self.hasher.start()

    def _stop_saver(self, final_save: bool) -> None:
        if self.saver is None:
            return
        self.saver.stop()
        self.saver.join()
        if final_save:
            try:
                self.saver.save_now()
            except OSError as e:
                log.warning("cannot record download progress: %s", e.strerror or e)
        self.saver = None

    # ---------------------------------------------------------------- run
    async def run(self) -> TransferResult:
        t0 = time.monotonic()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.opt.connect_timeout,
                                        sock_read=self.opt.read_timeout)
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self.session = aiohttp.ClientSession(connector=connector, timeout=timeout, auto_decompress=False,
                                             read_bufsize=READ_BUFSIZE, trust_env=False)
        try:
            return await self._run(t0)
        finally:
            for task in self.workers.values():
                task.cancel()
            if self.workers:
                await asyncio.gather(*self.workers.values(), return_exceptions=True)
            self._stop_saver(final_save=True)
            if self.hasher is not None:
                self.hasher.abort()
                self.hasher.join()
            if self.remote is not None and self.remote.response is not None:
                self.remote.response.close()
            await self.session.close()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    async def _run(self, t0: float) -> TransferResult:
        self._check_cancel()
        remote = self.remote = await self._probe()
        expected = self.opt.expected_size
        if expected is not None and remote.size is not None and remote.size != expected:
            raise IntegrityError(self.display, f"origin announces {remote.size} bytes, expected {expected}")
        stream_response: tuple[aiohttp.ClientResponse, str, dict[str, str]] | None = None
        if remote.ranges and remote.size is not None:
            try:
                await self._ranged(remote)
            except _Restart as r:
                stream_response = (r.response, r.url, r.headers)
        ranged = remote.ranges and remote.size is not None and stream_response is None
        if not ranged:
            size = await self._single(remote, stream_response)
        else:
            size = remote.size
        assert self.hasher is not None
        self.hasher.finish(size)
        await self._wait_thread(self.hasher)
        if self.hasher.error is not None:
            raise TransferError(str(self.part_path), f"cannot read back the partial file: {self.hasher.error}")
        if self.hasher.done != size:
            raise IntegrityError(self.display, f"hashed {self.hasher.done} bytes of {size}")
        if expected is not None and size != expected:
            raise IntegrityError(self.display, f"received {size} bytes, expected {expected}")
        self._stop_saver(final_save=False)
        if self.opt.keep_live_record and ranged:  # one stream keeps no records: nothing to publish
            self._record([(0, size)] if size else []).save(live_path(self.part_path), durable=False)
            remove_state(self.part_path, keep_live=True)
        else:
            remove_state(self.part_path)
        self._report(force=True)
        return TransferResult(size=size, sha256=self.hasher.digest.hexdigest(), etag=remote.etag,
                              last_modified=remote.last_modified, bytes_downloaded=self.received,
                              resumed_bytes=self.resumed, seconds=time.monotonic() - t0,
                              connections=max(self.peak, 1 if size else 0),
                              source_ranges={x.display: sorted(x.ranges) for x in self.sources if x.ranges})

    async def _wait_thread(self, thread: threading.Thread) -> None:
        while thread.is_alive():
            self._check_cancel()
            await asyncio.sleep(0.005)

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.cancelled:
            raise Cancelled(self.display, "download cancelled; the partial file is kept for resuming")

    def _done_bytes(self) -> int:
        return self.table.done_bytes() if self.table is not None else 0

    def _report(self, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.monotonic()
        if force or now - self.last_progress >= PROGRESS_INTERVAL:
            self.last_progress = now
            total = self.remote.size if self.remote is not None else None
            self.progress(self._done_bytes(), total)

    # ---------------------------------------------------------------- ranged mode
    def _record(self, done: list[tuple[int, int]]) -> PartState:
        """This ranged download's progress record (identity: URL key, size, validators) naming `done`."""
        assert self.remote is not None and self.remote.size is not None
        r = self.remote
        return PartState(url_key(self.url), r.size, r.etag, r.last_modified, done)

    def _resume_table(self, remote: _Remote) -> SegmentTable:
        assert remote.size is not None
        key = url_key(self.url)
        state = PartState.load(state_path(self.part_path)) if self.part_path.exists() else None
        same_source = state is not None and state.key == key and (
            (remote.etag is not None and state.etag == remote.etag)
            or (remote.etag is None and remote.last_modified is not None
                and state.last_modified == remote.last_modified))
        usable = (
            state is not None and state.size == remote.size and (same_source or self.opt.resume_any_source)
            and self.part_path.stat().st_size == remote.size
        )
        if usable and state is not None:
            self._open_part(remote.size, keep=True)
            table = SegmentTable.from_done(remote.size, state.done)
            self.resumed = table.done_bytes()
            log.info("%s: resuming, %d of %d bytes already here", self.display, self.resumed, remote.size)
            return table
        remove_state(self.part_path)
        self._open_part(remote.size, keep=False)
        return SegmentTable.fresh(remote.size)

    async def _ranged(self, remote: _Remote) -> None:
        assert remote.size is not None
        table = self.table = self._resume_table(remote)
        self._start_hasher(table.prefix)
        self.saver = _Saver(self.fd, self.part_path, table, self._record([]))
        self.saver.start()
        self.if_range = _strong_etag(remote.etag) or remote.last_modified
        self.sources = [_Source(remote.url, remote.headers, self.display, self.if_range)]
        self.sources += [_Source(m.url, {"Accept-Encoding": "identity", **m.headers}, m.display or redact_url(m.url))
                         for m in self.opt.mirrors]
        if remote.size == 0:
            return
        fixed = self.opt.connections
        cap = max(1, self.opt.max_connections if fixed is None else fixed)
        todo = table.remaining()
        start = fixed or START_CONNECTIONS
        self.target = max(1, min(start, cap, math.ceil(todo / MIN_SPLIT)))
        first = remote.response
        remote.response = None
        if first is not None and self.resumed:
            first.close()  # the bytes=0- answer started at zero; resumed work starts elsewhere
            first = None
        self._spawn(first)
        ctl = _Controller(self, fixed is not None, cap)
        while True:
            done = [t for t in self.workers.values() if t.done()]
            for task in done:
                del self.workers[next(k for k, v in self.workers.items() if v is task)]
                exc = task.exception() if not task.cancelled() else None
                if exc is not None:
                    raise exc
            self._check_cancel()
            if self.saver is not None and self.saver.error is not None and self.saver.error.errno == 28:
                raise NotEnoughSpace(str(self.part_path), "no space left to record progress")
            if self.hasher is not None and self.hasher.error is not None:
                raise TransferError(str(self.part_path), f"cannot read back the partial file: {self.hasher.error}")
            self._report()
            if table.complete():
                break
            ctl.tick()
            if not self.workers or len(self.workers) < self.target:
                self._spawn(None)
            self.peak = max(self.peak, len(self.workers))
            table.compact()
            await asyncio.sleep(TICK)

    def _spawn(self, first: aiohttp.ClientResponse | None) -> None:
        for wid in range(self.target):
            if wid not in self.workers:
                self.workers[wid] = asyncio.ensure_future(self._worker(wid, first))
                first = None
        self.peak = max(self.peak, len(self.workers))

    async def _worker(self, wid: int, first: aiohttp.ClientResponse | None) -> None:
        assert self.table is not None
        table = self.table
        while wid < self.target:
            # Never more than a fair share of what is left, so every worker starts on fresh bytes
            # instead of stealing (a steal cuts the victim's request short and wastes its tail).
            piece = max(MIN_SPLIT, min(self.piece, -(-table.unowned() // max(1, self.target))))
            seg = table.take(wid, piece, MIN_SPLIT)
            if seg is None:
                return
            try:
                if first is not None:
                    # The probe's open `bytes=0-` answer serves the first piece; a failure there is
                    # simply retried below from wherever it stopped.
                    begin = seg.pos
                    with contextlib.closing(first), contextlib.suppress(_Retryable):
                        if seg.pos == 0:
                            await self._consume(first, seg, wid)
                    first = None
                    self.sources[0].delivered(begin, seg.pos)
                await self._with_retries(lambda seg=seg: self._fetch(seg, wid), lambda seg=seg: seg.pos)
            finally:
                seg.owner = None

    def _pick(self, wid: int) -> _Source:
        alive = [s for s in self.sources if s.alive]
        return alive[wid % len(alive)]

    async def _fetch(self, seg: Segment, wid: int) -> None:
        """One ranged GET for what `seg` still owes, from this worker's source; a failing source is
        dropped while others are left (its piece goes to them), the last one follows the usual rules."""
        if seg.pos >= seg.end:
            return
        src = self._pick(wid)
        begin = seg.pos
        try:
            await self._fetch_from(src, seg, wid)
        except (_Retryable, _Restart, TransferError) as e:
            if sum(s.alive for s in self.sources) < 2:
                raise
            if isinstance(e, _Restart):
                e.response.close()
                reason = "answered without the byte range"
            else:
                reason = e.reason
            src.alive = False
            log.warning("%s: dropping source %s for this download: %s", self.display, src.display,
                        self._clean(reason))
            raise _Switch() from None
        finally:
            src.delivered(begin, seg.pos)

    async def _fetch_from(self, src: _Source, seg: Segment, wid: int) -> None:
        headers = dict(src.headers)
        headers["Range"] = f"bytes={seg.pos}-{seg.end - 1}"
        if src.if_range:
            headers["If-Range"] = src.if_range
        t0 = time.monotonic()
        resp, url, hdrs = await self._open(src.url, headers)
        if resp.status == 200:
            raise _Restart(resp, url, hdrs)
        if resp.status == 416:
            resp.release()
            raise self._fail("the origin refused a byte range inside the announced size (file changed?)", 416)
        self._check_status(resp, (206,))
        self.rtt = 0.8 * self.rtt + 0.2 * (time.monotonic() - t0)
        m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != seg.pos or (m.group(3) != "*" and int(m.group(3)) != self.table_size):
            resp.close()
            if m and m.group(3) != "*" and int(m.group(3)) != self.table_size:
                raise self._fail(f"file size changed during the download ({m.group(3)} bytes now)")
            raise _Retryable("the origin answered a different byte range")
        begin = seg.pos
        with contextlib.closing(resp):
            await self._consume(resp, seg, wid)
        elapsed = time.monotonic() - t0
        if elapsed > 0 and seg.pos > begin:
            self.samples.append((t0, (seg.pos - begin) / elapsed))
        if seg.pos < seg.end:
            raise _Retryable(f"short body: the answer ended {seg.end - seg.pos} bytes early")

    @property
    def table_size(self) -> int:
        assert self.table is not None
        return self.table.size

    async def _consume(self, resp: aiohttp.ClientResponse, seg: Segment, wid: int) -> None:
        """Hot loop: body chunks straight to pwrite at the segment's position."""
        fd = self.fd
        where = str(self.part_path)
        limiters = self.limiters
        read = resp.content.readchunk
        pos = seg.pos
        try:
            while True:
                chunk, _ = await read()
                n = len(chunk)
                if not n:
                    break
                self.received += n
                end = seg.end
                if pos + n >= end:
                    if end > pos:
                        _write_all(fd, memoryview(chunk)[: end - pos], pos, where)
                    pos = seg.pos = end
                    return
                _write_all(fd, chunk, pos, where)
                pos += n
                seg.pos = pos
                for limiter in limiters:
                    await limiter.acquire(n)
        except asyncio.TimeoutError:
            raise _Retryable(f"no data for {self.opt.read_timeout:g}s (idle read timeout)") from None
        except (aiohttp.ClientError, OSError) as e:
            raise _Retryable(f"connection broke after {pos - seg.start} bytes ({type(e).__name__})") from None

    # ---------------------------------------------------------------- single stream
    async def _single(self, remote: _Remote,
                      restart: tuple[aiohttp.ClientResponse, str, dict[str, str]] | None) -> int:
        """No ranges (or the file changed under us): one GET from byte zero; a failure starts over."""
        for task in self.workers.values():
            task.cancel()
        if self.workers:
            await asyncio.gather(*self.workers.values(), return_exceptions=True)
        self.workers.clear()
        self._stop_saver(final_save=False)
        remove_state(self.part_path)
        pending = remote.response
        remote.response = None
        if restart is not None:
            if pending is not None:
                pending.close()
            pending = restart[0]
            h = pending.headers
            remote.etag, remote.last_modified = h.get("ETag"), h.get("Last-Modified")
            log.info("%s: the origin sent the whole file (changed, or ranges unsupported): one stream",
                     self.display)
        self.resumed = 0
        self.peak = max(self.peak, 1)

        async def attempt() -> int:
            nonlocal pending
            resp = pending
            pending = None
            if resp is None:
                resp, _, _ = await self._open(remote.url, dict(remote.headers))
                self._check_status(resp, (200,))
            size = int(resp.headers["Content-Length"]) if resp.headers.get("Content-Length", "").isdigit() else None
            remote.size = size
            self._open_part(size, keep=False)
            table = self.table = SegmentTable.fresh(size if size is not None else 1 << 62)
            self._start_hasher(table.prefix)
            seg = table.segments[0] if table.segments else None
            with contextlib.closing(resp):
                if seg is not None:
                    seg.owner = 0
                    await self._consume_stream(resp, seg, size)
            got = seg.pos if seg is not None else 0
            if size is None:
                os.ftruncate(self.fd, got)
                remote.size = got
                table.size = got
                if seg is not None:
                    seg.end = got
            return got

        return int(await self._with_retries(attempt))

    async def _consume_stream(self, resp: aiohttp.ClientResponse, seg: Segment, size: int | None) -> None:
        task = asyncio.ensure_future(self._consume(resp, seg, 0))
        try:
            while not task.done():
                self._check_cancel()
                self._report()
                await asyncio.wait([task], timeout=TICK)
        finally:
            if not task.done():
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        task.result()
        if size is not None and seg.pos != size:
            raise _Retryable(f"short body: {seg.pos} of {size} bytes")


class _Controller:
    """Adaptive connection count: grow while aggregate throughput rises, back off when it stops.

    Throughput at a level is judged from the requests that *started* at that level: each finished
    request gives bytes / (time from sending it to its last byte), which averages out the bursts of
    paced origins (nginx sends a second's worth, then pauses) and includes round trips between
    requests. Aggregate = median per-request rate x connections. The count doubles while a step
    brings near-linear gains (an origin that throttles each connection), grows by a quarter while
    gains are modest, and returns to the previous count when the last step bought less than 20% of
    its proportional gain (CPU, disk or link saturated); after a pause it probes once more.
    """

    def __init__(self, dl: _Download, fixed: bool, cap: int) -> None:
        self.dl = dl
        self.fixed = fixed
        self.cap = cap
        self.level_start = time.monotonic()
        self.prev: tuple[int, float] | None = None
        self.hold_until = 0.0
        self.probing_done = False

    def tick(self) -> None:
        dl = self.dl
        if self.fixed:
            return
        now = time.monotonic()
        n = len(dl.workers)
        samples = [rate for t, rate in dl.samples if t >= self.level_start]
        if not n or len(samples) < max(3, n // 2):
            return
        samples.sort()
        per_conn = samples[len(samples) // 2]
        rate = per_conn * n
        # Requests of ~1/4 s (or 20 round trips on slow links): few requests, short tails.
        dl.piece = max(MIN_PIECE, min(MAX_PIECE, int(per_conn * max(0.25, 20 * dl.rtt))))
        target = dl.target
        unowned = dl.table.unowned() if dl.table is not None else 0
        if now < self.hold_until or unowned < 2 * target * MIN_SPLIT:
            self._new_level(now)  # holding, or too little left to give more connections work
            return
        if self.prev is None or n <= self.prev[0]:
            new = min(self.cap, target * 2 if not self.probing_done else math.ceil(target * 1.25))
        else:
            prev_n, prev_rate = self.prev
            gain = rate / prev_rate - 1 if prev_rate > 0 else 1.0
            efficiency = gain / (n / prev_n - 1)
            if efficiency >= 0.5 and not self.probing_done:
                new = min(self.cap, target * 2)
            elif efficiency >= 0.2:
                new = min(self.cap, math.ceil(target * 1.25))
            else:
                new = prev_n  # the last step did not pay: back off, probe again later
                self.probing_done = True
                self.hold_until = now + 5.0
        if new == target:
            self.hold_until = now + 5.0
        self.prev = (n, rate) if new > n else None
        dl.target = max(1, new)
        log.debug("%s: %d connections at %.1f MB/s -> %d", dl.display, n, rate / 1e6, dl.target)
        self._new_level(now)

    def _new_level(self, now: float) -> None:
        self.level_start = now
        self.dl.samples.clear()


async def download_async(url: str, part_path: Path, options: TransferOptions, *,
                         progress: ProgressFn | None = None,
                         cancel: CancelToken | None = None) -> TransferResult:
    """Download `url` into `part_path` (resuming a recorded partial); see the module docstring."""
    if options.connections is not None and options.connections < 1:
        raise ValueError("TransferOptions.connections must be >= 1 or None (adaptive)")
    try:
        return await _Download(url, Path(part_path), options, progress, cancel).run()
    except asyncio.CancelledError:
        raise
    except _Retryable as e:  # only reachable if a retry path escaped; never leak raw text
        raise TransferError(redact_url(url), redact_text(e.reason), status=e.status, retryable=True) from None


@dataclass(frozen=True)
class RemoteInfo:
    """What the origin says about a URL before downloading (for free-space checks and planning)."""

    size: int | None
    etag: str | None
    last_modified: str | None
    accept_ranges: bool
    display: str  # final URL after redirects, redacted


async def probe_async(url: str, options: TransferOptions) -> RemoteInfo:
    """HEAD (or a `bytes=0-` GET) with the engine's redirect, retry and redaction rules."""
    dl = _Download(url, Path(os.devnull), options, None, None)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=options.connect_timeout,
                                    sock_read=options.read_timeout)
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False, trust_env=False) as session:
        dl.session = session
        remote = await dl._probe()
        if remote.response is not None:
            remote.response.close()
    return RemoteInfo(remote.size, remote.etag, remote.last_modified, remote.ranges, redact_url(remote.url))


def probe(url: str, options: TransferOptions) -> RemoteInfo:
    """Synchronous `probe_async`."""
    return asyncio.run(probe_async(url, options))


def download(url: str, part_path: Path, options: TransferOptions, *,
             progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> TransferResult:
    """Synchronous wrapper: its own event loop, so any number of threads may call it at once."""
    return asyncio.run(download_async(url, part_path, options, progress=progress, cancel=cancel))


def discard_partial(part_path: Path) -> None:
    """Forget a partial download: the `.part` file and its state record."""
    with contextlib.suppress(FileNotFoundError):
        Path(part_path).unlink()
    remove_state(Path(part_path))
