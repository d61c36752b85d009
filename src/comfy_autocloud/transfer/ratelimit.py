"""Token-bucket byte-rate limiter shared by any number of threads and event loops.

The core (`reserve`) is a few float operations under a `threading.Lock`: callers take tokens at once
(going into debt if needed) and are told how long to sleep, so no loop ever blocks another and a
process-wide limiter can be shared by downloads running in different threads.
"""

from __future__ import annotations

import threading
import time


class RateLimiter:
    """`rate` bytes per second with at most `burst` bytes banked (default: 1/10 s of rate, >= 256 KiB)."""

    def __init__(self, rate_bytes_per_s: int | float, burst: int | None = None) -> None:
        if rate_bytes_per_s <= 0:
            raise ValueError(f"rate limit must be positive, got {rate_bytes_per_s}")
        self.rate = float(rate_bytes_per_s)
        self.burst = float(burst if burst is not None else max(self.rate / 10, 256 * 1024))
        self._tokens = self.burst
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def reserve(self, nbytes: int) -> float:
        """Take `nbytes` now; return how many seconds the caller must wait to stay under the rate."""
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= nbytes
            return 0.0 if self._tokens >= 0 else -self._tokens / self.rate

    async def acquire(self, nbytes: int) -> None:
        wait = self.reserve(nbytes)
        if wait > 0:
            import asyncio  # here, not at the top: a cache hit builds limiters and never waits on a loop

            await asyncio.sleep(wait)

    def acquire_blocking(self, nbytes: int) -> None:
        """For threads without an event loop (local copies)."""
        wait = self.reserve(nbytes)
        if wait > 0:
            time.sleep(wait)

    def __repr__(self) -> str:
        return f"RateLimiter(rate={self.rate:.0f} B/s, burst={self.burst:.0f})"


class BothLimiter(RateLimiter):
    """Two limiters at once (the process-wide one and a tighter or fleet-wide one): wait for the slower."""

    def __init__(self, first: RateLimiter, second: RateLimiter) -> None:
        super().__init__(min(first.rate, second.rate))
        self.first = first
        self.second = second

    def reserve(self, nbytes: int) -> float:
        return max(self.first.reserve(nbytes), self.second.reserve(nbytes))
