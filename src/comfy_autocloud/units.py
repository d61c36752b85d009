"""Human sizes and rates in both directions: '200G' -> bytes, bytes -> '1.2 GiB'."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024**2, "g": 1024**3, "t": 1024**4, "p": 1024**5}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Parse '500G', '1.5TiB', '800MB', '1024' (binary units: storage users mean GiB) into bytes."""
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size must not be negative: {text}")
        return text
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (examples: 500G, 1.5TiB, 800M, 1048576)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_rate(text: str | int) -> int:
    """Parse a byte rate: '40M', '40MB/s', '100m/s' -> bytes per second."""
    if isinstance(text, int):
        return parse_size(text)
    return parse_size(re.sub(r"\s*/\s*s(ec)?\s*$", "", text, flags=re.IGNORECASE))


def human_size(n: float) -> str:
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"


def human_rate(bytes_per_s: float) -> str:
    return human_size(bytes_per_s) + "/s"
