"""One HTTP policy for the engine and every source: redirects, credentials, statuses, retries.

The transfer engine (aiohttp) and the sources' metadata requests (urllib, huggingface_hub, boto3)
speak HTTP through different clients; what they decide about an answer lives here once, so the two
cannot drift apart:

- a redirect is followed by hand, and credential headers are dropped when it leaves the origin
  (scheme, host, port): a CDN or a hostile redirect never sees the token;
- a status is a success, worth asking again (429, 5xx: `Retryable`, honouring `Retry-After`), or a
  typed failure the callers branch on (`Unauthorized`, `NotFound`, `Gone`, `Throttled`) instead of
  comparing numbers;
- the retry loop: consecutive failures per the `RetryPolicy`, progress in between resets the count.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import urljoin, urlsplit

from ..errors import TransferError
from .retry import RetryPolicy

T = TypeVar("T")

REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Headers that carry a credential: never forwarded to another origin.
CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key",
                                "x-amz-security-token"})


class Unauthorized(TransferError):
    """HTTP 401/403: the credentials are missing, wrong or lack access; asking again will not help."""


class NotFound(TransferError):
    """HTTP 404: nothing at this URL (a peer that evicted the file, a wrong path)."""


class Gone(TransferError):
    """HTTP 410: the file was there and was removed for good."""


class Throttled(TransferError):
    """HTTP 429 after every retry: the origin kept asking us to slow down."""


_BY_STATUS: dict[int, type[TransferError]] = {401: Unauthorized, 403: Unauthorized, 404: NotFound,
                                              410: Gone, 429: Throttled}


def error_type(status: int | None) -> type[TransferError]:
    """The `TransferError` subclass for a failed answer's status (the base class for the others)."""
    return _BY_STATUS.get(status, TransferError) if status is not None else TransferError


def status_error(subject: str, reason: str, status: int | None, *, retryable: bool = False) -> TransferError:
    """A failure about `subject` (already redacted), typed by its HTTP status."""
    return error_type(status)(subject, reason, status=status, retryable=retryable)


class Retryable(Exception):
    """One attempt failed in a way that may succeed when tried again.

    `free`: retry at once without spending the budget (another source takes over, nothing failed).
    """

    def __init__(self, reason: str, status: int | None = None, retry_after: str | None = None,
                 *, free: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.free = free


def status_text(status: int, phrase: str = "") -> str:
    return f"HTTP {status} {phrase}".strip() if 400 <= status < 600 else f"unexpected HTTP {status}"


def answer_failure(subject: str, status: int, phrase: str = "", retry_after: str | None = None,
                   policy: RetryPolicy | None = None) -> Retryable | TransferError:
    """What an unwanted answer means: `Retryable` when asking again may help, else the typed error to raise."""
    text = status_text(status, phrase)
    if (policy or RetryPolicy()).is_retryable_status(status):
        return Retryable(text, status, retry_after)
    return status_error(subject, text, status)


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with default ports filled in: what 'the same origin' compares."""
    p = urlsplit(url)
    return p.scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme)


@dataclass(frozen=True)
class Hop:
    """Where a redirect leads and what the next request carries."""

    url: str
    headers: dict[str, str]
    method: str
    cross_origin: bool


def redirect(url: str, status: int, location: str | None, headers: Mapping[str, str], method: str) -> Hop | None:
    """The next hop of a redirect answer (None when the answer is not one to follow).

    Leaving the origin drops every credential header; a 303 turns anything but HEAD into GET.
    """
    if status not in REDIRECT_STATUSES or not location:
        return None
    new = urljoin(url, location)
    cross = origin(new) != origin(url)
    hdrs = {k: v for k, v in headers.items() if not (cross and k.lower() in CREDENTIAL_HEADERS)}
    if status == 303 and method != "HEAD":
        method = "GET"
    return Hop(new, hdrs, method, cross)


class RetryLoop:
    """The one retry loop, for blocking callers (`run`) and coroutines (`run_async`).

    `progress()` (optional) counts work done; a failure after progress starts the count afresh, so a
    long download on a flaky link is not killed by failures spread over hours. `on_retry(error,
    failures, delay)` is told before each wait (for logs).
    """

    def __init__(self, policy: RetryPolicy, progress: Callable[[], int] | None = None,
                 on_retry: Callable[[Retryable, int, float], None] | None = None) -> None:
        self.policy = policy
        self.progress = progress
        self.on_retry = on_retry
        self.failures = 0
        self._seen = progress() if progress else 0

    def failed(self, e: Retryable) -> float:
        """Seconds to wait before the next attempt; re-raises `e` when the policy allows no more
        (`failures` then says how many failed in a row)."""
        if e.free:
            return 0.0
        if self.progress is not None:
            now = self.progress()
            if now > self._seen:
                self.failures, self._seen = 0, now
        self.failures += 1
        if not self.policy.can_retry(self.failures):
            raise e
        delay = self.policy.delay(self.failures, e.retry_after)
        if self.on_retry is not None:
            self.on_retry(e, self.failures, delay)
        return delay

    def run(self, call: Callable[[], T], sleep: Callable[[float], None] = time.sleep) -> T:
        while True:
            try:
                return call()
            except Retryable as e:
                delay = self.failed(e)
            if delay:
                sleep(delay)

    async def run_async(self, call: Callable[[], Awaitable[T]]) -> T:
        import asyncio  # here: the sources' blocking requests use this module without an event loop

        while True:
            try:
                return await call()
            except Retryable as e:
                delay = self.failed(e)
            if delay:
                await asyncio.sleep(delay)
