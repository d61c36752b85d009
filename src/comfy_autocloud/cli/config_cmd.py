"""`autocloud config`: effective settings and where each came from."""

from __future__ import annotations

import click
from rich.table import Table

from comfy_autocloud.cli.context import AppContext, pass_app
from comfy_autocloud.cli.output import console, emit_json
from comfy_autocloud.config import SETTINGS, config_file_path
from comfy_autocloud.units import human_rate, human_size


def _show(name: str, value: object) -> str:
    if value is None:
        return "-"
    if name in ("max_size", "min_free_disk"):
        return f"{human_size(value)} ({value} bytes)"  # type: ignore[arg-type]
    if name == "rate_limit":
        return human_rate(value)  # type: ignore[arg-type]
    return str(value)


@click.command("config")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_app
def config_cmd(app: AppContext, as_json: bool) -> None:
    """Show the effective settings and where each value came from."""
    s = app.settings
    if as_json:
        emit_json({"config_file": str(config_file_path()),
                   "settings": {k: {"value": s.values[k], "from": s.origins[k]} for k in s.values}})
        return
    table = Table(title=f"autocloud settings (config file: {config_file_path()})")
    table.add_column("setting")
    table.add_column("value")
    table.add_column("from")
    table.add_column("env")
    for setting in SETTINGS:
        table.add_row(setting.name, _show(setting.name, s.values[setting.name]), s.origins[setting.name], setting.env)
    console.print(table)
