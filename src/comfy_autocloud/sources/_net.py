"""Small metadata requests made while resolving a source (JSON APIs, preflight checks).

The file's bytes never go through here (that is the transfer engine's job); this is for the few
kilobytes of metadata a resolver needs. Two rules matter, both taken from the engine's
`transfer.http_policy`: credentials are dropped when a redirect leaves the origin (urllib would
forward them), and 429/5xx are retried a few times honouring `Retry-After`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlsplit

from ..errors import TransferError
from ..transfer.http_policy import Retryable, RetryLoop, error_type, redirect
from ..transfer.proxy import proxy_for
from ..transfer.retry import RetryPolicy

T = TypeVar("T")

# Resolving must not hang a fetch for long: a few tries, Retry-After honoured up to a minute.
RESOLVE_RETRY = RetryPolicy(attempts=4, backoff_base=0.5, backoff_max=8.0, retry_after_max=60.0)
TIMEOUT = 20.0
MAX_REDIRECTS = 5
MAX_BODY = 8 << 20  # an API answer is kilobytes; refuse to buffer a model file by mistake


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


def with_retries(call: Callable[[], T], policy: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> T:
    """Run `call` until it returns; `Retryable` is retried per `policy` (default RESOLVE_RETRY), the last re-raised."""
    return RetryLoop(policy or RESOLVE_RETRY).run(call, sleep)


@dataclass(frozen=True)
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes
    url: str  # after redirects

    @property
    def failure(self) -> type[TransferError] | None:
        """The typed failure this answer's status stands for (None below 400): callers branch on the type."""
        return error_type(self.status) if self.status >= 400 else None

    def retryable(self, policy: RetryPolicy | None = None) -> Retryable | None:
        """A `Retryable` to raise when asking again may help (429, 5xx per the policy), else None."""
        if (policy or RESOLVE_RETRY).is_retryable_status(self.status):
            return Retryable(f"HTTP {self.status}", self.status, self.headers.get("Retry-After"))
        return None

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8"))


_OPENER: Any = None


def _opener() -> Any:
    """urllib's opener, built at the first metadata request: urllib.request (http.client, email, ...) costs
    ~25 ms to import, which a plain https download, whose URL is only checked against these sources'
    patterns, should not pay at start-up."""
    global _OPENER
    if _OPENER is None:
        import urllib.request

        class NoRedirect(urllib.request.HTTPRedirectHandler):
            def redirect_request(self, *args: Any, **kwargs: Any) -> None:
                return None  # redirects are followed by `request`, which decides about credentials

        # No proxy from urllib's own environment handling: `transfer.proxy` picks it per request, as for the
        # engine.
        _OPENER = urllib.request.build_opener(NoRedirect(), urllib.request.ProxyHandler({}))
    return _OPENER


def request(url: str, headers: Mapping[str, str], *, method: str = "GET", follow: bool = True,
            read_body: bool = True, timeout: float = TIMEOUT) -> Answer:
    """One request (redirects followed by hand unless `follow` is False); HTTP errors are answers, not raised.

    Network failures raise `Retryable` so callers wrap this in `with_retries`; redirects and the
    credentials they drop follow `transfer.http_policy`, as the engine's do.
    """
    import urllib.error
    import urllib.request

    opener = _opener()
    hdrs = dict(headers)
    for _ in range(MAX_REDIRECTS + 1):
        proxy = proxy_for(url)
        req = urllib.request.Request(url, headers=hdrs, method=method)
        if proxy is not None:  # an https URL is tunnelled; urllib moves Proxy-Authorization to the CONNECT
            req.set_proxy(urlsplit(proxy.url).netloc, urlsplit(url).scheme)
            if proxy.headers:
                req.add_unredirected_header("Proxy-Authorization", proxy.headers["Proxy-Authorization"])
        try:
            resp = opener.open(req, timeout=timeout)
        except urllib.error.HTTPError as e:
            resp = e
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = getattr(e, "reason", e)
            raise Retryable(f"connection failed ({type(reason).__name__}: {reason})") from None
        with resp:
            status = resp.getcode()
            hop = redirect(url, status, resp.headers.get("Location"), hdrs, method) if follow else None
            if hop is not None:
                url, hdrs, method = hop.url, hop.headers, hop.method
                continue
            body = resp.read(MAX_BODY + 1) if read_body else b""
            if len(body) > MAX_BODY:
                raise BadAnswer(f"answer larger than {MAX_BODY} bytes; not an API answer")
            return Answer(status, dict(resp.headers.items()), body, url)
    raise BadAnswer(f"more than {MAX_REDIRECTS} redirects")
