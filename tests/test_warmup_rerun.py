"""`autocloud warmup` reruns answered before click is imported (cli/warmup_rerun.py).

The fast path reads the plain command lines exactly as the click command does (checked against click's
own parser), leaves every other form to the command, prints what the command prints, and never decides
anything the command would decide differently: a memo that proves nothing, an error, a terminal.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click
import pytest

from comfy_autocloud.cli import warmup_rerun
from comfy_autocloud.cli.main import main
from comfy_autocloud.cli.warmup_cmd import warmup_cmd
from comfy_autocloud.cli.warmup_rerun import FLAGS, PARALLEL_RANGE, VALUED, parse
from comfy_autocloud.store.durability import DURABILITIES
from comfy_autocloud.warmup import run as run_module
from comfy_autocloud.warmup.run import HASHINGS
from test_warmup import Env
from test_warmup_memo import KEYS, _proven, run_script, two_models

PLAIN = [
    [],
    ["my.conf"],
    ["my.conf", "--json"],
    ["--json", "my.conf", "--no-setup", "--no-page-cache"],
    ["-p", "8"], ["-p8"], ["--parallel=32"], ["--parallel", "1", "c"], ["--parallel", "04"],
    ["--comfyui-path", "/v/ComfyUI", "--cache-path=/nvme/cache"],
    ["--comfyui-path", "--json"],  # an option's value may look like an option, for click too
    ["--durability", "durable", "--hash", "now"], ["--durability=ephemeral", "--hash=later"],
    ["--json", "--json"],
]
LEFT_TO_THE_COMMAND = [
    ["--help"], ["-h"], ["--status"], ["--clean"], ["--list"], ["--setup-only"], ["--background"],
    ["--record-pid"], ["--verbose"], ["a.conf", "b.conf"], ["--"], ["-"], [""],
    ["--parallel", "0"], ["--parallel", "33"], ["--parallel", "x"], ["--parallel"], ["-p=8"], ["-p", "-1"],
    ["--parallel", "+4"], ["--parallel", "4", "--parallel", "5"], ["--durability", "fast"], ["--hash", "never"],
    ["--json=1"], ["--no-setup=yes"], ["--cache-path", ""], ["--unknown"],
]
@pytest.fixture
def menv(tmp_path: Path) -> Env:
    return two_models(tmp_path)


COMMAND_ONLY_OPTIONS = {"--status", "--clean", "--list", "--setup-only", "--background", "--record-pid", "--help"}


@pytest.mark.parametrize("args", PLAIN, ids=lambda a: " ".join(a) or "(none)")
def test_the_plain_forms_are_read_as_the_click_command_reads_them(args: list[str]) -> None:
    parsed = parse(args)
    assert parsed is not None
    params = warmup_cmd.make_context("warmup", list(args), obj=object()).params
    assert (parsed.conf, parsed.as_json, parsed.no_setup, parsed.no_page_cache, int(parsed.parallel),
            parsed.comfyui_path, parsed.cache_path, parsed.durability, parsed.hashing) == (
        params["conf"], params["as_json"], params["no_setup"], params["no_page_cache"], params["parallel"],
        params["comfyui_path"], params["cache_path"], params["durability"], params["hashing"])
    assert not any(params[m] for m in ("do_status", "do_clean", "do_list", "setup_only", "background"))


@pytest.mark.parametrize("args", LEFT_TO_THE_COMMAND, ids=lambda a: " ".join(a) or "(empty)")
def test_every_other_form_is_left_to_the_command(args: list[str]) -> None:
    assert parse(args) is None


def test_every_option_of_the_command_is_either_read_here_or_left_to_it() -> None:
    """A new warmup option must be classified: read by the fast path (with the same type) or left to the
    command; otherwise a rerun given it would quietly drop it."""
    here = {**dict.fromkeys(FLAGS, "flag"), **dict.fromkeys(VALUED, "value")}
    for param in warmup_cmd.params:
        if not isinstance(param, click.Option):
            assert param.name == "conf"
            continue
        for opt in param.opts:
            assert opt in here or opt in COMMAND_ONLY_OPTIONS, f"{opt} of `autocloud warmup` is not classified"
            if opt in here:
                assert (here[opt] == "flag") == param.is_flag, opt
        if param.name == "parallel":
            assert (param.type.min, param.type.max) == PARALLEL_RANGE
        if param.name == "durability":
            assert tuple(param.type.choices) == DURABILITIES
        if param.name == "hashing":
            assert tuple(param.type.choices) == HASHINGS
    assert set(here) <= {o for p in warmup_cmd.params for o in getattr(p, "opts", [])}


def _run(menv: Env, via: str, *args: str) -> tuple[int, str, set[str]]:
    """`autocloud warmup ARGS` as its script runs it, through the entry point (`main`) or straight through the
    click group (`click`); (exit code, stdout, top-level modules imported)."""
    call = ("m.main()" if via == "main" else
            "from comfy_autocloud.cli.output import exit_code_of\n"
            "from comfy_autocloud.cli.group import cli\n"
            "m.end_process(exit_code_of(lambda: cli.main(prog_name='autocloud', standalone_mode=False), ''))")
    proc, modules = run_script(menv, "warmup", *args, call=call)
    return proc.returncode, proc.stdout, modules


def _until_proven(menv: Env) -> None:
    """The last rerun's detached process has recorded its accesses and written the memo again."""
    deadline = time.monotonic() + 30
    while _proven(menv) != KEYS:
        assert time.monotonic() < deadline, "the memo was not written again"
        time.sleep(0.05)
    time.sleep(0.2)


def _same(text: str) -> str:
    """Output with what differs between two runs of the same rerun blanked: its seconds, and how much of the
    page cache is still being read in the background."""
    text = re.sub(r'"seconds": [0-9.e-]+', '"seconds": S', text)
    text = re.sub(r'"page_cache_(background_)?bytes": \d+', '"page_cache": B', text)
    text = re.sub(r"in [0-9.]+ s", "in S s", text)
    return re.sub(r"page cache warmed: .*", "page cache warmed: B", text)


@pytest.mark.parametrize("fmt", [["--json"], []], ids=["json", "text"])
def test_a_proven_rerun_prints_what_the_command_prints_without_importing_click(menv: Env, fmt: list[str]) -> None:
    args = [str(menv.conf), *fmt, "--hash", "now"]
    rc, _, modules = _run(menv, "main", *args)
    assert rc == 0 and "click" in modules  # the first run copies: the command
    _until_proven(menv)
    rc_fast, fast, modules = _run(menv, "main", *args)
    assert rc_fast == 0 and not modules & {"click", "sqlite3", "logging"}, sorted(modules)
    _until_proven(menv)
    rc_click, slow, modules = _run(menv, "click", *args)
    assert rc_click == 0 and "click" in modules
    assert _same(fast) == _same(slow)
    assert ('"status": "cached"' if fmt else "already in the cache") in fast


def test_a_memo_that_proves_nothing_is_left_to_the_command(menv: Env) -> None:
    rc, _, _ = _run(menv, "main", str(menv.conf), "--json", "--hash", "now")
    assert rc == 0
    _until_proven(menv)
    menv.model("checkpoints/a.safetensors", 3 * 2**20, 9)  # the volume file changed
    rc, out, modules = _run(menv, "main", str(menv.conf), "--json", "--hash", "now")
    statuses = [json.loads(x).get("status") for x in out.splitlines() if x.startswith('{"key"')]
    assert rc == 0 and statuses == ["recopied", "cached"] and "click" in modules


def test_errors_are_reported_by_the_command(menv: Env, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    for k, v in menv.env.items():
        monkeypatch.setenv(k, v)
    missing = menv.tmp / "nowhere.conf"
    assert warmup_rerun.rerun_before_click([str(missing)]) is None
    assert main(["warmup", str(missing)]) == 1
    assert str(missing) in capsys.readouterr().err
    monkeypatch.setenv("AUTOCLOUD_WARMUP_DURABILITY", "sometimes")  # a bad setting: the command names it
    assert warmup_rerun.rerun_before_click([str(menv.conf)]) is None
    assert main(["warmup", str(menv.conf)]) != 0
    assert "AUTOCLOUD_WARMUP_DURABILITY" in capsys.readouterr().err


def test_a_terminal_gets_the_command_and_its_progress_bars(menv: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in menv.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich's rule for "this is a terminal"
    consulted: list[object] = []
    monkeypatch.setattr(run_module, "rerun_from_memo", lambda *a, **k: consulted.append(a))
    assert warmup_rerun.rerun_before_click([str(menv.conf)]) is None and consulted == []
    monkeypatch.setenv("TTY_COMPATIBLE", "0")
    assert warmup_rerun.rerun_before_click([str(menv.conf)]) is None and len(consulted) == 1  # (proves nothing)
