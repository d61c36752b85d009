"""Secrets never reach logs, errors, status pages or metrics: everything printable goes through here."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import unquote_plus, urlsplit, urlunsplit

REDACTED = "***"

# Query values are masked whatever the parameter is called (`?t=`, `?hdnea=`, `?X-Amz-Signature=`...): a
# signed URL may carry its secret under any name. Only these names, which never hold one, keep their value.
_HARMLESS_PARAMS = frozenset({"download", "dl", "filename", "file", "format", "type", "fp", "size", "rev",
                              "revision", "version", "modelversionid", "raw", "inline"})
_TITLE = re.compile(r"<title>([^<]{1,200})</title>", re.IGNORECASE)
EXCERPT_CHARS = 200  # the most of a foreign text (an origin's error body, a library's message) an error quotes
_SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie", "x-api-key", "x-amz-security-token"}


def redact_query(query: str) -> str:
    """Mask every query value except those of `_HARMLESS_PARAMS`; a bare `?TOKEN` is masked whole."""
    out = []
    for piece in query.split("&"):
        name, sep, _value = piece.partition("=")
        if unquote_plus(name).strip().lower() in _HARMLESS_PARAMS:
            out.append(piece)
        elif sep:
            out.append(f"{name}={REDACTED}")
        elif piece:
            out.append(REDACTED)
    return "&".join(out)


def redact_url(url: str) -> str:
    """Drop userinfo and mask query values (see `redact_query`); never raises."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = REDACTED + "@" + netloc.rsplit("@", 1)[1]
    query = redact_query(parts.query) if parts.query else ""
    fragment = REDACTED if parts.fragment else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: (REDACTED if k.lower() in _SECRET_HEADERS else v) for k, v in headers.items()}


def redact_text(text: str, secrets: list[str] | tuple[str, ...] = ()) -> str:
    """Mask known secret values (tokens from the environment) and any URLs inside free text."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, REDACTED)
    # A URL ends before whitespace/quotes, and trailing punctuation belongs to the sentence, not the URL.
    return re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>]*[^\s'\"<>.,;:!?)\]}]", lambda m: redact_url(m.group(0)),
                  text)


def _printable(text: str) -> str:
    return "".join(c if c.isascii() and (c.isprintable() or c == " ") else ("?" if c not in "\r\n\t" else " ")
                   for c in text)


def excerpt(text: str | bytes, limit: int = EXCERPT_CHARS) -> str:
    """At most `limit` printable characters of a foreign text (an origin's body inside a library's error
    message): control and non-ASCII bytes become `?`, the rest is cut with a count of what was left out.
    An HTML page's title past the cut is named too ("407 Proxy Authentication Required"): it says most."""
    if isinstance(text, bytes):
        text = text.decode("latin-1")
    if len(text) <= limit:
        return _printable(text)
    out = f"{_printable(text[:limit])}… ({len(text) - limit} more characters)"
    title = _TITLE.search(text, limit)
    if title is not None:
        out += f" [page title: {_printable(title.group(1).strip())[:120]}]"
    return out
