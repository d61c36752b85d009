"""What every command gets from the global options: resolved settings and lazily opened services."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import click

from comfy_autocloud.config import Settings


@dataclass
class AppContext:
    settings: Settings
    _cache: dict[str, Any] = field(default_factory=dict)

    def store(self):  # -> Store (imported lazily so `--help` stays fast)
        if "store" not in self._cache:
            from comfy_autocloud.store import Store

            s = self.settings
            self._cache["store"] = Store(s.cache_path, max_size=s.max_size, policy=s.policy,
                                         temp_dir=s.values.get("temp_dir"))
        return self._cache["store"]


pass_app = click.make_pass_decorator(AppContext)
