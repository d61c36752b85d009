"""Terminal output shared by every command: rich for people, one JSON object per line for scripts.

`console` and `err_console` are made on first use, so rich is imported only by a run that prints
through them (never by `--help` or `--version`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

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


def emit_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, default=str, sort_keys=False) + "\n")
    sys.stdout.flush()


def exit_code_of(run: Callable[[], Any], interrupted: str) -> int:
    """Run a click command in non-standalone mode: its return value, or the exit code and one line on
    stderr for Ctrl-C (130, `interrupted` says what was kept), a usage error, or an AutoCloudError (1)."""
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
    return rv if isinstance(rv, int) else 0
