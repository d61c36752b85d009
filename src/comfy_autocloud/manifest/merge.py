"""Merging specs for the same key: identical repeats and mirrors merge, contradictions are errors.

A key names exactly one file in the cache, so two entries that could mean different bytes must be
fixed by a person; silently picking one would serve the wrong model to someone.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

from comfy_autocloud.manifest.common import fail
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.redact import redact_url


def _union(a: tuple[str, ...], b: tuple[str, ...]) -> tuple[str, ...]:
    return a + tuple(x for x in b if x not in a)


def _conflict(first: ModelSpec, second: ModelSpec, what: str) -> None:
    fail(second.defined_in, f"{second.key} is already defined in {first.defined_in}; a key names one file, "
                            f"so make the entries agree or rename one. Different {what}")


def merge_pair(first: ModelSpec, second: ModelSpec) -> ModelSpec:
    """Combine two specs for the same key or raise naming both places.

    Sources that differ are accepted only as mirrors proven by an equal sha256; a names-only entry
    (workflow API format, warmup list) takes the other's sources. pin is OR-ed, tags united, and the
    first preload options win (full preload groups come from parse_preload_config).
    """
    if first.bundle != second.bundle and first.sources and second.sources:
        # A zip's URL is not a mirror of a file inside it (nor of another zip).
        _conflict(first, second, "origin: one arrives inside a zip bundle, the other "
                                 + ("inside another bundle" if first.bundle and second.bundle else "on its own"))
    if first.sha256 and second.sha256 and first.sha256 != second.sha256:
        _conflict(first, second, f"sha256 ({first.sha256[:12]}… vs {second.sha256[:12]}…)")
    if first.size is not None and second.size is not None and first.size != second.size:
        _conflict(first, second, f"size ({first.size} vs {second.size} bytes)")
    sha = first.sha256 or second.sha256
    proven_mirrors = bool(first.sha256 and second.sha256)  # equal here, else a conflict above
    if first.sources and second.sources and set(first.sources) != set(second.sources) and not proven_mirrors:
        # URLs go last, space-separated: punctuation right after a URL would be read as part of it.
        other = " ".join(redact_url(s) for s in second.sources if s not in first.sources)
        _conflict(first, second, "source and no sha256 on both entries to prove they are the same file "
                                 f"(give both the same sha256 to use them as mirrors); new source: {other}")
    return replace(
        first,
        sources=_union(first.sources, second.sources),
        sha256=sha,
        size=first.size if first.size is not None else second.size,
        pin=first.pin or second.pin,
        tags=_union(first.tags, second.tags),
        preload=first.preload if first.preload is not None else second.preload,
        bundle=first.bundle or second.bundle,
    )


def merge_specs(specs: Iterable[ModelSpec]) -> list[ModelSpec]:
    """Merge by key, keeping the order in which keys first appear."""
    merged: dict[str, ModelSpec] = {}
    for spec in specs:
        prev = merged.get(spec.key)
        merged[spec.key] = spec if prev is None else merge_pair(prev, spec)
    return list(merged.values())
