"""Can this interpreter run the `autocloud` commands? `python -m comfy_autocloud.cli.deps`.

The RunPod wrappers ask every candidate interpreter this before they hand it a command, so a Python
that has the package on its path but lacks a dependency is passed over (or named in a clear error)
instead of dying with a traceback in the middle of a warmup. Finding a module spec imports nothing,
so the check costs a few milliseconds whatever the interpreter has.
"""

from __future__ import annotations

import importlib.util
import sys

# Import names of the core dependencies in pyproject.toml (a test keeps the two lists equal).
CORE_MODULES: dict[str, str] = {
    "aiohttp": "aiohttp",
    "pydantic": "pydantic",
    "click": "click",
    "rich": "rich",
    "yaml": "pyyaml",
}


def missing_modules() -> list[str]:
    """The distributions (pip names) whose import name this interpreter cannot find."""
    return [dist for mod, dist in CORE_MODULES.items() if importlib.util.find_spec(mod) is None]


def main() -> int:
    missing = missing_modules()
    if missing:
        print("missing: " + " ".join(missing))
        return 1
    print(f"ok: {sys.executable}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
