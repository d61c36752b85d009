"""Transfer engine: ranged, parallel, adaptive, resumable downloads and verified local copies.

The engine and the probe (aiohttp) are imported on first use of `download`, `probe` and the other names
that need them, so options, limiters, partial-file records and local copies cost no aiohttp import.
"""

from typing import TYPE_CHECKING

from comfy_autocloud.lazy import lazy_names

from .http_policy import Gone, NotFound, Throttled, Unauthorized
from .localcopy import copy_file
from .options import Mirror, TransferOptions, TransferResult
from .ranges import discard_partial, discard_unresumable, state_path
from .ratelimit import BothLimiter, RateLimiter
from .retry import RetryPolicy, parse_retry_after

if TYPE_CHECKING:
    from .engine import download, download_async
    from .remote import RemoteInfo, probe, probe_async

__getattr__ = lazy_names(__name__, {"download": "engine", "download_async": "engine", "RemoteInfo": "remote",
                                    "probe": "remote", "probe_async": "remote"})

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
    "discard_unresumable",
    "download",
    "download_async",
    "parse_retry_after",
    "probe",
    "probe_async",
    "state_path",
]
