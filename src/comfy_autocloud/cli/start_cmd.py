"""`autocloud start`: RunPod's start_with_warmup.sh in one command: warmup, then ComfyUI under a restarting supervisor.

Also runnable as `python -m comfy_autocloud.cli.start_cmd …` (what `runpod/start_with_warmup.sh` execs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click
from rich.markup import escape

from comfy_autocloud.cli.context import AppContext, pass_app
from comfy_autocloud.cli.output import err_console
from comfy_autocloud.cli.warmup_cmd import run_mode, run_standalone
from comfy_autocloud.errors import AutoCloudError
from comfy_autocloud.warmup import run as wr
from comfy_autocloud.warmup.supervise import SuperviseOptions, Supervisor, comfyui_args, health_url

_TRUE = ("1", "true", "yes", "on")


def _warmup_step(app: AppContext, paths: wr.WarmupPaths, conf: str | None, *, parallel: int, background: bool,
                 only: bool) -> int:
    """Warmup before ComfyUI; a failure is reported but only stops us with --warmup-only."""
    try:
        code = run_mode(app, paths, conf, background=background, parallel=parallel)
    except AutoCloudError as exc:
        if only:
            raise
        err_console.print(f"[yellow]warmup skipped:[/yellow] {escape(exc.subject)}: {escape(exc.reason)}",
                          soft_wrap=True)
        return 1
    if code and not only:
        err_console.print("[yellow]warmup incomplete[/yellow]: ComfyUI reads the files it lacks from the volume")
    return code


@click.command("start", context_settings={"ignore_unknown_options": True})
@click.option("--skip-warmup", is_flag=True, help="Start ComfyUI at once [env SKIP_WARMUP=1].")
@click.option("--warmup-only", is_flag=True, help="Warm up, then exit (do not start ComfyUI).")
@click.option("--background-warmup", is_flag=True, help="Start ComfyUI while the copy runs in the background.")
@click.option("--highvram", "vram", flag_value="--highvram", default=None, help="Pass --highvram to ComfyUI.")
@click.option("--lowvram", "vram_low", is_flag=True, help="Pass --lowvram to ComfyUI.")
@click.option("--conf", default=None, metavar="FILE",
              help="Warmup list [env WARMUP_CONFIG; default warmup_models.conf].")
@click.option("--comfyui-path", metavar="DIR", default=None,
              help="ComfyUI checkout [env COMFYUI_PATH; default /workspace/ComfyUI].")
@click.option("--cache-path", metavar="DIR", default=None,
              help="Local fast cache [env CACHE_PATH; default /root/fast_cache].")
@click.option("--parallel", "-p", type=click.IntRange(1, 32), default=4, show_default=True,
              help="Files copied at the same time.")
@click.option("--python", "python_exe", envvar="COMFYUI_PYTHON", default=None, metavar="EXE",
              help="Python that runs ComfyUI [env COMFYUI_PYTHON; default: this Python].")
@click.option("--max-restarts", type=click.IntRange(0, None), default=5, show_default=True,
              help="Restarts in a row before giving up (exit non-zero).")
@click.option("--health-timeout", type=click.FloatRange(0.1, None), default=120.0, show_default=True,
              help="Seconds /system_stats may fail, once it answered, before ComfyUI counts as hung.")
@click.option("--startup-timeout", type=click.FloatRange(0.1, None), default=600.0, show_default=True,
              help="Seconds ComfyUI may take to answer /system_stats the first time.")
@click.option("--health-interval", type=click.FloatRange(0.05, None), default=5.0, show_default=True,
              help="Seconds between health checks.")
@click.option("--backoff", type=click.FloatRange(0.0, None), default=1.0, show_default=True,
              help="First restart delay in seconds; doubles per restart (max 60 s).")
@click.argument("extra", nargs=-1, type=click.UNPROCESSED)
@pass_app
def start_cmd(app: AppContext, skip_warmup: bool, warmup_only: bool, background_warmup: bool, vram: str | None,
              vram_low: bool, conf: str | None, comfyui_path: str | None, cache_path: str | None, parallel: int,
              python_exe: str | None, max_restarts: int, health_timeout: float, startup_timeout: float,
              health_interval: float, backoff: float, extra: tuple[str, ...]) -> None:
    """Warm up, then run ComfyUI's main.py with $COMFYUI_ARGS (default `--listen --disable-metadata`).

    Arguments after `--` go to ComfyUI. ComfyUI is restarted when it crashes or stops answering
    /system_stats; SIGTERM/SIGINT are passed to it and we exit with its code.
    """
    if vram and vram_low:
        raise click.UsageError("--highvram and --lowvram cannot be combined")
    if skip_warmup and warmup_only:
        raise click.UsageError("--skip-warmup and --warmup-only cannot be combined")
    paths = wr.WarmupPaths.from_env(comfyui=comfyui_path, cache=cache_path)
    skip = skip_warmup or os.environ.get("SKIP_WARMUP", "0").strip().lower() in _TRUE
    if warmup_only:
        code = _warmup_step(app, paths, conf, parallel=parallel, background=background_warmup, only=True)
        raise SystemExit(code)
    if skip:
        err_console.print("warmup skipped (--skip-warmup / SKIP_WARMUP)")
    else:
        _warmup_step(app, paths, conf, parallel=parallel, background=background_warmup, only=False)

    main_py = paths.comfyui / "main.py"
    if not main_py.is_file():
        raise click.UsageError(f"{main_py} not found (set COMFYUI_PATH or --comfyui-path)")
    args = comfyui_args(os.environ.get("COMFYUI_ARGS"), vram=vram or ("--lowvram" if vram_low else None),
                        extra=extra)
    cmd = [python_exe or sys.executable, str(main_py), *args]
    opts = SuperviseOptions(max_restarts=max_restarts, health_timeout=health_timeout,
                            startup_timeout=startup_timeout, health_interval=health_interval,
                            backoff_initial=backoff)
    code = Supervisor(cmd, url=health_url(args), options=opts, cwd=Path(paths.comfyui)).run()
    raise SystemExit(code)


if __name__ == "__main__":
    sys.exit(run_standalone(start_cmd))
