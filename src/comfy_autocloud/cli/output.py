"""Terminal output shared by every command: rich for people, one JSON object per line for scripts.

`console` and `err_console` are made on first use, so rich is imported only by a run that prints
through them (never by `--help` or `--version`). `say` prints a line through them on a terminal and
as plain text anywhere else, so a command whose output goes to a log or a pipe need not import rich.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from rich.console import Console

    console: Console
    err_console: Console


def __getattr__(name: str) -> Any:
    if name not in ("console", "err_console"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from rich.console import Console

    made = globals()
    made.setdefault("console", Console(stderr=False, highlight=False))
    made.setdefault("err_console", Console(stderr=True, highlight=False))
    return made[name]


# A piece of a line: plain text, or (text, rich style) for a piece a terminal shows in colour.
Part = Union[str, "tuple[str, str]"]


def styled(stream: IO[str]) -> bool:
    """Would rich treat `stream` as a terminal (colours, live bars, wrapping to its width)? Decided by rich's
    own rules (TTY_COMPATIBLE, FORCE_COLOR, then isatty) without importing rich (50-100 ms)."""
    compatible = os.environ.get("TTY_COMPATIBLE", "")
    if compatible in ("0", "1"):
        return compatible == "1"
    force = os.environ.get("FORCE_COLOR")
    if force is not None:
        return force != ""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def say(*parts: Part, err: bool = False, soft_wrap: bool = False) -> None:
    """Print one line for people: on a terminal through rich (styles; wrapped to the width unless
    `soft_wrap`), elsewhere as plain text, unwrapped, without rich: what rich prints there, minus the
    wrapping at 80 columns (a log line stays one line)."""
    stream = sys.stderr if err else sys.stdout
    if styled(stream):
        from rich.text import Text

        __getattr__("err_console" if err else "console").print(Text.assemble(*parts), soft_wrap=soft_wrap)
        return
    stream.write("".join(p if isinstance(p, str) else p[0] for p in parts) + "\n")
    stream.flush()


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str, sort_keys=False) + "\n")
    sys.stdout.flush()


def exit_code_of(run: Callable[[], Any], interrupted: str) -> int:
    """Run a click command in non-standalone mode: its return value or the code it exits with, or the exit
    code and one line on stderr for Ctrl-C (130, `interrupted` says what was kept), a usage error, or an
    AutoCloudError (1)."""
    import click

    from comfy_autocloud.errors import AutoCloudError

    try:
        rv = run()
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        __getattr__("err_console").print(f"[red]interrupted[/red] ({interrupted})")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except AutoCloudError as exc:
        __getattr__("err_console").print(f"[red]error:[/red] {exc.subject}: {exc.reason}", markup=True,
                                         soft_wrap=True)
        return 1
    except SystemExit as exc:  # a command's own exit code (`fetch` when a file failed): the caller ends the process
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return rv if isinstance(rv, int) else 0
