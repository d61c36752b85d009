"""Transfer engine: ranged, parallel, adaptive, resumable downloads and verified local copies."""

from .engine import (
    Mirror,
    RemoteInfo,
    TransferOptions,
    TransferResult,
    discard_partial,
    download,
    download_async,
    probe,
    probe_async,
)
from .localcopy import copy_file
from .ranges import state_path
from .ratelimit import RateLimiter
from .retry import RetryPolicy, parse_retry_after

__all__ = [
    "Mirror",
    "RateLimiter",
    "RemoteInfo",
    "RetryPolicy",
    "TransferOptions",
    "TransferResult",
    "copy_file",
    "discard_partial",
    "download",
    "download_async",
    "parse_retry_after",
    "probe",
    "probe_async",
    "state_path",
]
