"""`autocloud`: the command line. Global options pick the cache; each command lives in its own module."""

from __future__ import annotations

import importlib
import logging
import sys

import click

from comfy_autocloud import __version__
from comfy_autocloud.cli.context import AppContext
from comfy_autocloud.cli.output import err_console, exit_code_of
from comfy_autocloud.config import load_settings

# (module, attribute) of every command; imported when the CLI starts.
COMMANDS: tuple[tuple[str, str], ...] = (
    ("comfy_autocloud.cli.fetch_cmd", "fetch_cmd"),
    ("comfy_autocloud.cli.manifest_cmd", "manifest_cmd"),
    ("comfy_autocloud.cli.store_cmds", "status_cmd"),
    ("comfy_autocloud.cli.store_cmds", "list_cmd"),
    ("comfy_autocloud.cli.store_cmds", "clean_cmd"),
    ("comfy_autocloud.cli.store_cmds", "verify_cmd"),
    ("comfy_autocloud.cli.store_cmds", "pin_cmd"),
    ("comfy_autocloud.cli.store_cmds", "unpin_cmd"),
    ("comfy_autocloud.cli.store_cmds", "evict_cmd"),
    ("comfy_autocloud.cli.store_cmds", "simulate_eviction_cmd"),
    ("comfy_autocloud.cli.warmup_cmd", "warmup_cmd"),
    ("comfy_autocloud.cli.start_cmd", "start_cmd"),
    ("comfy_autocloud.cli.config_cmd", "config_cmd"),
    ("comfy_autocloud.cli.doctor_cmd", "doctor_cmd"),
    ("comfy_autocloud.cli.demo_cmd", "demo_cmd"),
    ("comfy_autocloud.cli.fleet_cmd", "serve_peer_cmd"),
    ("comfy_autocloud.cli.fleet_cmd", "fleet_group"),
    ("comfy_autocloud.cli.predict_cmd", "predict_cmd"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="autocloud")
@click.option("--cache-dir", envvar=None, default=None, metavar="DIR",
              help="Model cache directory [env AUTOCLOUD_CACHE; default ~/.cache/autocloud/models].")
@click.option("--max-size", default=None, metavar="SIZE",
              help="Cache size cap, e.g. 200G [env AUTOCLOUD_MAX_SIZE; default: no cap].")
@click.option("--policy", default=None, type=click.Choice(["default", "lru", "lfuda", "gdsf"]),
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
    _setup_logging(verbose)
    ctx.obj = AppContext(load_settings({"cache_dir": cache_dir, "max_size": max_size, "policy": policy,
                                        "temp_dir": temp_dir, "redis_url": redis_url}))


def _setup_logging(verbose: int) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = RichHandler(console=err_console, show_time=False, show_path=False, markup=False)
    logging.basicConfig(level=level, handlers=[handler], format="%(message)s", force=True)


def _register() -> None:
    for module_name, attr in COMMANDS:
        cli.add_command(getattr(importlib.import_module(module_name), attr))


_register()


def main(argv: list[str] | None = None) -> int:
    return exit_code_of(lambda: cli.main(args=argv, prog_name="autocloud", standalone_mode=False),
                        "partial downloads are kept and resume next time")


if __name__ == "__main__":
    sys.exit(main())
