"""Terminal output shared by every command: rich for people, one JSON object per line for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


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
        err_console.print(f"[red]interrupted[/red] ({interrupted})")
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except AutoCloudError as exc:
        err_console.print(f"[red]error:[/red] {exc.subject}: {exc.reason}", markup=True, soft_wrap=True)
        return 1
    return rv if isinstance(rv, int) else 0
