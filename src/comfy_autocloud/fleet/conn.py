"""One Redis connection per node, and the rule that Redis is optional.

Every fleet call goes through `RedisGate.run`: a connection error or timeout turns into
`FleetUnavailable`, is logged once (not per request), and for a short pause no further call even
tries, so a node whose Redis is gone keeps working alone at full speed. The first call that succeeds
after the pause logs the recovery once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.retry import Retry

from comfy_autocloud.errors import AutoCloudError
from comfy_autocloud.redact import redact_url

log = logging.getLogger("comfy_autocloud.fleet")

T = TypeVar("T")


class FleetUnavailable(AutoCloudError):
    """Redis cannot be reached right now; the caller goes on without the fleet."""


class RedisGate:
    """A thread-safe Redis client whose outages become `FleetUnavailable` (logged once per outage)."""

    def __init__(self, url: str, *, prefix: str = "autocloud", timeout: float = 1.0, pause: float = 2.0) -> None:
        self.display = redact_url(url)
        self.prefix = prefix
        self.pause = pause
        # No hidden retries inside redis-py: a dead Redis must cost one short timeout, not ten seconds.
        self.client: redis.Redis = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=Retry(NoBackoff(), 0),
            decode_responses=True, health_check_interval=0)
        self._lock = threading.Lock()
        self._down_since: float | None = None
        self._next_try = 0.0

    def key(self, *parts: str) -> str:
        return ":".join((self.prefix, *parts))

    def script(self, lua: str) -> Script:
        """A Lua script called by EVALSHA (redis-py loads it again after a Redis restart)."""
        return self.client.register_script(lua)

    @property
    def down(self) -> bool:
        """True while an outage was seen and the pause before the next attempt has not passed."""
        with self._lock:
            return self._down_since is not None and time.monotonic() < self._next_try

    def run(self, fn: Callable[[redis.Redis], T]) -> T:
        """Call `fn(client)`; connection trouble -> FleetUnavailable (after logging the outage once)."""
        if self.down:
            raise FleetUnavailable(self.display, "Redis is unreachable; working alone until it is back")
        try:
            result = fn(self.client)
        except (redis.ConnectionError, redis.TimeoutError, OSError) as exc:
            self._mark_down(exc)
            raise FleetUnavailable(self.display, f"Redis is unreachable ({type(exc).__name__})") from None
        except redis.ResponseError as exc:
            if "LOADING" in str(exc) or "BUSY" in str(exc) or "READONLY" in str(exc):
                self._mark_down(exc)
                raise FleetUnavailable(self.display, f"Redis cannot answer now ({exc})") from None
            raise
        self._mark_up()
        return result

    def call(self, fn: Callable[[redis.Redis], T], default: Any = None) -> T | Any:
        """`run`, but an outage returns `default` (for best-effort writes such as announcements)."""
        try:
            return self.run(fn)
        except FleetUnavailable:
            return default

    def _mark_down(self, exc: BaseException) -> None:
        with self._lock:
            first = self._down_since is None
            if first:
                self._down_since = time.monotonic()
            self._next_try = time.monotonic() + self.pause
        if first:
            log.warning("fleet: Redis at %s is unreachable (%s); this node works alone and reconnects later",
                        self.display, type(exc).__name__)

    def _mark_up(self) -> None:
        with self._lock:
            since = self._down_since
            self._down_since = None
        if since is not None:
            log.warning("fleet: Redis at %s is reachable again after %.1fs", self.display, time.monotonic() - since)

    def close(self) -> None:
        self.client.close()
