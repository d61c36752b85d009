"""Cache commands: status, list, clean, verify, pin, unpin, evict, simulate-eviction.

Each prints a rich table for people and, with --json, one JSON object per line for scripts and cron.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from comfy_autocloud.cli import output
from comfy_autocloud.cli.context import AppContext, pass_app
from comfy_autocloud.cli.output import emit_json
from comfy_autocloud.errors import StoreError
from comfy_autocloud.units import human_size, parse_size

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def _table(*args: Any, **kwargs: Any) -> Table:
    from rich.table import Table  # rich for the tables people read; --json output needs none of it

    return Table(*args, **kwargs)


def _grid(**kwargs: Any) -> Table:
    from rich.table import Table

    return Table.grid(**kwargs)


def _size_option(value: str | None) -> int | None:
    return None if value is None else _parse_size(value)


def _parse_size(value: str) -> int:
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _age(ts: float) -> str:
    """'3m ago', '2h ago', '5d ago': easier to judge at a glance than a timestamp."""
    d = max(0.0, time.time() - ts)
    for unit, secs in (("d", 86400), ("h", 3600), ("m", 60)):
        if d >= secs:
            return f"{int(d // secs)}{unit} ago"
    return f"{int(d)}s ago"


def _flags(e: Any) -> str:
    return " ".join(f for f, on in (("pinned", e.pinned), ("in-use", e.in_use)) if on)


def _entries_table(entries: list[Any], title: str | None = None) -> Table:
    t = _table(title=title, show_edge=False, header_style="bold")
    t.add_column("key")
    t.add_column("size", justify="right")
    t.add_column("hits", justify="right")
    t.add_column("last used", justify="right")
    t.add_column("flags")
    for e in entries:
        t.add_row(e.key, human_size(e.size), str(e.hits), _age(e.last_access), _flags(e))
    return t


@click.command("status")
@click.option("--top", type=click.IntRange(0, 1000), default=10, show_default=True,
              help="How many of the largest entries to show.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--comfy-url", envvar="AUTOCLOUD_COMFY_URL", default=None, metavar="URL",
              help="A running ComfyUI with this pack: also show its memory preload registry. [env AUTOCLOUD_COMFY_URL]")
@pass_app
def status_cmd(app: AppContext, top: int, as_json: bool, comfy_url: str | None) -> None:
    """Where the cache is, how full it is, and what takes the space."""
    store = app.store()
    preload = fetch_preload(comfy_url) if comfy_url else None
    if as_json:
        usage = store.usage()
        entries = store.entries()
        largest = sorted(entries, key=lambda e: (-e.size, e.key))[:top]
        doc = {"cache_dir": str(store.root), "policy": store.policy.name, **usage.as_dict(),
               "pinned": sum(e.pinned for e in entries), "in_use": sum(e.in_use for e in entries),
               "top": [e.as_dict() for e in largest]}
        if preload is not None:
            doc["preload"] = preload
        emit_json(doc)
        return
    render_status(store, output.console, top=top)
    if preload is not None:
        render_preload(preload, output.console)


def fetch_preload(url: str, timeout: float = 5.0) -> dict[str, Any]:
    """GET <url>/autocloud/preload; an unreachable ComfyUI is reported in the result, not raised."""
    import json
    import urllib.error
    import urllib.request

    from comfy_autocloud.redact import redact_url

    try:
        with urllib.request.urlopen(url.rstrip("/") + "/autocloud/preload", timeout=timeout) as r:
            data = json.loads(r.read())
    except (OSError, urllib.error.URLError, ValueError) as exc:
        return {"error": f"{redact_url(url)}: no preload status ({getattr(exc, 'reason', exc)})"}
    return data if isinstance(data, dict) else {"error": f"{redact_url(url)}: unexpected answer"}


def render_preload(data: dict[str, Any], out: Console) -> None:
    """The ComfyUI memory preload registry: one row per entry."""
    if "error" in data and "entries" not in data:
        output.err_console.print(f"[yellow]preload:[/] {data['error']}")
        return
    held = human_size(int(data.get("bytes_held", 0)))
    budget = f" of {human_size(data['ram_budget'])} budget" if data.get("ram_budget") else ""
    t = _table(title=f"memory preload: {held} held{budget}, {data.get('loads', 0)} loads, "
                    f"{data.get('hits', 0)} hits", show_edge=False, header_style="bold")
    for col in ("name", "state", "size", "load", "hits", "device", "error"):
        t.add_column(col, justify="right" if col in ("size", "load", "hits") else "left")
    for e in data.get("entries", []):
        t.add_row(e["name"], e["state"], human_size(e.get("bytes") or 0), f"{e.get('load_seconds') or 0:.2f}s",
                  str(e.get("hits", 0)), e.get("device") or "", e.get("error") or e.get("note") or "")
    out.print(t)
    for err in data.get("config_errors", []):
        output.err_console.print(f"[red]preload config:[/] {err}")


def render_status(store: Any, out: Console, *, top: int = 10) -> None:
    """The human status view (also shown by `autocloud demo`)."""
    usage = store.usage()
    entries = store.entries()
    largest = sorted(entries, key=lambda e: (-e.size, e.key))[:top]
    pinned = sum(e.pinned for e in entries)
    in_use = sum(e.in_use for e in entries)
    grid = _grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    grid.add_row("cache", str(store.root))
    if usage.cap:
        pct = 100 * usage.bytes / usage.cap
        bar = _grid(padding=(0, 1))
        from rich.progress_bar import ProgressBar

        bar.add_row(ProgressBar(total=usage.cap, completed=min(usage.bytes, usage.cap), width=30),
                    f"{human_size(usage.bytes)} / {human_size(usage.cap)} ({pct:.0f}%)")
        grid.add_row("usage", bar)
    else:
        grid.add_row("usage", f"{human_size(usage.bytes)} (no cap)")
    if usage.logical_bytes != usage.bytes:
        saved = human_size(usage.logical_bytes - usage.bytes)
        grid.add_row("", f"{saved} saved by storing identical files once")
    if usage.reserved_bytes:
        grid.add_row("reserved", f"{human_size(usage.reserved_bytes)} for downloads in progress")
    grid.add_row("disk", f"{human_size(usage.disk_free)} free of {human_size(usage.disk_total)}")
    grid.add_row("entries", f"{usage.entries} ({pinned} pinned, {in_use} in use)")
    grid.add_row("policy", store.policy.name)
    out.print(grid)
    if largest:
        out.print(_entries_table(largest, title="largest entries"))


_SORTS = {
    "key": lambda e: e.key,
    "size": lambda e: (-e.size, e.key),
    "access": lambda e: (-e.last_access, e.key),
    "hits": lambda e: (-e.hits, e.key),
}


@click.command("list")
@click.option("--folder", metavar="FOLDER", help="Only this model folder (checkpoints, loras, ...).")
@click.option("--sort", "sort_by", type=click.Choice(sorted(_SORTS)), default="key", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry.")
@pass_app
def list_cmd(app: AppContext, folder: str | None, sort_by: str, as_json: bool) -> None:
    """Every cached file with size, hits, last use, pinned/in-use."""
    entries = [e for e in app.store().entries() if folder is None or e.folder == folder]
    entries.sort(key=_SORTS[sort_by])
    if as_json:
        for e in entries:
            emit_json(e.as_dict())
        return
    if not entries:
        output.console.print("cache is empty" if folder is None else f"nothing cached in {folder}")
        return
    output.console.print(_entries_table(entries))
    output.console.print(f"{len(entries)} files, {human_size(sum(e.size for e in entries))}")


@click.command("clean")
@click.option("--max-size", metavar="SIZE", help="Evict down to this size, e.g. 200G (default: the cap).")
@click.option("--keep-days", type=click.FloatRange(min=0), default=None,
              help="Remove files not used for this many days [default: setting keep_days].")
@click.option("--dry-run", is_flag=True, help="Show what would be removed; remove nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_app
def clean_cmd(app: AppContext, max_size: str | None, keep_days: float | None, dry_run: bool,
              as_json: bool) -> None:
    """Remove cold files: unused for --keep-days, then least valuable until under --max-size."""
    if keep_days is None:
        keep_days = app.settings.values.get("keep_days")
    removed = app.store().clean(max_size=_size_option(max_size), keep_days=keep_days, dry_run=dry_run)
    freed = sum(e.size for e in removed)
    if as_json:
        emit_json({"dry_run": dry_run, "removed": [e.as_dict() for e in removed], "files": len(removed),
                   "bytes": freed})
        return
    if not removed:
        output.console.print("nothing to remove")
        return
    output.console.print(_entries_table(removed, title="would remove" if dry_run else "removed"))
    verb = "would free" if dry_run else "freed"
    output.console.print(f"{len(removed)} files, {verb} {human_size(freed)}")


@click.command("verify")
@click.option("--rehash", is_flag=True, help="Also re-read every file and check its sha256 (slow).")
@click.option("--no-fix", "no_fix", is_flag=True, help="Report only; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@pass_app
def verify_cmd(app: AppContext, rehash: bool, no_fix: bool, as_json: bool) -> None:
    """Reconcile files and index; exit 1 if problems remain."""
    report = app.store().verify(rehash=rehash, fix=not no_fix)
    if as_json:
        emit_json(report.as_dict())
    else:
        if report.findings:
            t = _table(show_edge=False, header_style="bold")
            t.add_column("finding")
            t.add_column("key / path")
            t.add_column("reason")
            t.add_column("fixed")
            for f in report.findings:
                fixed = "yes" if f.fixed else ("no" if f.problem else "-")
                t.add_row(f.kind, f.key or f.path, f.reason, fixed)
            output.console.print(t)
        what = f"{report.checked} entries checked" + (f", {report.rehashed} rehashed" if rehash else "")
        if report.ok:
            output.console.print(f"[green]ok[/green]: {what}")
        else:
            output.console.print(f"[red]{len(report.problems)} problem(s) remain[/red]: {what}"
                          + ("; run without --no-fix to repair" if no_fix else ""))
    if not report.ok:
        raise SystemExit(1)


def _each_key(keys: tuple[str, ...], action: str, fn: Any, as_json: bool) -> None:
    failed = 0
    for key in keys:
        try:
            fn(key)
        except StoreError as exc:
            failed += 1
            if as_json:
                emit_json({"key": key, "action": action, "ok": False,
                           "error": f"{exc.subject}: {exc.reason}"})
            else:
                output.err_console.print(f"[red]error:[/red] {exc.subject}: {exc.reason}")
            continue
        if as_json:
            emit_json({"key": key, "action": action, "ok": True})
        else:
            output.console.print(f"{action} {key}")
    if failed:
        raise SystemExit(1)


@click.command("pin")
@click.argument("keys", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key.")
@pass_app
def pin_cmd(app: AppContext, keys: tuple[str, ...], as_json: bool) -> None:
    """Never evict these files (keys like checkpoints/model.safetensors)."""
    _each_key(keys, "pinned", app.store().pin, as_json)


@click.command("unpin")
@click.argument("keys", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key.")
@pass_app
def unpin_cmd(app: AppContext, keys: tuple[str, ...], as_json: bool) -> None:
    """Let eviction consider these files again."""
    _each_key(keys, "unpinned", app.store().unpin, as_json)


@click.command("evict")
@click.argument("keys", nargs=-1, required=True)
@click.option("--force", is_flag=True, help="Also evict pinned or in-use files.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per key.")
@pass_app
def evict_cmd(app: AppContext, keys: tuple[str, ...], force: bool, as_json: bool) -> None:
    """Delete these files from the cache now."""
    store = app.store()
    _each_key(keys, "evicted", lambda k: store.evict(k, force=force), as_json)


@click.command("simulate-eviction")
@click.option("--trace", "trace_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV with header timestamp,key,size.")
@click.option("--capacity", required=True, metavar="SIZE", help="Cache size to simulate, e.g. 500G.")
@click.option("--policy", "policies", multiple=True, metavar="NAME",
              help="Policy to replay (repeatable): default, lru, lfuda, gdsf [default: default].")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per policy.")
def simulate_eviction_cmd(trace_path: Path, capacity: str, policies: tuple[str, ...], as_json: bool) -> None:
    """Replay an access trace through the store's eviction code and report hit ratios."""
    from comfy_autocloud.store.eviction import POLICY_NAMES
    from comfy_autocloud.store.simulate import read_trace, simulate

    cap = _parse_size(capacity)
    names = policies or ("default",)
    for name in names:
        if name not in POLICY_NAMES:
            raise click.BadParameter(f"unknown policy {name!r} (known: {', '.join(POLICY_NAMES)})",
                                     param_hint="--policy")
    trace = list(read_trace(trace_path))
    results = [simulate(trace, cap, name) for name in names]
    if as_json:
        for r in results:
            emit_json(r.as_dict())
        return
    t = _table(title=f"{trace_path.name}: {len(trace)} requests, capacity {human_size(cap)}", show_edge=False,
              header_style="bold")
    for col in ("policy", "byte hit ratio", "object hit ratio", "evictions", "downloaded"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for r in results:
        t.add_row(r.policy, f"{r.byte_hit_ratio:.3f}", f"{r.object_hit_ratio:.3f}", str(r.evictions),
                  human_size(r.bytes_requested - r.bytes_hit))
    output.console.print(t)
