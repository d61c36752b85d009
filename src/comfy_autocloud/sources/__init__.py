"""Source strings -> something the transfer engine can fetch (`ResolvedSource`).

Every scheme ends as an http(s) URL plus headers handed to the one transfer engine (or a local
path for `file://`): `hf://` through huggingface_hub (auth, commit pin, LFS sha256), `s3://` as a
presigned GET (credentials from the AWS chain), `civitai:` through the model-version API. Resolving
does network I/O for those three (metadata only, never the file's bytes), so it happens once per
download attempt and the result is not cached: presigned and CDN URLs expire.
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
    expected_sha256: str | None = None        # published by the source's metadata (lower-case hex)
    expected_size: int | None = None          # exact bytes, when the source's metadata says so
    filename: str | None = None               # the file's own name at the source (for `manifest add`)
    canonical: str | None = None              # a source string naming exactly this file, when shorter/pinned

    def __repr__(self) -> str:  # the URL may carry a token in its query: show only the redacted form
        return f"ResolvedSource(kind={self.kind!r}, display={self.display!r})"


SCHEMES = ("http", "https", "file", "hf", "s3", "civitai")


def resolve(source: str) -> ResolvedSource:
    """Resolve one source string; raise SourceError naming the (redacted) source and the reason."""
    text = source.strip()
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    if scheme in ("http", "https"):
        from .civitai import is_civitai_url, resolve_civitai
        from .hf import hf_ref_from_url, resolve_hf_ref

        if is_civitai_url(text):
            return resolve_civitai(text)
        ref = hf_ref_from_url(text)
        if ref is not None:
            return resolve_hf_ref(ref)
        from .http import resolve_http

        return resolve_http(text)
    if scheme == "file" or text.startswith("/"):
        from .file import resolve_file

        return resolve_file(text)
    if scheme == "hf":
        from .hf import resolve_hf

        return resolve_hf(text)
    if scheme == "s3":
        from .s3 import resolve_s3

        return resolve_s3(text)
    if scheme == "civitai":
        from .civitai import resolve_civitai

        return resolve_civitai(text)
    if not scheme:
        raise SourceError(redact_url(text), "not a URL: expected http(s)://, file:///absolute/path, hf://, s3:// "
                                            "or civitai:")
    raise SourceError(redact_url(text), f"unsupported scheme {scheme!r}: use http(s)://, file://, hf://, s3:// "
                                        "or civitai:")


__all__ = ["SCHEMES", "ResolvedSource", "resolve"]
