"""Retry policy as one small immutable value object (in the spirit of urllib3's `Retry`).

The engine asks it three questions: may this status/error be retried, how long to wait before
attempt N (exponential backoff with full jitter, so many clients hitting one origin spread out), and
how to honour a `Retry-After` header (seconds or an HTTP date, capped so a hostile origin cannot
park a download for hours).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field

RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    """`attempts` tries per range (the first one included) without progress in between."""

    attempts: int = 6
    backoff_base: float = 0.5       # first backoff ceiling, seconds
    backoff_max: float = 30.0       # ceiling of any single backoff
    retry_after_max: float = 120.0  # cap on an origin's Retry-After
    retry_statuses: frozenset[int] = field(default=RETRY_STATUSES)
    respect_retry_after: bool = True

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("RetryPolicy.attempts must be >= 1")
        if self.backoff_base < 0 or self.backoff_max < 0 or self.retry_after_max < 0:
            raise ValueError("RetryPolicy delays must not be negative")

    @classmethod
    def never(cls) -> RetryPolicy:
        return cls(attempts=1)

    def is_retryable_status(self, status: int) -> bool:
        return status in self.retry_statuses

    def can_retry(self, failures: int) -> bool:
        """`failures` consecutive failed attempts so far; another one is allowed while below `attempts`."""
        return failures < self.attempts

    def backoff(self, failures: int, rng: random.Random | None = None) -> float:
        """Full-jitter exponential backoff before the next attempt (AWS architecture blog's 'Full Jitter')."""
        ceiling = min(self.backoff_max, self.backoff_base * (2 ** max(failures - 1, 0)))
        return (rng or random).uniform(0.0, ceiling)

    def delay(self, failures: int, retry_after: str | None = None, rng: random.Random | None = None) -> float:
        """Seconds to wait before the next attempt: Retry-After when given and honoured, else backoff."""
        if retry_after is not None and self.respect_retry_after:
            parsed = parse_retry_after(retry_after)
            if parsed is not None:
                return min(parsed, self.retry_after_max)
        return self.backoff(failures, rng)


def parse_retry_after(value: str, now: float | None = None) -> float | None:
    """`Retry-After: 120` or `Retry-After: Wed, 21 Oct 2015 07:28:00 GMT` -> seconds (>= 0), None if unparsable."""
    value = value.strip()
    if not value:
        return None
    if value.isdigit():
        return float(value)
    from email.utils import parsedate_to_datetime  # here: ~15 ms to import, for the rare HTTP-date form

    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))
