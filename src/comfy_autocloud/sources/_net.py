"""Small metadata requests made while resolving a source (JSON APIs, preflight checks).

The file's bytes never go through here (that is the transfer engine's job); this is for the few
kilobytes of metadata a resolver needs. Two rules matter: credentials are dropped when a redirect
leaves the origin (urllib would forward them), and 429/5xx are retried a few times honouring
`Retry-After`, with the same policy object the engine uses.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urljoin, urlsplit

from ..transfer.retry import RetryPolicy

T = TypeVar("T")

# Resolving must not hang a fetch for long: a few tries, Retry-After honoured up to a minute.
RESOLVE_RETRY = RetryPolicy(attempts=4, backoff_base=0.5, backoff_max=8.0, retry_after_max=60.0)
TIMEOUT = 20.0
MAX_REDIRECTS = 5
MAX_BODY = 8 << 20  # an API answer is kilobytes; refuse to buffer a model file by mistake
_CREDENTIAL_HEADERS = frozenset({"authorization", "proxy-authorization", "cookie", "x-api-key"})


def quiet_loggers(*names: str) -> None:
    """Keep third-party wire-trace loggers above DEBUG: they print signed URLs and signatures verbatim.

    (httpcore logs raw response headers, so a CDN's signed `Location`; botocore.auth logs each SigV4
    signature, and a presigned URL's signature is a credential.) Rule 3 outranks `-vv`.
    """
    for name in names:
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < logging.INFO:
            logger.setLevel(logging.INFO)


class BadAnswer(Exception):
    """The server answered something no API answers (too large, too many redirects)."""


class Retry(Exception):
    """Raised by a call wrapped in `with_retries` when asking again may succeed."""

    def __init__(self, reason: str, retry_after: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


def with_retries(call: Callable[[], T], policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `call` until it returns; `Retry` is retried per `policy` (default RESOLVE_RETRY), the last re-raised."""
    policy = policy or RESOLVE_RETRY
    failures = 0
    while True:
        try:
            return call()
        except Retry as e:
            failures += 1
            if not policy.can_retry(failures):
                raise
            sleep(policy.delay(failures, e.retry_after))


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str  # after redirects

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # redirects are followed by `request`, which decides about credentials


_OPENER = urllib.request.build_opener(_NoRedirect())


def _origin(url: str) -> tuple[str, str, int | None]:
    p = urlsplit(url)
    return p.scheme, (p.hostname or "").lower(), p.port or {"http": 80, "https": 443}.get(p.scheme)


def request(url: str, headers: Mapping[str, str], *, method: str = "GET", follow: bool = True,
            read_body: bool = True, timeout: float = TIMEOUT) -> Answer:
    """One request (redirects followed by hand unless `follow` is False); HTTP errors are answers, not raised.

    Network failures raise `Retry` so callers wrap this in `with_retries`.
    """
    hdrs = dict(headers)
    for _ in range(MAX_REDIRECTS + 1):
        req = urllib.request.Request(url, headers=hdrs, method=method)
        try:
            resp = _OPENER.open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            resp = e
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise Retry(f"connection failed ({type(reason).__name__}: {reason})") from None
        with resp:
            status = resp.getcode()
            location = resp.headers.get("Location")
            if follow and status in (301, 302, 303, 307, 308) and location:
                new = urljoin(url, location)
                if _origin(new) != _origin(url):
                    hdrs = {k: v for k, v in hdrs.items() if k.lower() not in _CREDENTIAL_HEADERS}
                url = new
                continue
            body = resp.read(MAX_BODY + 1) if read_body else b""
            if len(body) > MAX_BODY:
                raise BadAnswer(f"answer larger than {MAX_BODY} bytes; not an API answer")
            return Answer(status, dict(resp.headers.items()), body, url)
    raise BadAnswer(f"more than {MAX_REDIRECTS} redirects")
