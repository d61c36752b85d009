"""Source strings -> something the transfer engine can fetch (`ResolvedSource`).

`http(s)://` and `file://` resolve here and now; `hf://`, `s3://` and `civitai:` come with their
own issue and are refused with a message that says so and what to use meanwhile.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from ..errors import SourceError
from ..redact import redact_url


@dataclass(frozen=True)
class ResolvedSource:
    kind: Literal["http", "file"]
    url: str                                  # http: the URL to GET; file: absolute path string
    headers: Mapping[str, str] = field(repr=False)  # secret-bearing headers (never print)
    display: str                              # redacted, safe to print
    expected_sha256: str | None = None
    expected_size: int | None = None

    def __repr__(self) -> str:  # the URL may carry a token in its query: show only the redacted form
        return f"ResolvedSource(kind={self.kind!r}, display={self.display!r})"


_LATER = {
    "hf": "Hugging Face",
    "s3": "S3",
    "civitai": "Civitai",
}


def resolve(source: str) -> ResolvedSource:
    """Resolve one source string; raise SourceError naming the (redacted) source and the reason."""
    from .file import resolve_file
    from .http import resolve_http

    text = source.strip()
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme in ("http", "https"):
        return resolve_http(text)
    if scheme == "file" or text.startswith("/"):
        return resolve_file(text)
    if scheme in _LATER:
        raise SourceError(redact_url(text), f"{_LATER[scheme]} ({scheme}:) sources arrive with the sources issue "
                          "(#9); use an https:// URL")
    if not scheme:
        raise SourceError(redact_url(text), "not a URL: expected http://, https:// or file:///absolute/path")
    raise SourceError(redact_url(text), f"unsupported scheme {scheme!r}: use http://, https:// or file://")


__all__ = ["ResolvedSource", "resolve"]
