"""`autocloud warmup`: RunPod's warmup.sh in one command (hot models from the volume to NVMe, ComfyUI set up).

Also runnable as `python -m comfy_autocloud.cli.warmup_cmd …`: the runpod wrappers and the detached
`--background` child use that, so they work from a cloned checkout as well as a pip install.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from comfy_autocloud.cli import output
from comfy_autocloud.cli.context import AppContext, pass_app
from comfy_autocloud.cli.output import emit_json, exit_code_of
from comfy_autocloud.cli.warmup_copy import open_store, perform_copy, print_setup
from comfy_autocloud.cli.warmup_rerun import PARALLEL_RANGE
from comfy_autocloud.errors import ManifestError
from comfy_autocloud.store.durability import DURABILITIES, Durability
from comfy_autocloud.units import human_size
from comfy_autocloud.warmup import run as wr
from comfy_autocloud.warmup.plan import Plan


def _list(app: AppContext, paths: wr.WarmupPaths, plan: Plan, as_json: bool) -> int:
    rows = wr.list_rows(plan, open_store(app.settings, paths))
    if as_json:
        for r in rows:
            emit_json(r.as_dict())
        return 0 if all(r.on_volume for r in rows) else 1
    from rich.markup import escape
    from rich.table import Table

    console, err_console = output.console, output.err_console
    table = Table(title=escape(f"warmup list: volume {paths.models} -> cache {paths.cache}"), title_justify="left")
    for col in ("line", "file", "volume", "cache", "size", "in RAM"):
        table.add_column(col, justify="right" if col in ("line", "size", "in RAM") else "left",
                         overflow="fold")
    for r in rows:
        vol = "[green]yes[/green]" if r.on_volume else "[red]missing[/red]"
        cache = {"yes": "[green]yes[/green]", "stale": "[yellow]stale[/yellow]", "no": "no"}[r.cache]
        ram = f"{100 * r.in_ram / r.size:.0f}%" if r.in_ram is not None and r.size else "-"
        table.add_row(r.line.rsplit(":", 1)[-1], escape(r.key), vol, cache, human_size(r.size) if r.size else "-",
                      ram)
    console.print(table)
    for r in rows:
        if r.reason:
            err_console.print(f"[yellow]![/yellow] {escape(r.line)} {escape(r.pattern)}: {escape(r.reason)}",
                              soft_wrap=True)
    on_vol = [r for r in rows if r.on_volume]
    console.print(f"{len(on_vol)} of {len(rows)} on the volume, "
                  f"{sum(r.cache == 'yes' for r in on_vol)} in the cache and current")
    return 0 if len(on_vol) == len(rows) else 1


def _status(app: AppContext, paths: wr.WarmupPaths, as_json: bool) -> int:
    info = wr.status_info(open_store(app.settings, paths), paths)
    if as_json:
        emit_json(info)
        return 0
    from rich.markup import escape

    console = output.console
    c, v, y, bg = info["cache"], info["volume"], info["extra_model_paths"], info["background"]
    console.print(f"cache   {escape(c['path'])}: {human_size(c['disk_free'])} free of {human_size(c['disk_total'])}; "
                  f"warmup files {c['warmup_entries']} ({human_size(c['warmup_bytes'])}), "
                  f"all cached files {c['entries']} ({human_size(c['bytes'])})"
                  + (f", cap {human_size(c['cap'])}" if c["cap"] else ""))
    if v["exists"]:
        console.print(f"volume  {escape(v['path'])}: {human_size(v['disk_free'])} free of "
                      f"{human_size(v['disk_total'])}")
    else:
        console.print(f"volume  {escape(v['path'])}: [red]not found[/red] (set COMFYUI_PATH)")
    state = ("[green]cache first[/green]" if y["cache_first"] else
             "[yellow]cache not first[/yellow] (run `autocloud warmup --setup-only`)") if y["exists"] else \
        "[yellow]absent[/yellow] (run `autocloud warmup --setup-only`)"
    console.print(f"yaml    {escape(y['path'])}: {state}" + (f" ({escape(y['error'])})" if y.get("error") else ""))
    if bg:
        console.print(f"job     background warmup pid {bg['pid']}: {'running' if bg['running'] else 'finished'}; "
                      f"log {escape(bg['log'])}")
    return 0


def _clean(app: AppContext, paths: wr.WarmupPaths, as_json: bool) -> int:
    res = wr.clean(open_store(app.settings, paths), paths)
    if as_json:
        emit_json({"removed": [e.key for e in res.removed], "bytes_freed": res.bytes_freed,
                   "kept": [{"key": e.key, "reason": why} for e, why in res.kept]})
    else:
        from rich.markup import escape

        console = output.console
        console.print(f"removed {len(res.removed)} warmup files ({human_size(res.bytes_freed)}) from "
                      f"{escape(str(paths.cache))}")
        for e, why in res.kept:
            output.err_console.print(f"[yellow]kept[/yellow] {escape(e.key)}: {escape(why)}")
    return 0


def _background(app: AppContext, paths: wr.WarmupPaths, conf: Path, *, parallel: int, setup: bool,
                page_cache: bool, plan: Plan, as_json: bool, durability: Durability, hashing: wr.Hashing) -> int:
    setup_res = wr.setup_extra_paths(paths, plan) if setup else None
    argv = [sys.executable, "-m", "comfy_autocloud.cli.warmup_cmd", str(conf), "--comfyui-path", str(paths.comfyui),
            "--cache-path", str(paths.cache), "--parallel", str(parallel), "--no-setup", "--record-pid",
            "--durability", durability, "--hash", hashing]
    if not page_cache:
        argv.append("--no-page-cache")
    s = app.settings
    env = {**os.environ, "AUTOCLOUD_MAX_SIZE": str(s.max_size or 0), "AUTOCLOUD_POLICY": s.policy}
    job = wr.start_background(argv, paths, env)
    if as_json:
        emit_json({"background": job, "setup": setup_res.as_dict() if setup_res else None})
        return 0
    if setup_res is not None:
        print_setup(setup_res, paths)
    from rich.markup import escape

    console = output.console
    if job["started"]:
        console.print(f"warmup continues in the background (pid {job['pid']}, {len(plan.items)} files, "
                      f"{human_size(plan.total_bytes)}); log: {escape(job['log'])}. Until a file is copied ComfyUI "
                      "reads it from the volume.")
    else:
        console.print(f"a background warmup is already running (pid {job['pid']}); log: {escape(job['log'])}")
    return 0


@click.command("warmup")
@click.argument("conf", required=False, metavar="[CONF]")
@click.option("--status", "do_status", is_flag=True, help="Show cache and volume space, the yaml, any background job.")
@click.option("--clean", "do_clean", is_flag=True, help="Remove the files warmup copied (nothing else).")
@click.option("--list", "do_list", is_flag=True, help="For each list entry: on the volume? in the cache?")
@click.option("--setup-only", is_flag=True, help="Only write/merge <COMFYUI_PATH>/extra_model_paths.yaml.")
@click.option("--background", is_flag=True, help="Return at once; a detached process does the copying.")
@click.option("--comfyui-path", metavar="DIR", default=None,
              help="ComfyUI on the volume [env COMFYUI_PATH; default /workspace/ComfyUI].")
@click.option("--cache-path", metavar="DIR", default=None,
              help="Local fast cache [env CACHE_PATH; default /root/fast_cache].")
@click.option("--parallel", "-p", type=click.IntRange(*PARALLEL_RANGE), default=4, show_default=True,
              help="Files copied at the same time.")
@click.option("--no-setup", is_flag=True, help="Copy only; leave extra_model_paths.yaml alone.")
@click.option("--no-page-cache", is_flag=True, help="Do not warm the page cache after copying.")
@click.option("--durability", type=click.Choice(DURABILITIES), default=None,
              help="deferred: wait for no disk write, as cp does; a detached process flushes afterwards, and a file "
                   "written just before the machine went down is checked against its sha256 before use. durable: "
                   "fsync each file before it appears. ephemeral: no flush, no check (a cache that dies with the "
                   f"machine) [env {wr.DURABILITY_ENV}; default {wr.DEFAULT_DURABILITY}].")
@click.option("--hash", "hashing", type=click.Choice(wr.HASHINGS), default=None,
              help="later: a file copied for the first time (no record in the volume's hash sidecar) gets its sha256 "
                   "from a low-priority background process after warmup returns, not read back on the critical "
                   "path; now: hash while copying (the command returns with every sha256 known) "
                   f"[env {wr.HASHING_ENV}; default {wr.DEFAULT_HASHING}].")
@click.option("--json", "as_json", is_flag=True, help="JSON lines on stdout.")
@click.option("--record-pid", is_flag=True, hidden=True)
@pass_app
def warmup_cmd(app: AppContext, conf: str | None, do_status: bool, do_clean: bool, do_list: bool, setup_only: bool,
               background: bool, comfyui_path: str | None, cache_path: str | None, parallel: int, no_setup: bool,
               no_page_cache: bool, durability: str | None, hashing: str | None, as_json: bool,
               record_pid: bool) -> None:
    """Copy the models in CONF (default $WARMUP_CONFIG or warmup_models.conf) from the volume to the fast cache.

    CONF lines are `<folder>/<file or glob>` relative to <COMFYUI_PATH>/models. A rerun copies only
    what changed; ComfyUI is set (extra_model_paths.yaml) to read the cache first. Exit 1 if any file
    is missing or failed; the others are copied anyway.
    """
    modes = [m for m, on in (("--status", do_status), ("--clean", do_clean), ("--list", do_list),
                             ("--setup-only", setup_only)) if on]
    if len(modes) > 1:
        raise click.UsageError(f"{' and '.join(modes)} cannot be combined")
    if background and modes:
        raise click.UsageError(f"--background copies; it cannot be combined with {modes[0]}")
    paths = wr.WarmupPaths.from_env(comfyui=comfyui_path, cache=cache_path)
    if record_pid:
        wr.record_pid(paths)
    code = run_mode(app, paths, conf, mode=modes[0] if modes else None, background=background, parallel=parallel,
                    setup=not no_setup, page_cache=not no_page_cache, as_json=as_json,
                    durability=wr.durability_from(durability), hashing=wr.hashing_from(hashing))
    if code:
        raise SystemExit(code)


def run_mode(app: AppContext, paths: wr.WarmupPaths, conf: str | None, *, mode: str | None = None,
             background: bool = False, parallel: int = 4, setup: bool = True, page_cache: bool = True,
             as_json: bool = False, durability: Durability | None = None, hashing: wr.Hashing | None = None) -> int:
    """One warmup invocation (also what `autocloud start` runs before ComfyUI); returns the exit code."""
    if mode == "--status":
        return _status(app, paths, as_json)
    if mode == "--clean":
        return _clean(app, paths, as_json)
    if mode == "--setup-only":
        plan = None
        try:
            plan = wr.load_plan(wr.resolve_conf(conf, paths), paths)
        except ManifestError:
            if conf:  # a list named explicitly must exist; the default one is optional here
                raise
        res = wr.setup_extra_paths(paths, plan)
        if as_json:
            emit_json(res.as_dict())
        else:
            print_setup(res, paths)
        return 0
    durability = wr.durability_from(None) if durability is None else durability
    hashing = wr.hashing_from(None) if hashing is None else hashing
    conf_path = wr.resolve_conf(conf, paths)
    plan = wr.load_plan(conf_path, paths)
    if mode == "--list":
        return _list(app, paths, plan, as_json)
    if background:
        return _background(app, paths, conf_path, parallel=parallel, setup=setup, page_cache=page_cache, plan=plan,
                           as_json=as_json, durability=durability, hashing=hashing)
    return perform_copy(app.settings, paths, plan, parallel=parallel, as_json=as_json, setup=setup,
                        page_cache=page_cache, durability=durability, hashing=hashing)


def run_standalone(cmd: click.Command, argv: list[str] | None = None) -> int:
    """Run one command outside the `autocloud` group, with the same error reporting as `autocloud`."""
    from comfy_autocloud.config import load_settings

    app = AppContext(load_settings())
    try:
        return exit_code_of(lambda: cmd.main(args=argv, prog_name=f"autocloud {cmd.name}", standalone_mode=False,
                                             obj=app), "nothing half-copied is left at a final path")
    finally:
        app.close()  # what `autocloud` closes at the end of a command, before it ends the process


if __name__ == "__main__":
    from comfy_autocloud.cli.main import end_process

    rc = run_standalone(warmup_cmd)
    end_process(rc)  # runpod/warmup.sh runs this: no interpreter teardown (~40 ms CPU of a rerun), as `autocloud`
    sys.exit(rc)
