"""Fetch service: resolve spec -> verified local path, single-flight, progress events.

Names are imported from their modules on first use (`comfy_autocloud.lazy`): `fetch.sync` and
`fetch.request` need no transfer engine.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from comfy_autocloud.lazy import lazy_names

if TYPE_CHECKING:
    from comfy_autocloud.fetch.request import FetchRequest, FetchResult
    from comfy_autocloud.fetch.service import FetchService, specs_from_urls

_WHERE = {"FetchRequest": "request", "FetchResult": "request", "FetchService": "service",
          "specs_from_urls": "service"}
__getattr__ = lazy_names(__name__, _WHERE)

__all__ = ["FetchRequest", "FetchResult", "FetchService", "specs_from_urls"]
