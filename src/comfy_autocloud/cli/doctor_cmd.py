"""`autocloud doctor`: checks that this node is set up so ComfyUI sees and downloads its models."""

from __future__ import annotations

import os
from pathlib import Path

import click
from rich.table import Table

from comfy_autocloud.cli.context import AppContext, pass_app
from comfy_autocloud.cli.output import console, emit_json

STYLE = {"ok": "green", "info": "cyan", "warn": "yellow", "fail": "red"}


def find_comfyui(given: str | None) -> Path | None:
    """--comfyui, else COMFYUI_PATH, else the ComfyUI this pack is installed in (custom_nodes/<pack>), else cwd."""
    here = Path(__file__).resolve()
    candidates = [given, os.environ.get("COMFYUI_PATH"),
                  *(str(p.parent) for p in here.parents if p.name == "custom_nodes"), os.getcwd()]
    for c in candidates:
        if c and (Path(c) / "main.py").is_file() and (Path(c) / "folder_paths.py").is_file():
            return Path(c).resolve()
    return None


@click.command("doctor")
@click.option("--comfyui", "comfyui", default=None, metavar="DIR",
              help="ComfyUI folder (with main.py) [env COMFYUI_PATH; default: the one this pack is installed in].")
@click.option("--extra-model-paths", "extra", multiple=True, type=click.Path(dir_okay=False), metavar="YAML",
              help="Another extra_model_paths.yaml ComfyUI is started with (--extra-model-paths-config).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_app
def doctor_cmd(app: AppContext, comfyui: str | None, extra: tuple[str, ...], as_json: bool) -> int:
    """Check ComfyUI, its model folders, the cache, the manifest, the fleet, tokens and proxies.

    Exits 1 when a check fails (a model ComfyUI will not see, a cache it cannot write, a manifest that
    does not parse, an unreachable Redis, a malformed proxy).
    """
    from comfy_autocloud.doctor import layout_from_checkout, report, run_checks

    s = app.settings
    comfy = find_comfyui(comfyui)
    if comfyui and comfy is None:
        raise click.BadParameter(f"{comfyui}: no ComfyUI here (main.py and folder_paths.py expected)",
                                 param_hint="--comfyui")
    layout = layout_from_checkout(comfy, Path(s.cache_path), [Path(e) for e in extra]) if comfy else None
    cached = app.store().usage().bytes if Path(s.cache_path).is_dir() else 0
    checks = run_checks(s, layout, cached_bytes=cached)
    out = report(checks, layout)
    if as_json:
        emit_json(out)
    else:
        table = Table(title="autocloud doctor", show_lines=False)
        table.add_column("check")
        table.add_column("", no_wrap=True)
        table.add_column("detail", overflow="fold")
        for c in checks:
            table.add_row(c.name, f"[{STYLE[c.status]}]{c.status}[/]", c.detail)
        console.print(table)
        if layout is not None:
            folders = Table(title=f"folders ComfyUI reads, first match wins ({layout.where})")
            folders.add_column("folder")
            folders.add_column("directories, in search order", overflow="fold")
            for name, paths in sorted(layout.folders.items()):
                folders.add_row(name, "\n".join(paths))
            console.print(folders)
        console.print("[green]all good[/]" if out["ok"] else
                      f"[red]{sum(c.status == 'fail' for c in checks)} problem(s) to fix[/]")
    return 0 if out["ok"] else 1
