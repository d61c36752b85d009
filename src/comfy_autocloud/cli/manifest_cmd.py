"""`autocloud manifest check`: validate model lists before a fleet depends on them.

Bad input raises ManifestError ('file:key: reason'); the main entry point prints it and exits 1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from rich.table import Table

from comfy_autocloud.cli.output import console, emit_json
from comfy_autocloud.manifest import ModelSpec, load_manifests, manifest_files, parse_warmup_conf
from comfy_autocloud.redact import redact_url
from comfy_autocloud.units import human_size


def spec_record(spec: ModelSpec) -> dict[str, Any]:
    """A spec as printable JSON; sources are redacted because output ends up in logs and tickets."""
    return {
        "key": spec.key,
        "folder": spec.folder,
        "filename": spec.filename,
        "sources": [redact_url(s) for s in spec.sources],
        "sha256": spec.sha256,
        "size": spec.size,
        "pin": spec.pin,
        "tags": list(spec.tags),
        "preload": spec.preload,
        "defined_in": spec.defined_in,
    }


@click.group("manifest")
def manifest_cmd() -> None:
    """Model lists: seed JSON, split lists, warmup_models.conf, preload_config.json, workflows."""


@manifest_cmd.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per entry.")
def check_cmd(paths: tuple[Path, ...], as_json: bool) -> None:
    """Parse and merge FILE… (files or directories) and show every entry; exit 1 on the first problem."""
    specs = load_manifests(paths)
    files = manifest_files(paths)
    globs = sum(1 for f, fmt in files if fmt == "warmup_conf" for e in parse_warmup_conf(f) if e.is_glob)
    if as_json:
        for spec in specs:
            emit_json(spec_record(spec))
        return
    table = Table(title="model entries")
    for col in ("key", "sources", "sha256", "size", "pin", "defined in"):
        table.add_column(col, overflow="fold")
    for spec in specs:
        table.add_row(
            spec.key,
            "\n".join(redact_url(s) for s in spec.sources) or "-",
            f"{spec.sha256[:12]}…" if spec.sha256 else "-",
            human_size(spec.size) if spec.size is not None else "-",
            "yes" if spec.pin else "",
            spec.defined_in,
        )
    console.print(table)
    verified = sum(1 for s in specs if s.sha256)
    names_only = sum(1 for s in specs if not s.sources)
    summary = (f"{len(specs)} entries from {len(files)} file(s): {verified} with sha256, "
               f"{names_only} without a source")
    if globs:
        summary += f", {globs} warmup glob pattern(s) (expanded by warmup, not listed)"
    console.print(summary)
