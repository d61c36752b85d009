"""The download engine: ranged, parallel, adaptive, resumable, verified while it downloads.

One call downloads one URL into `part_path` (never a final path: the store renames it after its own
checks). The shape of a run (each step's mechanism in its own module):

1. probe (`remote.py`; `http_policy.py` for redirects, statuses and retries): HEAD (or
   `GET Range: bytes=0-` when HEAD is refused), redirects followed by hand so that credentials are
   dropped when the redirect leaves the origin; learn size, ETag, Last-Modified and whether byte
   ranges work;
2. resume or start afresh: `<part>.state` (see `ranges.py`) is trusted only when URL key, size and a
   validator match; every ranged request then carries `If-Range`, and a 200 answer means the file
   changed, so the download restarts from zero on that very response;
3. ranged workers on a preallocated file take pieces in file order and `pwrite` what they receive;
   a controller (`controller.py`) reads the requests' measured throughput and adds connections while
   the aggregate rises (past 16 when an origin throttles each connection) and backs off when more
   stop helping; free workers steal half of the largest remaining piece;
4. a hasher thread hashes the contiguous finished prefix while bytes arrive (`hashlib` drops the GIL),
   a saver thread fdatasyncs the part and then records finished ranges atomically every ~0.5 s
   (`threads.py`);
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
import errno
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from ..errors import Cancelled, IntegrityError, NotEnoughSpace, TransferError
from ..phases import Laps
from ..progress import CancelToken
from ..redact import redact_text, redact_url
from .client import HttpClient, new_session
from .controller import MIN_SPLIT, START_CONNECTIONS, Controller, Throughput
from .http_policy import Retryable, status_error
from .options import TransferOptions, TransferResult
from .ranges import PartState, Segment, SegmentTable, live_path, remove_state, state_path, url_key
from .ratelimit import RateLimiter
from .remote import CONTENT_RANGE, Remote, probe_remote
from .threads import Hasher, Saver

log = logging.getLogger("comfy_autocloud.transfer")

ProgressFn = Callable[[int, "int | None"], None]

PROGRESS_INTERVAL = 0.1       # at most ~10 progress calls a second
TICK = 0.05                   # main loop: cancel checks, progress, the controller


class _Restart(Exception):
    """A ranged request got the whole (changed or unrangeable) file: continue as one stream on it."""

    def __init__(self, response: aiohttp.ClientResponse, url: str, headers: dict[str, str]) -> None:
        super().__init__("restart")
        self.response = response
        self.url = url
        self.headers = headers


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
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise NotEnoughSpace(where, f"disk full after {offset} bytes ({e.strerror})") from None
        raise TransferError(where, f"cannot write the partial file: {e.strerror or e}") from None


class _Download:
    """State of one `download_async` call: the part file, its threads, the workers and the sources."""

    def __init__(self, url: str, part_path: Path, options: TransferOptions,
                 progress: ProgressFn | None, cancel: CancelToken | None) -> None:
        self.url = url
        self.part_path = Path(part_path)
        self.opt = options
        self.progress = progress
        self.cancel = cancel
        self.display = redact_url(url)
        self.limiters = [x for x in (RateLimiter(options.rate_limit) if options.rate_limit else None,
                                     options.limiter) if x is not None]
        self.client: HttpClient | None = None
        self.received = 0          # network body bytes this call
        self.resumed = 0
        self.peak = 0
        self.fd = -1
        self.table: SegmentTable | None = None
        self.remote: Remote | None = None
        self.workers: dict[int, asyncio.Task[None]] = {}
        self.throughput = Throughput()
        self.ctl: Controller | None = None
        self.hasher: Hasher | None = None
        self.saver: Saver | None = None
        self.last_progress = 0.0
        self.sources: list[_Source] = []

    @property
    def http(self) -> HttpClient:
        assert self.client is not None
        return self.client

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
        self.hasher = Hasher(self.fd, prefix)
        self.hasher.start()

    def _stop_saver(self, final_save: bool) -> None:
        if self.saver is not None:
            self.saver.close(final_save)
            self.saver = None

    # ---------------------------------------------------------------- run
    async def run(self) -> TransferResult:
        t0 = time.monotonic()
        session = new_session(self.opt.connect_timeout, self.opt.read_timeout, pooled=True)
        requests = [(self.url, self.opt.headers), *((m.url, m.headers) for m in self.opt.mirrors)]
        self.client = HttpClient(session, self.url, requests, self.opt.retry)
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
            await session.close()
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1

    async def _run(self, t0: float) -> TransferResult:
        self._check_cancel()
        laps = Laps()
        probed = self.opt.probed
        if probed is not None and probed.url:
            remote = self.remote = probed.remote()
        else:
            remote = self.remote = await probe_remote(self.http, self.url, self.opt.headers)
        self.throughput.rtt = remote.rtt
        laps.lap("probe")
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
        laps.lap("transfer")
        self.hasher.finish(size)
        await self._wait_thread(self.hasher)
        laps.lap("hash_tail")
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
        laps.lap("records")
        self._report(force=True)
        return TransferResult(size=size, sha256=self.hasher.hexdigest(), etag=remote.etag,
                              last_modified=remote.last_modified, bytes_downloaded=self.received,
                              resumed_bytes=self.resumed, seconds=time.monotonic() - t0,
                              connections=max(self.peak, 1 if size else 0),
                              source_ranges={x.display: sorted(x.ranges) for x in self.sources if x.ranges},
                              phases=laps.times, content_type=remote.content_type)

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

    def _resume_table(self, remote: Remote) -> SegmentTable:
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

    async def _ranged(self, remote: Remote) -> None:
        assert remote.size is not None
        table = self.table = self._resume_table(remote)
        self._start_hasher(table.prefix)
        self.saver = Saver(self.fd, self.part_path, table, self._record([]))
        self.saver.start()
        if_range = _strong_etag(remote.etag) or remote.last_modified
        self.sources = [_Source(remote.url, remote.headers, self.display, if_range)]
        self.sources += [_Source(m.url, {"Accept-Encoding": "identity", **m.headers}, m.display or redact_url(m.url))
                         for m in self.opt.mirrors]
        if remote.size == 0:
            return
        fixed = self.opt.connections
        cap = max(1, self.opt.max_connections if fixed is None else fixed)
        todo = table.remaining()
        start = fixed or START_CONNECTIONS
        self.ctl = ctl = Controller(self.throughput, min(start, cap, math.ceil(todo / MIN_SPLIT)),
                                    fixed=fixed is not None, cap=cap, display=self.display)
        first = remote.response
        remote.response = None
        if first is not None and self.resumed:
            first.close()  # the bytes=0- answer started at zero; resumed work starts elsewhere
            first = None
        self._spawn(first)
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
            ctl.tick(len(self.workers), table.unowned())
            if not self.workers or len(self.workers) < ctl.target:
                self._spawn(None)
            self.peak = max(self.peak, len(self.workers))
            table.compact()
            await asyncio.sleep(TICK)

    def _spawn(self, first: aiohttp.ClientResponse | None) -> None:
        assert self.ctl is not None
        for wid in range(self.ctl.target):
            if wid not in self.workers:
                self.workers[wid] = asyncio.ensure_future(self._worker(wid, first))
                first = None
        self.peak = max(self.peak, len(self.workers))

    async def _worker(self, wid: int, first: aiohttp.ClientResponse | None) -> None:
        assert self.table is not None and self.ctl is not None
        table, ctl = self.table, self.ctl
        while wid < ctl.target:
            # Never more than a fair share of what is left, so every worker starts on fresh bytes
            # instead of stealing (a steal cuts the victim's request short and wastes its tail).
            piece = max(MIN_SPLIT, min(ctl.piece, -(-table.unowned() // max(1, ctl.target))))
            seg = table.take(wid, piece, MIN_SPLIT)
            if seg is None:
                return
            try:
                if first is not None:
                    # The probe's open `bytes=0-` answer serves the first piece; a failure there is
                    # simply retried below from wherever it stopped.
                    begin = seg.pos
                    with contextlib.closing(first), contextlib.suppress(Retryable):
                        if seg.pos == 0:
                            await self._consume(first, seg, wid)
                    first = None
                    self.sources[0].delivered(begin, seg.pos)
                await self.http.with_retries(lambda seg=seg: self._fetch(seg, wid), lambda seg=seg: seg.pos)
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
        except (Retryable, _Restart, TransferError) as e:
            if sum(s.alive for s in self.sources) < 2:
                raise
            if isinstance(e, _Restart):
                e.response.close()
                reason = "answered without the byte range"
            else:
                reason = e.reason
            src.alive = False
            log.warning("%s: dropping source %s for this download: %s", self.display, src.display,
                        self.http.clean(reason))
            raise Retryable(reason, free=True) from None  # another source takes the piece at once
        finally:
            src.delivered(begin, seg.pos)

    async def _fetch_from(self, src: _Source, seg: Segment, wid: int) -> None:
        headers = dict(src.headers)
        headers["Range"] = f"bytes={seg.pos}-{seg.end - 1}"
        if src.if_range:
            headers["If-Range"] = src.if_range
        t0 = time.monotonic()
        resp, url, hdrs = await self.http.open(src.url, headers)
        if resp.status == 200:
            raise _Restart(resp, url, hdrs)
        if resp.status == 416:
            resp.release()
            raise self.http.fail("the origin refused a byte range inside the announced size (file changed?)", 416)
        self.http.check(resp, (206,))
        self.throughput.answered(time.monotonic() - t0)
        m = CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
        if not m or int(m.group(1)) != seg.pos or (m.group(3) != "*" and int(m.group(3)) != self.table_size):
            resp.close()
            if m and m.group(3) != "*" and int(m.group(3)) != self.table_size:
                raise self.http.fail(f"file size changed during the download ({m.group(3)} bytes now)")
            raise Retryable("the origin answered a different byte range")
        begin = seg.pos
        with contextlib.closing(resp):
            await self._consume(resp, seg, wid)
        self.throughput.finished(t0, seg.pos - begin, time.monotonic())
        if seg.pos < seg.end:
            raise Retryable(f"short body: the answer ended {seg.end - seg.pos} bytes early")

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
                    for limiter in limiters:   # the segment's last chunk counts against the limit too
                        await limiter.acquire(n)
                    return
                _write_all(fd, chunk, pos, where)
                pos += n
                seg.pos = pos
                for limiter in limiters:
                    await limiter.acquire(n)
        except asyncio.TimeoutError:
            raise Retryable(f"no data for {self.opt.read_timeout:g}s (idle read timeout)") from None
        except (aiohttp.ClientError, OSError) as e:
            raise Retryable(f"connection broke after {pos - seg.start} bytes ({type(e).__name__})") from None

    # ---------------------------------------------------------------- single stream
    async def _single(self, remote: Remote,
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
                resp, _, _ = await self.http.open(remote.url, dict(remote.headers))
                self.http.check(resp, (200,))
            size = int(resp.headers["Content-Length"]) if resp.headers.get("Content-Length", "").isdigit() else None
            remote.size, remote.content_type = size, resp.headers.get("Content-Type")
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

        return int(await self.http.with_retries(attempt))

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
            raise Retryable(f"short body: {seg.pos} of {size} bytes")


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
    except Retryable as e:  # only reachable if a retry path escaped; never leak raw text
        raise status_error(redact_url(url), redact_text(e.reason), e.status, retryable=True) from None


def download(url: str, part_path: Path, options: TransferOptions, *,
             progress: ProgressFn | None = None, cancel: CancelToken | None = None) -> TransferResult:
    """Synchronous wrapper: its own event loop, so any number of threads may call it at once."""
    return asyncio.run(download_async(url, part_path, options, progress=progress, cancel=cancel))
