"""Failed authentications on the peer server, limited per client before any token is compared.

Without this a client may try thousands of tokens a second (each answered 401) and fill the log with a
line per try. Each client address has a small budget of failures that refills slowly; a client that
spent it is refused (429, Retry-After) without its token being looked at until the budget refills.
Failures are logged once per client and then summarised at most once a LOG_EVERY seconds.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass

log = logging.getLogger("comfy_autocloud.fleet.peer")

LOG_EVERY = 60.0       # seconds between log lines about one client
MAX_CLIENTS = 10_000   # clients remembered (least recently failing forgotten first)


@dataclass
class _Client:
    tokens: float
    stamp: float
    unlogged: int = 0
    logged_at: float = float("-inf")


class AuthFailures:
    """Per-client budget of failed authentications: `burst` at once, then `per_s` a second."""

    def __init__(self, per_s: float = 1.0, burst: int = 10, clock=time.monotonic) -> None:
        self.per_s = per_s
        self.burst = float(burst)
        self.clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def _refill(self, client: str) -> _Client | None:
        c = self._clients.get(client)
        if c is not None:
            now = self.clock()
            c.tokens = min(self.burst, c.tokens + (now - c.stamp) * self.per_s)
            c.stamp = now
        return c

    def blocked(self, client: str) -> float:
        """Seconds until `client` may try a token again (0.0: now). Called before comparing its token."""
        c = self._refill(client)
        if c is None or c.tokens >= 1:
            return 0.0
        return (1 - c.tokens) / self.per_s

    def failed(self, client: str, route: str) -> None:
        """Count one failed authentication of `client`; log the first, then a summary now and then."""
        c = self._refill(client)
        now = self.clock()
        if c is None:
            c = self._clients[client] = _Client(self.burst, now)
            while len(self._clients) > MAX_CLIENTS:
                self._clients.popitem(last=False)
        self._clients.move_to_end(client)
        c.tokens = max(0.0, c.tokens - 1)
        c.unlogged += 1
        if now - c.logged_at >= LOG_EVERY:
            if c.logged_at == float("-inf"):
                log.warning("peer server: failed authentication from %s on /%s (missing or wrong token); "
                            "more from this client are counted and refused after %d", client, route,
                            int(self.burst))
            else:
                log.warning("peer server: %d failed authentications from %s in the last %.0f s", c.unlogged,
                            client, now - c.logged_at)
            c.logged_at = now
            c.unlogged = 0
