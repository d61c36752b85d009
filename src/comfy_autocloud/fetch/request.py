"""One fetch as values: the request that travels through the fetch path and the result it ends with.

A request bundles what every step of a fetch needs (the spec, when the call started, where progress
goes, the cancel token) so the local, fleet and bundle paths pass one object instead of four.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_autocloud.errors import Cancelled
from comfy_autocloud.phases import in_order
from comfy_autocloud.progress import CancelToken, ProgressCallback

if TYPE_CHECKING:
    from comfy_autocloud.manifest.spec import ModelSpec


@dataclass(frozen=True)
class FetchResult:
    key: str
    path: Path
    size: int
    sha256: str
    seconds: float
    bytes_downloaded: int
    cached: bool  # True when served from the cache without downloading
    source: str  # redacted
    # Seconds per step of a download (probe, reserve, transfer, hash_tail, records, fsync, rename, index).
    phases: dict[str, float] = field(default_factory=dict, compare=False)

    def as_json(self, *, phases: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "key": self.key, "path": str(self.path), "size": self.size,
            "sha256": self.sha256 or None,  # None: a warmup copy whose hash is still being computed
            "seconds": round(self.seconds, 4), "bytes_downloaded": self.bytes_downloaded,
            "cached": self.cached, "source": self.source}
        if phases:
            out["phases"] = {k: round(v, 4) for k, v in in_order(self.phases).items()}
        return out


@dataclass(frozen=True)
class FetchRequest:
    """`spec` asked for at `started` (perf_counter); `progress` sees its events, `cancel` stops it."""

    spec: ModelSpec
    progress: ProgressCallback | None = None
    cancel: CancelToken | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def key(self) -> str:
        return self.spec.key

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def for_spec(self, spec: ModelSpec) -> FetchRequest:
        """The same call asking for another file (a member of the same bundle)."""
        return replace(self, spec=spec)

    def check_cancelled(self, doing: str) -> None:
        if self.cancel is not None and self.cancel.cancelled:
            raise Cancelled(self.key, f"cancelled while {doing}")
