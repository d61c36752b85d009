"""http(s) sources: passed through, except that credentials in the URL become a header.

`https://user:token@host/path` must not travel inside the URL (it would be logged, cached, and sent
on to redirect targets); it becomes `Authorization: Basic ...`, which the engine drops when a
redirect leaves the origin.
"""

from __future__ import annotations

import base64
from urllib.parse import unquote, urlsplit, urlunsplit

from ..errors import SourceError
from ..redact import redact_url
from . import ResolvedSource


def resolve_http(url: str) -> ResolvedSource:
    display = redact_url(url)
    try:
        parts = urlsplit(url)
        port = parts.port  # validates the port
    except ValueError as e:
        raise SourceError(display, f"malformed URL: {e}") from None
    if not parts.hostname:
        raise SourceError(display, "URL has no host")
    if any(c in url for c in "\r\n\t ") or "\x00" in url:
        raise SourceError(display, "URL contains whitespace or control characters")
    headers: dict[str, str] = {}
    netloc = parts.netloc
    if parts.username is not None or parts.password is not None:
        user = unquote(parts.username or "")
        password = unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
        host = parts.hostname
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{port}" if port else "")
    clean = urlunsplit((parts.scheme.lower(), netloc, parts.path or "/", parts.query, ""))
    return ResolvedSource(kind="http", url=clean, headers=headers, display=redact_url(clean))
