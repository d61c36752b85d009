"""Transfer engine: ranged, parallel, adaptive, resumable downloads and verified local copies.

Every name is imported from its module on first use: the engine and the probe (aiohttp) only by
`download`, `probe` and the names that need them, and a warmup copy (`copy_file`) loads neither the HTTP
policy nor the partial-file records (nor hashlib with them).
"""

from typing import TYPE_CHECKING

from comfy_autocloud.lazy import lazy_names

if TYPE_CHECKING:
    from .engine import download, download_async
    from .http_policy import Gone, NotFound, Throttled, Unauthorized
    from .localcopy import copy_file
    from .options import Mirror, TransferOptions, TransferResult
    from .ranges import discard_partial, discard_unresumable, state_path
    from .ratelimit import BothLimiter, RateLimiter
    from .remote import RemoteInfo, probe, probe_async
    from .retry import RetryPolicy, parse_retry_after

__getattr__ = lazy_names(__name__, {
    "download": "engine", "download_async": "engine", "RemoteInfo": "remote", "probe": "remote",
    "probe_async": "remote", **dict.fromkeys(("Gone", "NotFound", "Throttled", "Unauthorized"), "http_policy"),
    "copy_file": "localcopy", **dict.fromkeys(("Mirror", "TransferOptions", "TransferResult"), "options"),
    **dict.fromkeys(("discard_partial", "discard_unresumable", "state_path"), "ranges"),
    "BothLimiter": "ratelimit", "RateLimiter": "ratelimit", "RetryPolicy": "retry", "parse_retry_after": "retry"})

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
