"""Run the real `autocloud` entry point in-process and get its exit code."""

from __future__ import annotations

from comfy_autocloud.cli.main import main


def run_cli(*args: str) -> int:
    """`fetch` and friends exit through SystemExit on a failed file; fold that into the return code."""
    try:
        return main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
