"""Transfer engine: ranged, parallel, adaptive, resumable downloads and verified local copies."""

from .engine import discard_partial, download, download_async
from .http_policy import Gone, NotFound, Throttled, Unauthorized
from .localcopy import copy_file
from .options import Mirror, TransferOptions, TransferResult
from .probe import RemoteInfo, probe, probe_async
from .ranges import state_path
from .ratelimit import BothLimiter, RateLimiter
from .retry import RetryPolicy, parse_retry_after

__all__ = [
    "BothLimiter",
    "Gone",
    "Mirror",
    "NotFound",
    "RateLimiter",
    "RemoteInfo",
    "RetryPolicy",
    "Throttled",
    "TransferOptions",
    "TransferResult",
    "Unauthorized",
    "copy_file",
    "discard_partial",
    "download",
    "download_async",
    "parse_retry_after",
    "probe",
    "probe_async",
    "state_path",
]
