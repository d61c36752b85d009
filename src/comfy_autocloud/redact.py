"""Secrets never reach logs, errors, status pages or metrics: everything printable goes through here."""

from __future__ import annotations

import re
from collections.abc import Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

REDACTED = "***"

# Query parameters that carry credentials (presigned S3, Civitai, generic tokens).
_SECRET_PARAMS = re.compile(
    r"(token|key|secret|signature|sig|password|passwd|pwd|auth|credential|session|x-amz-security-token"
    r"|x-amz-signature|x-amz-credential|access_token|api_key|apikey)",
    re.IGNORECASE,
)
_SECRET_HEADERS = {"authorization", "proxy-authorization", "cookie", "x-api-key", "x-amz-security-token"}


def redact_url(url: str) -> str:
    """Drop userinfo and mask secret-looking query parameters; never raises."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return REDACTED
    netloc = parts.netloc
    if "@" in netloc:
        netloc = REDACTED + "@" + netloc.rsplit("@", 1)[1]
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if _SECRET_PARAMS.search(k) else v) for k, v in pairs], safe="*")
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


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
