"""`autocloud demo`: the offline end-to-end run the README starts with."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import click

from comfy_autocloud.cli.output import console, emit_json, err_console


@click.command("demo")
@click.option("--dir", "workdir", type=click.Path(path_type=Path), default=None,
              help="Keep the origin, manifest and cache here (default: a temporary directory, removed after).")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object at the end.")
def demo_cmd(workdir: Path | None, as_json: bool) -> None:
    """Offline demo: local origin -> fetch -> store -> warm cache hits -> eviction -> status."""
    from comfy_autocloud.demo.run import run_demo

    temp = workdir is None
    path = Path(tempfile.mkdtemp(prefix="autocloud-demo-")) if temp else workdir
    assert path is not None
    path.mkdir(parents=True, exist_ok=True)
    try:
        summary = run_demo(path, err_console if as_json else console)
    finally:
        if temp:
            shutil.rmtree(path, ignore_errors=True)
    if as_json:
        emit_json(summary.as_json())
