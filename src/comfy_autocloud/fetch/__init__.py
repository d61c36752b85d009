"""Fetch service: resolve spec -> verified local path, single-flight, progress events."""

from comfy_autocloud.fetch.request import FetchRequest, FetchResult
from comfy_autocloud.fetch.service import FetchService, specs_from_urls

__all__ = ["FetchRequest", "FetchResult", "FetchService", "specs_from_urls"]
