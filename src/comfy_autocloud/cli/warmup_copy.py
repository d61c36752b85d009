"""`autocloud warmup`'s copy and its report, without click: also what a rerun answered before click runs
(cli/warmup_rerun.py) prints, so both print the same lines."""

from __future__ import annotations

import contextlib
import sys
from typing import TYPE_CHECKING

from comfy_autocloud.cli import output
from comfy_autocloud.cli.output import emit_json, say, styled
from comfy_autocloud.progress import CancelToken
from comfy_autocloud.store.durability import Durability
from comfy_autocloud.units import human_rate, human_size
from comfy_autocloud.warmup import run as wr
from comfy_autocloud.warmup.extra_paths import MergeResult
from comfy_autocloud.warmup.plan import Plan

if TYPE_CHECKING:
    from comfy_autocloud.cli.progress_view import FetchProgress
    from comfy_autocloud.config import Settings
    from comfy_autocloud.store import Store


def open_store(settings: Settings, paths: wr.WarmupPaths) -> Store:
    """The Store at CACHE_PATH, with the settings' cap and policy.

    Not closed when the command ends, also when CACHE_PATH is the global cache: every write is
    committed, and closing would fold the WAL into the index with 4 fdatasyncs (40-50 ms of a rerun on a
    busy disk, measured) and, as the last connection, remove the WAL, whose header is the generation
    the rerun memo (warmup/memo.py) was written for: the next rerun would go through the store again.
    SQLite folds the WAL in by itself every 1000 pages.
    """
    from comfy_autocloud import services  # here: a rerun its memo proves current opens no store

    return services.open_store(settings, cache_dir=paths.cache)


def print_setup(res: MergeResult, paths: wr.WarmupPaths) -> None:
    if res.changed:
        extra = f" (previous version saved as {res.backup})" if res.backup else ""
        say(("✓", "green"), f" {res.path} updated{extra}: ComfyUI searches {paths.cache}/<folder> first, "
                            "then the volume")
    else:
        say(("✓", "green"), f" {res.path} already lists {paths.cache} first")


def perform_copy(settings: Settings, paths: wr.WarmupPaths, plan: Plan, *, parallel: int, as_json: bool,
                 setup: bool, page_cache: bool, durability: Durability = wr.DEFAULT_DURABILITY,
                 hashing: wr.Hashing = wr.DEFAULT_HASHING) -> int:
    """Foreground warmup: yaml first (so ComfyUI can start meanwhile), then copy; 1 if any file failed.

    A rerun that the memo proves has nothing to copy (warmup/memo.py) opens no store (nor SQLite).
    """
    setup_res = wr.setup_extra_paths(paths, plan) if setup else None
    view: FetchProgress | None = None  # bars only for people; logs get the summary lines (and never import rich)
    progress: wr.TotalProgress | None = None
    if styled(sys.stderr if as_json else sys.stdout):
        from comfy_autocloud.cli.progress_view import FetchProgress

        out = output.err_console if as_json else output.console
        view = FetchProgress(out, enabled=out.is_terminal)
        progress = wr.TotalProgress(view, plan.total_bytes, f"total ({len(plan.items)} files)")
    cancel = CancelToken()
    try:
        with view or contextlib.nullcontext():
            report = wr.rerun_from_memo(plan, paths, lambda: open_store(settings, paths), progress=progress,
                                        warm_page_cache=page_cache)
            if report is None:
                report = wr.run_warmup(open_store(settings, paths), plan, parallel=parallel, progress=progress,
                                       cancel=cancel, warm_page_cache=page_cache, durability=durability,
                                       hashing=hashing, memo_dir=paths.state_dir)
    except KeyboardInterrupt:
        cancel.cancel()
        raise
    report.setup = setup_res
    return show_report(report, paths, as_json)


def show_report(report: wr.WarmupReport, paths: wr.WarmupPaths, as_json: bool) -> int:
    """The report as JSON lines or lines for people; the command's exit code (1 if any file failed)."""
    if as_json:
        for o in report.outcomes:
            emit_json(o.as_dict())
        emit_json({"summary": report.summary()})
    else:
        _print_report(report, paths)
    return 0 if report.ok else 1


def _print_report(report: wr.WarmupReport, paths: wr.WarmupPaths) -> None:
    for o in report.outcomes:
        if o.status in ("copied", "recopied"):
            verb = "copied" if o.status == "copied" else "copied again (the volume file changed)"
            say(("✓", "green"), f" {o.key}  {human_size(o.size)}  {verb} in {o.seconds:.2f} s ({human_rate(o.rate)})")
        elif o.status == "cached":
            say(("=", "green"), f" {o.key}  {human_size(o.size)}  already in the cache")
        else:
            where = f" [{o.line}]" if o.line else ""
            say(("✗", "red"), f" {o.key}{where}: {o.error}", err=True, soft_wrap=True)
    s = report.summary()
    parts = [f"{s.get(k, 0)} {k}" for k in ("copied", "recopied", "cached", "missing", "failed") if s.get(k)]
    rate = f" ({human_rate(s['rate'])})" if s["bytes_copied"] else ""
    say(f"warmup: {s['files']} files ({', '.join(parts) or 'nothing to do'}), "
        f"{human_size(s['bytes_copied'])} copied in {report.seconds:.2f} s{rate}; "
        f"page cache warmed: {human_size(report.warmed_bytes)}"
        + (f" ({human_size(report.warming_bytes)} still being read in the background)"
           if report.warming_bytes else ""))
    if s["hash_pending"]:
        say(f"warmup: first copy of {s['hash_pending']} file(s): their sha256 is computed in the background at low "
            "priority and recorded on the volume, so the next warmup copies them without reading them back")
    if report.setup is not None:
        print_setup(report.setup, paths)
