"""Lists that came over the network may name only network sources.

A local list is the operator's own word, so its `file://` and `/path` sources are theirs to choose. A list
fetched from a URL (`autocloud manifest sync URL`, an http(s) entry of AUTOCLOUD_MANIFEST) is someone
else's: a `file:///etc/shadow` in it would copy that file into the cache, where the peer server offers
it to the fleet. Such a list may name local files only inside directories the operator allows
(`network_list_local_dirs`, e.g. a shared model volume).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from urllib.parse import unquote, urlsplit

from comfy_autocloud.errors import ManifestError
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.redact import redact_url


def is_network_source(source: str) -> bool:
    """Whether a source string is fetched over the network (http(s), hf://, s3://, civitai:), not a local file."""
    text = source.strip()
    scheme = text.split(":", 1)[0].lower() if ":" in text else ""
    return scheme not in ("", "file") and not text.startswith("/")


def local_path(source: str) -> str:
    """The file a local source names (`file:///a/b` or `/a/b`), normalised."""
    text = source.strip()
    path = text if text.startswith("/") else unquote(urlsplit(text).path)
    return os.path.normpath(path)


def allowed_local(source: str, allowed_dirs: Sequence[str]) -> bool:
    """A local source inside one of the operator's allowed directories (symlinks resolved on both sides)."""
    real = Path(os.path.realpath(local_path(source)))
    return any(real.is_relative_to(os.path.realpath(Path(d).expanduser())) for d in allowed_dirs if d)


def check_source(source: str, where: str, allowed_dirs: Sequence[str]) -> None:
    """ManifestError naming `where` and the source when a network list names a local file it may not."""
    if is_network_source(source) or allowed_local(source, allowed_dirs):
        return
    allow = "; allowed directories: " + ", ".join(allowed_dirs) if allowed_dirs else \
        " (an operator may allow directories with network_list_local_dirs)"
    raise ManifestError(where, f"names the local file {redact_url(source)}, but this list came over the network: "
                               f"it may name only http(s)://, hf://, s3:// or civitai: sources{allow}")


def check_network_list(specs: Iterable[ModelSpec], where: str, allowed_dirs: Sequence[str]) -> None:
    """Every source of every entry of a list fetched from `where` (redacted) is a network source (or allowed)."""
    for spec in specs:
        for source in spec.sources:
            check_source(source, f"{where}: {spec.key}", allowed_dirs)
