"""Generated model files with valid safetensors headers, so demo files look like the real thing."""

from __future__ import annotations

import hashlib
import json
import random
import struct
from pathlib import Path

_CHUNK = 4 * 2**20


def write_safetensors(path: Path, size: int, seed: int) -> str:
    """Write a safetensors file of exactly `size` bytes (one U8 tensor fills the rest); return its sha256."""
    header_obj: dict[str, object] = {"__metadata__": {"format": "pt", "generator": "autocloud-demo"}}
    # The header's own length depends on the tensor's length; two passes settle it.
    data_len = 0
    for _ in range(2):
        header_obj["weight"] = {"dtype": "U8", "shape": [max(data_len, 0)], "data_offsets": [0, max(data_len, 0)]}
        raw = json.dumps(header_obj, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        data_len = size - 8 - len(raw)
    if data_len < 0:
        raise ValueError(f"{path}: size {size} is too small for a safetensors header")
    header_obj["weight"] = {"dtype": "U8", "shape": [data_len], "data_offsets": [0, data_len]}
    raw = json.dumps(header_obj, separators=(",", ":")).encode()
    raw += b" " * (size - 8 - data_len - len(raw))
    rng = random.Random(seed)
    digest = hashlib.sha256()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        head = struct.pack("<Q", len(raw)) + raw
        fh.write(head)
        digest.update(head)
        left = data_len
        while left:
            block = rng.randbytes(min(_CHUNK, left))
            fh.write(block)
            digest.update(block)
            left -= len(block)
    return digest.hexdigest()


def read_safetensors_header(path: Path) -> dict[str, object]:
    """Parse the header back (the demo checks every fetched file is a loadable safetensors container)."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(n))
