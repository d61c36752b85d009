"""Probing a URL: what the origin says about a file before any byte of it is written.

HEAD (or `GET Range: bytes=0-` when HEAD is refused), redirects followed with the credential rules
of `http_policy`: size, ETag, Last-Modified and whether byte ranges work. The engine starts every
download with `probe_remote` (and reuses an open `bytes=0-` answer as its first stream); planners
that only need the size call `probe` / `probe_async`.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

from ..redact import redact_url
from .client import HttpClient, new_session
from .http_policy import Retryable
from .options import TransferOptions

CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)", re.IGNORECASE)


@dataclass
class Remote:
    """A probed URL, for the download that follows."""

    url: str                      # after redirects
    headers: dict[str, str]       # request headers valid for `url` (credentials dropped cross-origin)
    size: int | None
    etag: str | None
    last_modified: str | None
    ranges: bool
    rtt: float = 0.001            # seconds from sending the probe to its answer
    response: aiohttp.ClientResponse | None = None  # an open GET to reuse as the first stream
    content_type: str | None = None  # what the origin says it sends


def _length(h: Mapping[str, str]) -> int | None:
    return int(h["Content-Length"]) if h.get("Content-Length", "").isdigit() else None


async def probe_remote(client: HttpClient, url: str, headers: Mapping[str, str]) -> Remote:
    """HEAD, or a ranged GET left open for the caller when HEAD is refused; retried per the client's policy."""
    base = {"Accept-Encoding": "identity", **headers}

    async def attempt() -> Remote:
        t0 = time.monotonic()
        resp, final, hdrs = await client.open(url, dict(base), "HEAD")
        rtt = max(0.0005, time.monotonic() - t0)
        # 403/405/501 to a HEAD often only mean "no HEAD here" (presigned URLs): those ask again below.
        if resp.status in (401, 404, 410) or client.policy.is_retryable_status(resp.status):
            client.check(resp, (200,))
        if 200 <= resp.status < 300:
            h = resp.headers
            resp.release()
            size = _length(h)
            ranges = "bytes" in h.get("Accept-Ranges", "").lower() and size is not None
            return Remote(final, hdrs, size, h.get("ETag"), h.get("Last-Modified"), ranges, rtt,
                          content_type=h.get("Content-Type"))
        resp.release()
        # HEAD refused (405/501/403 on presigned URLs...): ask for everything, as a range.
        resp, final, hdrs = await client.open(url, {**base, "Range": "bytes=0-"})
        client.check(resp, (200, 206))
        h = resp.headers
        if resp.status == 206:
            m = CONTENT_RANGE.match(h.get("Content-Range", ""))
            if not m or m.group(1) != "0" or m.group(3) == "*":
                resp.close()
                raise Retryable("malformed Content-Range in the answer to bytes=0-")
            return Remote(final, hdrs, int(m.group(3)), h.get("ETag"), h.get("Last-Modified"), True, rtt, resp,
                          content_type=h.get("Content-Type"))
        return Remote(final, hdrs, _length(h), h.get("ETag"), h.get("Last-Modified"), False, rtt, resp,
                      content_type=h.get("Content-Type"))

    return await client.with_retries(attempt)


@dataclass(frozen=True)
class RemoteInfo:
    """What the origin says about a URL before downloading (for free-space checks and planning)."""

    size: int | None
    etag: str | None
    last_modified: str | None
    accept_ranges: bool
    display: str  # final URL after redirects, redacted
    # For `TransferOptions.probed`: the URL after redirects and the headers valid there (credentials
    # dropped cross-origin); never printed.
    url: str = field(default="", repr=False)
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    content_type: str | None = None

    def remote(self) -> Remote:
        """The engine's view of this probe, to start a download without asking again."""
        return Remote(self.url, dict(self.headers), self.size, self.etag, self.last_modified, self.accept_ranges,
                      content_type=self.content_type)


async def probe_async(url: str, options: TransferOptions) -> RemoteInfo:
    """HEAD (or a `bytes=0-` GET) with the engine's redirect, retry and redaction rules."""
    async with new_session(options.connect_timeout, options.read_timeout, pooled=False) as session:
        client = HttpClient(session, url, [(url, options.headers)], options.retry)
        remote = await probe_remote(client, url, options.headers)
        if remote.response is not None:
            remote.response.close()
    return RemoteInfo(remote.size, remote.etag, remote.last_modified, remote.ranges, redact_url(remote.url),
                      remote.url, remote.headers, remote.content_type)


def probe(url: str, options: TransferOptions) -> RemoteInfo:
    """Synchronous `probe_async`."""
    return asyncio.run(probe_async(url, options))
