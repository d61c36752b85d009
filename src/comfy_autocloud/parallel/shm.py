"""Weights shared with worker processes through one shared-memory arena (no disk read, no download).

``SharedWeights.pack`` copies a loaded model's tensors once into a single shared-memory block (the
caller's module can be re-pointed at it, so the host keeps one copy), and pickles as one handle: every
worker maps the same pages and rebuilds the state dict as views (``unpack``), then loads it with
``load_state_dict(assign=True)``. One block instead of one segment per tensor keeps file descriptors
and transfer time flat for models with hundreds of tensors. On GPUs each rank copies the block to its
device in one host-to-device transfer.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SharedWeights", "mapped_shm_names", "memory_status", "weights_key"]

_ALIGN = 64


def weights_key(module: nn.Module) -> str:
    """Identity of a module's current weights (names, storage pointers, dtypes, shapes): cheap, no hashing of data."""
    h = hashlib.sha1()
    for name, t in module.state_dict(keep_vars=True).items():
        h.update(f"{name}:{t.data_ptr()}:{t.dtype}:{tuple(t.shape)}:{t.device};".encode())
    return h.hexdigest()[:16]


@dataclass
class SharedWeights:
    """A state dict living in one shared-memory byte buffer: ``entries`` = name -> (offset, dtype, shape)."""

    buffer: Tensor  # uint8, shared memory
    entries: dict[str, tuple[int, torch.dtype, tuple[int, ...]]]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def pack(cls, module_or_sd: nn.Module | dict[str, Tensor], rebind: bool = False,
             meta: dict[str, Any] | None = None) -> SharedWeights:
        """Copy tensors into one shared block; ``rebind`` re-points a module's parameters at it (no 2nd copy)."""
        module = module_or_sd if isinstance(module_or_sd, nn.Module) else None
        sd = module.state_dict() if module is not None else dict(module_or_sd)
        layout: dict[str, tuple[int, torch.dtype, tuple[int, ...]]] = {}
        seen: dict[tuple[int, torch.dtype, tuple[int, ...], tuple[int, ...]], int] = {}
        total = 0
        for name, t in sd.items():
            ident = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
            if ident in seen and t.numel():
                layout[name] = (seen[ident], t.dtype, tuple(t.shape))
                continue
            total = (total + _ALIGN - 1) // _ALIGN * _ALIGN
            layout[name] = (total, t.dtype, tuple(t.shape))
            seen[ident] = total
            total += t.numel() * t.element_size()
        buffer = _new_shared_bytes(max(total, 1))
        done: set[int] = set()
        for name, t in sd.items():
            off = layout[name][0]
            if off in done:
                continue
            done.add(off)
            _view(buffer, *layout[name]).copy_(t.detach())
        shared = cls(buffer, layout, dict(meta or {}))
        if rebind and module is not None:
            shared.rebind(module)
        return shared

    def unpack(self, device: torch.device | str | None = None) -> dict[str, Tensor]:
        """Views into the shared block (or into one device copy of it) keyed like the original state dict."""
        buf = self.buffer
        if device is not None and torch.device(device).type != "cpu":
            buf = buf.to(device, non_blocking=True)
        return {name: _view(buf, *spec) for name, spec in self.entries.items()}

    def rebind(self, module: nn.Module) -> None:
        """Point the module's parameters and buffers at the shared views (values unchanged)."""
        views = self.unpack()
        for name, t in module.state_dict(keep_vars=True).items():
            if name in views and views[name].shape == t.shape and views[name].dtype == t.dtype:
                t.data = views[name]

    @property
    def nbytes(self) -> int:
        return self.buffer.numel()

    def shm_name(self) -> str | None:
        """The /dev/shm name of the block as mapped in this process (None if not found)."""
        names = mapped_shm_names(self.buffer.data_ptr())
        return names[0] if names else None


def _new_shared_bytes(n: int) -> Tensor:
    storage = torch.UntypedStorage._new_shared(n) if hasattr(torch.UntypedStorage, "_new_shared") else None
    if storage is None:
        return torch.empty(n, dtype=torch.uint8).share_memory_()
    return torch.empty(0, dtype=torch.uint8).set_(storage)


def _view(buf: Tensor, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
    n = 1
    for s in shape:
        n *= s
    nbytes = n * torch.empty(0, dtype=dtype).element_size()
    return buf[offset: offset + nbytes].view(dtype).view(shape)


def mapped_shm_names(address: int | None = None) -> list[str]:
    """Shared-memory files mapped in this process (containing ``address`` if given), from /proc/self/maps."""
    names: list[str] = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) < 6 or ("/dev/shm/" not in parts[5] and "torch_" not in parts[5]):
                    continue
                lo, hi = (int(v, 16) for v in parts[0].split("-"))
                if address is None or lo <= address < hi:
                    names.append(re.sub(r" \(deleted\)$", "", parts[5].strip()))
    except OSError:
        return names
    return names


def memory_status(pid: int | None = None) -> dict[str, int]:
    """RssAnon / RssShmem / RssFile in bytes for a process (Linux /proc), for the no-duplication checks."""
    out: dict[str, int] = {}
    path = f"/proc/{pid or os.getpid()}/status"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssShmem:", "RssFile:", "VmRSS:")):
                    key, val = line.split(":", 1)
                    out[key] = int(val.split()[0]) * 1024
    except OSError:
        pass
    return out
