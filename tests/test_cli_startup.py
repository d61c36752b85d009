"""`autocloud` start-up: a command imports only what it uses (the measured part is in bench/startup.py).

Each check runs the command in a fresh interpreter and lists the modules it imported, which is
deterministic where a time limit is not.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import subprocess
import sys
import time
import types
from pathlib import Path

import click
import pytest

from comfy_autocloud.cli.group import COMMANDS, cli
from comfy_autocloud.lazy import lazy_names
from servers import NginxOrigin, safetensors_of

HEAVY = ("aiohttp", "pydantic", "rich")
SRC = str(Path(__file__).resolve().parents[1] / "src")


def _imported_by(args: list[str], tmp_path: Path) -> tuple[int, set[str]]:
    """Run `autocloud ARGS` in a new interpreter; its exit code and the top-level packages it imported."""
    rc, modules, _ = _run(args, tmp_path)
    return rc, modules


def _run(args: list[str], tmp_path: Path, env: dict[str, str] | None = None) -> tuple[int, set[str], str]:
    """`_imported_by`, and what the command printed on stdout (`env`: more environment variables)."""
    rc, modules, out, _ = _run_with_stderr(args, tmp_path, env)
    return rc, modules, out


def _run_with_stderr(args: list[str], tmp_path: Path,
                     env: dict[str, str] | None = None) -> tuple[int, set[str], str, str]:
    """`_run`, and what the command printed on stderr (without the module list)."""
    code = ("import json, sys\n"
            "from comfy_autocloud.cli.main import main\n"
            f"rc = main({args!r})\n"
            "sys.stdout.flush()\n"
            "sys.stderr.write('\\nMODULES ' + json.dumps(sorted({m.partition('.')[0] for m in sys.modules})))\n"
            "sys.exit(rc)\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": SRC,
           "AUTOCLOUD_CACHE": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "config"), **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    err, _, line = proc.stderr.rpartition("MODULES ")
    return proc.returncode, set(json.loads(line)), proc.stdout, err


@pytest.mark.parametrize("args", [["--help"], ["--version"]])
def test_help_and_version_import_no_aiohttp_pydantic_or_rich(args: list[str], tmp_path: Path) -> None:
    rc, modules = _imported_by(args, tmp_path)
    assert rc == 0
    assert not modules & set(HEAVY), f"autocloud {' '.join(args)} imported {sorted(modules & set(HEAVY))}"


@pytest.mark.parametrize("args", [["status", "--json"], ["list", "--json"]])
def test_cache_commands_with_json_import_no_aiohttp_pydantic_or_rich(args: list[str], tmp_path: Path) -> None:
    rc, modules = _imported_by(args, tmp_path)
    assert rc == 0
    assert not modules & set(HEAVY), f"autocloud {' '.join(args)} imported {sorted(modules & set(HEAVY))}"


def test_fetch_of_a_cached_file_imports_no_aiohttp_pydantic_or_rich(tmp_path: Path) -> None:
    model = tmp_path / "origin" / "tiny.safetensors"
    model.parent.mkdir()
    model.write_bytes(safetensors_of(b"\0", 4096))  # the store checks a model file's format on commit
    args = ["fetch", model.as_uri(), "--folder", "checkpoints", "--json"]
    rc, first, out = _run(args, tmp_path)
    assert rc == 0 and json.loads(out)["cached"] is False
    assert not first & set(HEAVY), f"a copied fetch imported {sorted(first & set(HEAVY))}"  # a ModelSpec is no pydantic
    rc, modules, out = _run(args, tmp_path)
    assert rc == 0 and json.loads(out)["cached"] is True
    assert not modules & set(HEAVY), f"a cached fetch imported {sorted(modules & set(HEAVY))}"


def test_fetch_of_a_url_imports_no_pydantic(tmp_path: Path, nginx_origin: NginxOrigin) -> None:
    """The download path builds its spec, probes, downloads, verifies and commits without pydantic (its
    import and schemas cost 0.2-0.35 s of a fetch measured from a cold page cache)."""
    data = safetensors_of(b"\1", 64 * 1024)
    (nginx_origin.data_dir / "startup-url.safetensors").write_bytes(data)
    args = ["fetch", nginx_origin.url("startup-url.safetensors"), "--folder", "checkpoints",
            "--sha256", hashlib.sha256(data).hexdigest(), "--json"]
    rc, modules, out = _run(args, tmp_path)
    got = json.loads(out)
    assert rc == 0 and got["cached"] is False and got["sha256"] == hashlib.sha256(data).hexdigest()
    assert "aiohttp" in modules  # it did download over HTTP
    assert "pydantic" not in modules
    rc, modules, out = _run(args, tmp_path)  # now a hit: the download path is not even imported
    assert rc == 0 and json.loads(out)["cached"] is True
    assert not modules & set(HEAVY), f"a cached fetch of a URL imported {sorted(modules & set(HEAVY))}"


@pytest.mark.parametrize("urls, manifests, at_final_path, expected", [
    (("https://h/m.safetensors",), (), False, True),
    (("https://h/m.safetensors",), (), True, False),  # most likely a hit: the index decides later
    (("https://h/m.safetensors", "https://h/n.safetensors"), (), True, True),
    (("file:///v/m.safetensors", "/v/n.safetensors"), (), False, False),  # copies, never downloads
    ((), (Path("models.json"),), True, True),  # a manifest may name anything
])
def test_fetch_starts_importing_the_download_path_only_when_it_may_download(
        tmp_path: Path, urls: tuple[str, ...], manifests: tuple[Path, ...], at_final_path: bool,
        expected: bool) -> None:
    from comfy_autocloud.cli.fetch_cmd import may_download

    if at_final_path:
        (tmp_path / "checkpoints").mkdir()
        (tmp_path / "checkpoints" / "m.safetensors").write_bytes(b"x")
    assert may_download(tmp_path, urls, manifests, "checkpoints", None) is expected


@pytest.mark.parametrize("flags, reason", [
    (["--folder", "check/points"], "folder 'check/points' must be a single name such as 'checkpoints'"),
    (["--folder", "checkpoints", "--name", "../x.safetensors"],
     "filename '../x.safetensors' has an empty, '.' or '..' component"),
    (["--folder", "checkpoints", "--sha256", "12ab"], "sha256 '12ab' is not 64 hex digits"),
    (["--folder", "a/b", "--name", "/x", "--sha256", "z"],  # every bad value at once
     "folder 'a/b' must be a single name such as 'checkpoints'; filename '/x' is absolute; it must be relative "
     "to the models folder; sha256 'z' is not 64 hex digits"),
])
def test_fetch_of_a_url_with_a_bad_option_names_it(tmp_path: Path, flags: list[str], reason: str) -> None:
    """A bad --folder/--name/--sha256 is refused before anything is downloaded, naming the URL and the value."""
    url = "https://models.example.com/m.safetensors?token=s3cr3t"
    rc, modules, out, err = _run_with_stderr(["fetch", url, *flags, "--json"], tmp_path)
    assert rc != 0 and out == ""
    assert "command line https://models.example.com/m.safetensors?token=***" in err and reason in err, err
    assert "s3cr3t" not in err
    assert "pydantic" not in modules
    assert not (tmp_path / "cache" / "checkpoints").exists()


def test_a_warmup_rerun_printing_to_a_log_imports_neither_rich_nor_yaml(tmp_path: Path) -> None:
    """A rerun with nothing to copy (`autocloud warmup` before every ComfyUI start) writes plain lines where
    its output is not a terminal, and finds the yaml as it left it by comparing bytes: neither rich nor the
    yaml library is imported (together ~100 ms of a 0.2 s target). On a terminal rich still draws."""
    volume = tmp_path / "volume" / "ComfyUI"
    (volume / "models" / "checkpoints").mkdir(parents=True)
    for name in ("a.safetensors", "b.safetensors"):
        (volume / "models" / "checkpoints" / name).write_bytes(safetensors_of(b"\1", 8192))
    conf = tmp_path / "warmup_models.conf"
    conf.write_text("checkpoints/*.safetensors\n")
    env = {"COMFYUI_PATH": str(volume), "CACHE_PATH": str(tmp_path / "fast"), "AUTOCLOUD_CONFIG": str(tmp_path / "no")}
    rc, first, out = _run(["warmup", str(conf)], tmp_path, env)
    assert rc == 0 and "2 copied" in out and "yaml" in first  # the first run writes the yaml
    rc, modules, out = _run(["warmup", str(conf)], tmp_path, env)
    assert rc == 0
    assert not modules & {"rich", "yaml", "aiohttp", "pydantic"}, sorted(modules & {"rich", "yaml"})
    lines = out.splitlines()
    assert lines[:2] == ["= checkpoints/a.safetensors  8.0 KiB  already in the cache",
                         "= checkpoints/b.safetensors  8.0 KiB  already in the cache"]
    assert lines[2].startswith("warmup: 2 files (2 cached), 0 B copied in ")
    assert lines[3] == f"✓ {volume / 'extra_model_paths.yaml'} already lists {tmp_path / 'fast'} first"
    assert len(lines) == 4  # and nothing wrapped at 80 columns, as rich did for a log
    rc, modules, out = _run(["warmup", str(conf)], tmp_path, {**env, "FORCE_COLOR": "1"})  # rich: "a terminal"
    assert rc == 0 and "rich" in modules and "\x1b[32m=\x1b[0m checkpoints/a.safetensors" in out


def _script(tmp_path: Path, args: list[str], before: str) -> subprocess.CompletedProcess[str]:
    """`autocloud ARGS` as the script runs it (`main()` on the process's own argv), after `before`."""
    code = (f"import sys\n{before}\n"
            f"sys.argv = ['autocloud', *{args!r}]\n"
            "from comfy_autocloud.cli.main import main\n"
            "sys.exit(main())\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": SRC,
           "AUTOCLOUD_CACHE": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)


# A module-level object whose finalizer speaks: interpreter teardown runs it, an immediate end does not.
_FINALIZED = ("class Speaks:\n"
              "    def __del__(self):\n"
              "        sys.stdout.write('finalized\\n'); sys.stdout.flush()\n"
              "speaks = Speaks()\n"
              "import atexit; atexit.register(lambda: print('exit handler ran', flush=True))\n")


def test_the_script_ends_at_once_after_closing_what_the_fetch_opened(tmp_path: Path) -> None:
    """No interpreter teardown after the command (0.15-0.5 s measured after a fetch), yet the exit
    handlers ran, the output is complete and the index was closed (committed, its WAL folded in)."""
    from comfy_autocloud.store import Store

    model = tmp_path / "origin" / "tiny.safetensors"
    model.parent.mkdir()
    model.write_bytes(safetensors_of(b"\0", 4096))
    proc = _script(tmp_path, ["fetch", model.as_uri(), "--folder", "checkpoints", "--json"], _FINALIZED)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert json.loads(lines[0])["key"] == "checkpoints/tiny.safetensors"
    assert lines[1:] == ["exit handler ran"]  # and no "finalized": the interpreter was not torn down
    assert not (tmp_path / "cache" / ".autocloud" / "index.sqlite-wal").exists()
    with Store(tmp_path / "cache") as store:
        entry = store.lookup("checkpoints/tiny.safetensors")
        assert entry is not None and entry.size == 4096


def test_a_failed_fetch_ends_at_once_too_with_its_exit_code(tmp_path: Path) -> None:
    """A fetch where a file failed exits 1 through the same quick end (it used to tear the interpreter down)."""
    missing = tmp_path / "origin" / "gone.safetensors"
    proc = _script(tmp_path, ["fetch", missing.as_uri(), "--folder", "checkpoints", "--json"], _FINALIZED)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stdout.splitlines()
    assert "error" in json.loads(lines[0]) and "gone.safetensors" in lines[0]
    assert lines[1:] == ["exit handler ran"]  # and no "finalized"


def test_the_warmup_module_runpod_runs_ends_at_once(tmp_path: Path) -> None:
    """`python -m comfy_autocloud.cli.warmup_cmd` (runpod/warmup.sh) ends like `autocloud warmup`: exit handlers
    run, every write is committed, no interpreter teardown."""
    from comfy_autocloud.store import Store

    volume = tmp_path / "volume" / "ComfyUI"
    (volume / "models" / "checkpoints").mkdir(parents=True)
    (volume / "models" / "checkpoints" / "a.safetensors").write_bytes(safetensors_of(b"\1", 8192))
    conf = tmp_path / "warmup_models.conf"
    conf.write_text("checkpoints/a.safetensors\n")
    code = (f"import sys, runpy\n{_FINALIZED}\n"
            f"sys.argv = ['warmup_cmd', {str(conf)!r}, '--json']\n"
            "runpy.run_module('comfy_autocloud.cli.warmup_cmd', run_name='__main__')\n")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PYTHONPATH": SRC, "COMFYUI_PATH": str(volume),
           "CACHE_PATH": str(tmp_path / "fast"), "AUTOCLOUD_CONFIG": str(tmp_path / "no"),
           "AUTOCLOUD_CACHE": str(tmp_path / "cache"), "XDG_CONFIG_HOME": str(tmp_path / "config")}
    def hits() -> int:
        with Store(tmp_path / "fast") as store:
            entry = store.lookup("checkpoints/a.safetensors")
            assert entry is not None
            return entry.hits

    before = 0
    for status in ("copied", "cached"):
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
        lines = proc.stdout.splitlines()
        assert json.loads(lines[0])["status"] == status and "summary" in json.loads(lines[1])
        assert lines[2:] == ["exit handler ran"]  # and no "finalized"
        if status == "copied":
            before = hits()
    # The rerun's touch, committed though the process ended at once: by the rerun itself, or (a rerun its
    # memo proved current, warmup/memo.py) by the detached process it left; bounded wait for that one.
    deadline = time.monotonic() + 30
    while hits() == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert hits() == before + 1


def test_the_script_exits_normally_while_another_thread_has_work_to_finish(tmp_path: Path) -> None:
    done = tmp_path / "written-by-the-thread"
    before = _FINALIZED + ("import threading, time, pathlib\n"
                           f"threading.Thread(target=lambda: (time.sleep(0.5), pathlib.Path({str(done)!r})"
                           ".write_text('ok'))).start()\n")
    proc = _script(tmp_path, ["--version"], before)
    assert proc.returncode == 0, proc.stderr
    assert done.read_text() == "ok"
    assert proc.stdout.splitlines()[-2:] == ["exit handler ran", "finalized"]


def test_help_lists_every_command_with_its_own_summary() -> None:
    """The table --help reads matches each command's help, so the fast listing cannot drift from it."""
    ctx = click.Context(cli)
    for name, ref in COMMANDS.items():
        cmd = cli.get_command(ctx, name)
        assert cmd is not None and cmd.name == name
        for limit in (45, 200):
            assert ref.short_help(limit) == cmd.get_short_help_str(limit), name


def test_a_lazy_face_refuses_a_name_that_is_also_a_submodule() -> None:
    """`store.simulate` is a module and a function: a lazy face could hand out the module."""
    with pytest.raises(ValueError, match="'simulate' names both a submodule and an attribute"):
        lazy_names("comfy_autocloud.store", {"simulate": "simulate", "zipf_trace": "simulate"})


@pytest.mark.parametrize("face", ["comfy_autocloud.fetch", "comfy_autocloud.manifest", "comfy_autocloud.store",
                                  "comfy_autocloud.transfer"])
def test_every_name_a_lazy_face_lists_resolves(face: str) -> None:
    module = importlib.import_module(face)
    for name in module.__all__:
        value = getattr(module, name)
        assert not isinstance(value, types.ModuleType), f"{face}.{name} is a module, not the {name} it exports"
