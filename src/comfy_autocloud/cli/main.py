"""`autocloud`: the command line's entry point (the console script and `python -m comfy_autocloud.cli.main`).

The commands are the click group in cli/group.py. One form is answered before click is imported (60-90 ms
of start-up, measured): a `warmup` rerun whose memo proves there is nothing to copy (cli/warmup_rerun.py),
what every pod restart runs.
"""

from __future__ import annotations

import sys

from comfy_autocloud.cli.output import exit_code_of


def main(argv: list[str] | None = None) -> int:
    """Run one command; `argv` None means this process's own command line (the `autocloud` script), and
    the process then ends as soon as the command is over (`end_process`)."""
    args = sys.argv[1:] if argv is None else argv
    rc = None
    if args[:1] == ["warmup"]:
        from comfy_autocloud.cli.warmup_rerun import rerun_before_click

        rc = rerun_before_click(args[1:])
    if rc is None:
        from comfy_autocloud.cli.group import cli

        rc = exit_code_of(lambda: cli.main(args=argv, prog_name="autocloud", standalone_mode=False),
                          "partial downloads are kept and resume next time")
    if argv is None:
        end_process(rc)
    return rc


def end_process(rc: int) -> None:
    """End the process now, without tearing the interpreter down (0.15-0.5 s after a fetch, measured:
    finalizing some 500 modules and collecting their objects, which the kernel frees at once anyway).

    Only when nothing is left to finish: the command has closed what it opened (the index, fleet
    connections: `AppContext.close`), no other non-daemon thread runs, and the exit handlers (logging,
    temporary directories) have run; stdout and stderr are flushed. Otherwise returns (a normal exit).
    """
    import atexit
    import os
    import threading

    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
        return
    atexit._run_exitfuncs()  # what a normal exit runs before finalizing, in the same order
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: let the normal exit report it
        return
    os._exit(rc)


if __name__ == "__main__":
    sys.exit(main())
