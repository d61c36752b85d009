"""`autocloud warmup` answered before click is imported, when its memo proves there is nothing to copy.

Every pod restart runs the same warmup again, and a rerun is mostly start-up: importing click costs
60-90 ms of a 0.2 s rerun from a cold page cache (measured: `python -c "import click"` 0.10-0.14 s
against `python -c pass` 0.04-0.05 s). So `autocloud warmup` first reads its command line here, for
the plain forms a pod's start script uses: an optional CONF, `--json`, `--no-setup`, `--no-page-cache`,
`--parallel/-p N`, `--comfyui-path`, `--cache-path`, `--durability`, `--hash`. When the rerun memo
(warmup/memo.py) proves every file current, the rerun is done here and prints what the click command
prints (cli/warmup_copy.py). Anything else returns None and the click command runs as always: another
option, `--help`, a value the command would refuse, a terminal (it gets progress bars), a memo that
proves nothing, any error (the command reports it in its own words).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

PARALLEL_RANGE = (1, 32)  # `--parallel`'s bounds, here and in the click command
FLAGS = {"--json": "as_json", "--no-setup": "no_setup", "--no-page-cache": "no_page_cache"}
VALUED = {"--parallel": "parallel", "-p": "parallel", "--comfyui-path": "comfyui_path", "--cache-path": "cache_path",
          "--durability": "durability", "--hash": "hashing"}


@dataclass
class RerunArgs:
    """The command line of a plain warmup (what `warmup_cmd` would receive)."""

    conf: str | None = None
    as_json: bool = False
    no_setup: bool = False
    no_page_cache: bool = False
    parallel: str = "4"
    comfyui_path: str | None = None
    cache_path: str | None = None
    durability: str | None = None
    hashing: str | None = None


def parse(args: list[str]) -> RerunArgs | None:
    """`args` (after `warmup`) as the click command would read them, or None for anything outside the plain
    forms or that the command would refuse (it then says why)."""
    parsed = RerunArgs()
    seen: set[str] = set()
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if not arg.startswith("-") and arg:
            if parsed.conf is not None:
                return None  # click: "Got unexpected extra argument"
            parsed.conf = arg
            continue
        name, eq, value = arg.partition("=") if arg.startswith("--") else (arg, "", "")
        if name in FLAGS and not eq:
            setattr(parsed, FLAGS[name], True)
            continue
        if name not in VALUED and arg.startswith("-p") and len(arg) > 2 and not arg.startswith("--"):
            name, eq, value = "-p", "=", arg[2:]  # -p8
        if name not in VALUED:
            return None
        if not eq:
            if i == len(args):
                return None
            value = args[i]
            i += 1
        field = VALUED[name]
        if field in seen or not value:
            return None  # given twice, or empty: the command decides
        seen.add(field)
        setattr(parsed, field, value)
    return parsed if _valid(parsed) else None


def _valid(parsed: RerunArgs) -> bool:
    from comfy_autocloud.store.durability import DURABILITIES
    from comfy_autocloud.warmup.run import HASHINGS

    if not parsed.parallel.isdigit() or not PARALLEL_RANGE[0] <= int(parsed.parallel) <= PARALLEL_RANGE[1]:
        return False
    return parsed.durability in (None, *DURABILITIES) and parsed.hashing in (None, *HASHINGS)


def rerun_before_click(args: list[str]) -> int | None:
    """The exit code of `autocloud warmup ARGS` when it was a rerun with nothing to copy, done here; None
    when the click command has to run it."""
    parsed = parse(args)
    if parsed is None:
        return None
    from comfy_autocloud.cli.output import styled

    if styled(sys.stderr if parsed.as_json else sys.stdout):
        return None  # progress bars for people: rich is imported anyway
    from comfy_autocloud.cli.warmup_copy import open_store, show_report
    from comfy_autocloud.config import load_settings
    from comfy_autocloud.errors import AutoCloudError
    from comfy_autocloud.warmup import run as wr

    try:
        settings = load_settings({})
        wr.durability_from(parsed.durability)  # a bad AUTOCLOUD_WARMUP_* value: the command says so
        wr.hashing_from(parsed.hashing)
        paths = wr.WarmupPaths.from_env(comfyui=parsed.comfyui_path, cache=parsed.cache_path)
        plan = wr.load_plan(wr.resolve_conf(parsed.conf, paths), paths)
        if not parsed.no_setup and not paths.comfyui.is_dir():
            return None  # the command reports the missing ComfyUI
        report = wr.rerun_from_memo(plan, paths, lambda: open_store(settings, paths),
                                    warm_page_cache=not parsed.no_page_cache)
        if report is None:
            return None
        report.setup = None if parsed.no_setup else wr.setup_extra_paths(paths, plan)
    except (AutoCloudError, OSError):
        return None  # nothing was changed that the command would not change too; it reports the error
    return show_report(report, paths, parsed.as_json)
