"""file:// sources (and bare absolute paths, e.g. a network volume): copied, never downloaded."""

from __future__ import annotations

import os
from urllib.parse import unquote, urlsplit

from ..errors import SourceError
from . import ResolvedSource


def resolve_file(source: str) -> ResolvedSource:
    if source.startswith("/"):
        path = source
    else:
        parts = urlsplit(source)
        if parts.netloc not in ("", "localhost"):
            raise SourceError(source, f"file URL names a host ({parts.netloc!r}); use file:///absolute/path")
        path = unquote(parts.path)
    if "\x00" in path:
        raise SourceError(repr(source), "path contains a NUL byte")
    if not path.startswith("/"):
        raise SourceError(source, "file path must be absolute (file:///absolute/path)")
    path = os.path.normpath(path)
    if not os.path.exists(path):
        raise SourceError(source, f"no such file: {path}")
    if not os.path.isfile(path):
        raise SourceError(source, f"not a regular file: {path}")
    return ResolvedSource(kind="file", url=path, headers={}, display=f"file://{path}",
                          expected_size=os.path.getsize(path))
