"""What a caller asks of one download (`TransferOptions`, `Mirror`) and what it gets back (`TransferResult`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .ratelimit import RateLimiter
from .retry import RetryPolicy

if TYPE_CHECKING:
    from .remote import RemoteInfo


@dataclass(frozen=True)
class Mirror:
    """Another URL for the same bytes; its headers replace the call's (each peer has its own token)."""

    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    display: str = ""


@dataclass
class TransferOptions:
    connections: int | None = None      # None = adaptive; N = fixed
    max_connections: int = 64
    rate_limit: int | None = None       # bytes/s for this download
    limiter: RateLimiter | None = None  # shared, process-wide bucket
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    connect_timeout: float = 15.0
    read_timeout: float = 60.0          # idle read timeout
    headers: Mapping[str, str] = field(default_factory=dict)  # may contain secrets (Authorization)
    expected_size: int | None = None
    mirrors: tuple[Mirror, ...] = ()    # ranged mode only; the caller verifies the sha256
    # The caller verifies the sha256 of the whole file: resume a recorded partial of the same size even
    # when it came from another URL or validator (a follower switching from a peer's download in
    # progress to its finished file, or to another peer, keeps what it has).
    resume_any_source: bool = False
    # A finished download leaves a complete `.live` record (and no `.state`): peers streaming it read the
    # last bytes at once instead of waiting for the caller's checks and commit; the caller removes it
    # (`ranges.remove_live`) after committing, or with `discard_partial`.
    keep_live_record: bool = False
    # A `probe` of this very URL made just before (the caller needed the size first): the download
    # starts from it instead of asking the origin again (one round trip, and a redirect chain, fewer).
    probed: RemoteInfo | None = None


@dataclass
class TransferResult:
    size: int
    sha256: str
    etag: str | None
    last_modified: str | None
    bytes_downloaded: int   # bytes received over the network by THIS call
    resumed_bytes: int      # bytes reused from an earlier partial
    seconds: float
    connections: int        # peak connections used
    source_ranges: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # [start, end) each delivered
    # Seconds per step of the call: probe, transfer (bytes arriving), hash_tail (hashing what was left
    # after the last byte), records (stopping the saver, removing the progress record).
    phases: dict[str, float] = field(default_factory=dict)
    content_type: str | None = None  # what the origin said it sent (quoted when the content checks refuse it)

    @property
    def by_source(self) -> dict[str, int]:
        """Body bytes each source (redacted) delivered in this call."""
        return {src: sum(end - start for start, end in ranges) for src, ranges in self.source_ranges.items()}
