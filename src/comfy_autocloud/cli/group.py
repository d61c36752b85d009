"""The `autocloud` click group: global options, and the table of commands, each imported when it runs.

Start-up is part of every command's run time, so a command imports only its own module: the group
lists commands from the table below (name, module, attribute, summary) and imports one when it runs.
`autocloud --help` and `--version` import neither aiohttp, pydantic nor rich.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass

import click

from comfy_autocloud import __version__
from comfy_autocloud.config import POLICIES


@dataclass(frozen=True)
class CommandRef:
    """Where a command lives and the summary `autocloud --help` shows (its help's first paragraph)."""

    module: str
    attr: str
    summary: str

    def short_help(self, limit: int) -> str:
        """The summary cut to `limit` the way click cuts a command's help for the listing."""
        return click.Command(None, help=self.summary).get_short_help_str(limit)


_CLI = "comfy_autocloud.cli."
COMMANDS: dict[str, CommandRef] = {
    "clean": CommandRef(_CLI + "store_cmds", "clean_cmd",
                        "Remove cold files: unused for --keep-days, then least valuable until under --max-size."),
    "config": CommandRef(_CLI + "config_cmd", "config_cmd",
                         "Show the effective settings and where each value came from."),
    "demo": CommandRef(_CLI + "demo_cmd", "demo_cmd",
                       "Offline demo: local origin -> fetch -> store -> warm cache hits -> eviction -> status."),
    "doctor": CommandRef(_CLI + "doctor_cmd", "doctor_cmd",
                         "Check ComfyUI, its model folders, the cache, the manifest, the fleet, tokens and proxies."),
    "evict": CommandRef(_CLI + "store_cmds", "evict_cmd", "Delete these files from the cache now."),
    "fetch": CommandRef(_CLI + "fetch_cmd", "fetch_cmd",
                        "Download model files into the cache (verified, resumable, once per key)."),
    "fleet": CommandRef(_CLI + "fleet_cmd", "fleet_group", "Inspect the fleet (nodes, who holds a file, leases)."),
    "list": CommandRef(_CLI + "store_cmds", "list_cmd", "Every cached file with size, hits, last use, pinned/in-use."),
    "manifest": CommandRef(_CLI + "manifest_cmd", "manifest_cmd",
                           "Model lists: JSON lists, split lists, warmup_models.conf, preload_config.json, workflows."),
    "pin": CommandRef(_CLI + "store_cmds", "pin_cmd",
                      "Never evict these files (keys like checkpoints/model.safetensors)."),
    "predict": CommandRef(_CLI + "predict_cmd", "predict_cmd",
                          "Score the predictor and disk prefetch on a trace (--evaluate), or show this node's likely "
                          "next models."),
    "serve-peer": CommandRef(_CLI + "fleet_cmd", "serve_peer_cmd",
                             "Serve this node's verified model files to the other nodes of the fleet (and announce "
                             "them in Redis)."),
    "simulate-eviction": CommandRef(_CLI + "store_cmds", "simulate_eviction_cmd",
                                    "Replay an access trace through the store's eviction code and report hit ratios."),
    "start": CommandRef(_CLI + "start_cmd", "start_cmd",
                        "Warm up, then run ComfyUI's main.py with $COMFYUI_ARGS (default `--listen "
                        "--disable-metadata`)."),
    "status": CommandRef(_CLI + "store_cmds", "status_cmd",
                         "Where the cache is, how full it is, and what takes the space."),
    "unpin": CommandRef(_CLI + "store_cmds", "unpin_cmd", "Let eviction consider these files again."),
    "verify": CommandRef(_CLI + "store_cmds", "verify_cmd", "Reconcile files and index; exit 1 if problems remain."),
    "warmup": CommandRef(_CLI + "warmup_cmd", "warmup_cmd",
                         "Copy the models in CONF (default $WARMUP_CONFIG or warmup_models.conf) from the volume to "
                         "the fast cache."),
}


class LazyGroup(click.Group):
    """A group whose commands are imported when they run, not when the program starts."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        ref = COMMANDS.get(cmd_name)
        if ref is None:
            return super().get_command(ctx, cmd_name)
        return getattr(importlib.import_module(ref.module), ref.attr)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands section of --help from the table (the same text click derives from each help)."""
        names = self.list_commands(ctx)
        if not names:
            return
        limit = formatter.width - 6 - max(len(n) for n in names)
        rows = []
        for name in names:
            ref = COMMANDS.get(name)
            if ref is not None:
                rows.append((name, ref.short_help(limit)))
            else:
                rows.append((name, self.commands[name].get_short_help_str(limit)))
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="autocloud")
@click.option("--cache-dir", envvar=None, default=None, metavar="DIR",
              help="Model cache directory [env AUTOCLOUD_CACHE; default ~/.cache/autocloud/models].")
@click.option("--max-size", default=None, metavar="SIZE",
              help="Cache size cap, e.g. 200G [env AUTOCLOUD_MAX_SIZE; default: no cap].")
@click.option("--policy", default=None, type=click.Choice(POLICIES),
              help="Eviction policy [env AUTOCLOUD_POLICY; default: size/frequency aware].")
@click.option("--temp-dir", default=None, metavar="DIR",
              help="Partial downloads on this RAM disk (tmpfs); the cache disk when it lacks room "
                   "[env AUTOCLOUD_TEMP_DIR].")
@click.option("--redis-url", default=None, metavar="URL",
              help="Join the fleet in this Redis: peers first, one origin download per file [env AUTOCLOUD_REDIS_URL].")
@click.option("-v", "--verbose", count=True, help="More log output (-v: info, -vv: debug).")
@click.pass_context
def cli(ctx: click.Context, cache_dir: str | None, max_size: str | None, policy: str | None, temp_dir: str | None,
        redis_url: str | None, verbose: int) -> None:
    """Fetch, verify, cache and evict model files for ComfyUI on cloud GPUs."""
    from comfy_autocloud.cli.context import AppContext
    from comfy_autocloud.config import load_settings

    _setup_logging(verbose)
    ctx.obj = AppContext(load_settings({"cache_dir": cache_dir, "max_size": max_size, "policy": policy,
                                        "temp_dir": temp_dir, "redis_url": redis_url}))
    ctx.call_on_close(ctx.obj.close)


class _DeferredRichHandler(logging.Handler):
    """Log records rendered by rich's handler, which is imported at the first record (most runs log none)."""

    def __init__(self) -> None:
        super().__init__()
        self._rich: logging.Handler | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self._rich is None:
            from rich.logging import RichHandler

            from comfy_autocloud.cli.output import err_console

            self._rich = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
            self._rich.setFormatter(self.formatter)
        self._rich.handle(record)


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, handlers=[_DeferredRichHandler()], format="%(message)s", force=True)
