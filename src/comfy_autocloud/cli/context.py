"""What every command gets from the global options: resolved settings and lazily opened services."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from comfy_autocloud.config import Settings

if TYPE_CHECKING:
    from comfy_autocloud.services import Services
    from comfy_autocloud.store import Store


@dataclass
class AppContext:
    settings: Settings
    _cache: dict[str, Any] = field(default_factory=dict)

    def store(self) -> Store:
        """The settings' store, opened on first use (commands that need none never import it)."""
        if "store" not in self._cache:
            from comfy_autocloud.services import open_store

            self._cache["store"] = open_store(self.settings)
        return self._cache["store"]

    def services(self, *, connections: int | None = None, rate_limit: int | None = None) -> Services:
        """Fetch service, fleet and limiter on this invocation's store; flags over settings."""
        from comfy_autocloud.services import build

        built = build(self.settings, store=self.store(), connections=connections, rate_limit=rate_limit)
        self._cache.setdefault("services", []).append(built)
        return built

    def close(self) -> None:
        """Release what the command opened (fleet connections, the index) when it ends, not at interpreter
        teardown: the process may then end at once (`main`)."""
        for built in self._cache.pop("services", []):
            built.close()
        store = self._cache.pop("store", None)
        if store is not None:
            store.close()


pass_app = click.make_pass_decorator(AppContext)
