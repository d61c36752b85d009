"""Package faces that import a submodule only when one of its names is used.

`from comfy_autocloud.manifest import ModelSpec` should not parse every manifest format's pydantic
models, and `from comfy_autocloud.transfer import TransferOptions` should not import aiohttp: a
command's start-up is part of its run time (`autocloud --help`, a cache hit).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_names(package: str, where: Mapping[str, str]) -> Callable[[str], Any]:
    """A module `__getattr__` for `package`: name -> its submodule (relative), imported on first use.

    A name may not be a submodule's name too: importing that submodule sets the package attribute to
    the module, and `__getattr__` would never be asked for the name.
    """
    clash = sorted(set(where) & set(where.values()))
    if clash:
        raise ValueError(f"{package}: {clash[0]!r} names both a submodule and an attribute")

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        loaded = importlib.import_module(f"{package}.{module}")
        face = sys.modules[package]
        for other, home in where.items():  # bind every name of that module: later uses are plain reads
            if home == module:
                setattr(face, other, getattr(loaded, other))
        return getattr(face, name)

    return __getattr__
