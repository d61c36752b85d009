"""Settings -> the objects that do the work: the one place that wires them.

The CLI, the ComfyUI adapter, warmup and the demo all build their store, fetch service, fleet client
and rate limiter here, so a setting means the same thing everywhere (`rate_limit` is one process-wide
bucket shared by every download, `temp_dir` holds every partial file). Heavy modules (aiohttp through
the transfer engine, redis) are imported only when a service that needs them is built.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfy_autocloud.config import Settings

if TYPE_CHECKING:
    from comfy_autocloud.fetch.service import FetchService
    from comfy_autocloud.fleet.client import Fleet
    from comfy_autocloud.store import Store
    from comfy_autocloud.transfer import RateLimiter, TransferOptions

log = logging.getLogger(__name__)

_UNSET: Any = object()


@dataclass
class Services:
    """What a process uses to fetch models; `close` releases the fleet connection and the store."""

    store: Store
    fetch: FetchService
    fleet: Fleet | None
    limiter: RateLimiter | None

    def close(self) -> None:
        if self.fleet is not None:
            self.fleet.close()
        self.store.close()


def open_store(settings: Settings, *, cache_dir: Path | str | None = None, max_size: int | None = _UNSET) -> Store:
    """The Store of `settings` (or at `cache_dir`, e.g. warmup's CACHE_PATH), with its cap, policy and temp dir."""
    from comfy_autocloud.store import Store

    return Store(Path(cache_dir) if cache_dir is not None else settings.cache_path,
                 max_size=settings.max_size if max_size is _UNSET else max_size, policy=settings.policy,
                 min_free_disk=settings.min_free_disk, temp_dir=settings.values.get("temp_dir"))


def open_fleet(settings: Settings, *, alone_on_error: bool = False) -> Fleet | None:
    """The fleet client when a Redis URL is set, else None.

    `alone_on_error`: a broken fleet configuration is logged and the node works alone (ComfyUI must start
    anyway); otherwise the error reaches the caller (a command says what is wrong).
    """
    if settings.values.get("redis_url") is None:
        return None
    from comfy_autocloud.errors import AutoCloudError
    from comfy_autocloud.fleet.client import Fleet

    try:
        return Fleet.from_settings(settings)
    except (AutoCloudError, ValueError) as exc:
        if not alone_on_error:
            raise
        log.error("autocloud: not joining the fleet: %s", exc)
        return None


def transfer_options(settings: Settings, *, connections: int | None = None,
                     limiter: RateLimiter | None = None) -> TransferOptions:
    """Connections and retries from `settings`; `limiter` is the process-wide byte budget (shared, never per
    download)."""
    from comfy_autocloud.transfer import RetryPolicy, TransferOptions

    return TransferOptions(connections=connections or settings.connections, limiter=limiter,
                           retry=RetryPolicy(attempts=max(1, settings.retries)))


def build(settings: Settings, *, store: Store | None = None, cache_dir: Path | str | None = None,
          max_size: int | None = _UNSET, connections: int | None = None, rate_limit: int | None = None,
          fleet: bool = True, alone_on_fleet_error: bool = False) -> Services:
    """Store, fetch service, fleet client and one process-wide rate limiter from `settings`.

    Overrides (command-line flags, warmup's cache path, the demo's cap): `store` reuses an open store
    (else one is opened at `cache_dir` with `max_size`), `connections`/`rate_limit` replace the settings'
    values when given, `fleet=False` keeps this process alone even when a Redis URL is set.
    """
    from comfy_autocloud.fetch.service import FetchService
    from comfy_autocloud.transfer import RateLimiter

    rate = rate_limit or settings.rate_limit
    limiter = RateLimiter(rate) if rate else None
    store = store if store is not None else open_store(settings, cache_dir=cache_dir, max_size=max_size)
    node_fleet = open_fleet(settings, alone_on_error=alone_on_fleet_error) if fleet else None
    options = transfer_options(settings, connections=connections, limiter=limiter)
    service = FetchService(store, options=options, fleet=node_fleet, durability=settings.durability)
    return Services(store=store, fetch=service, fleet=node_fleet, limiter=limiter)
