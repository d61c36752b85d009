"""Fetch service: resolve spec -> verified local path, single-flight, progress events."""

from comfy_autocloud.fetch.service import FetchResult, FetchService, specs_from_urls

__all__ = ["FetchResult", "FetchService", "specs_from_urls"]
