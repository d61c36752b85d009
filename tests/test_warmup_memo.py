"""The warmup rerun memo (warmup/memo.py); the index generation it rests on: test_store_generation.py.

A rerun the memo proves current opens no store (no SQLite); every change that could make a cached
copy wrong or absent makes the memo untrusted, and the rerun then goes through the store and copies
what it must. Real files, the real store, the real CLI (as subprocesses where a rerun's imports or a
second process matter).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfy_autocloud.fsutil import sha256_of
from comfy_autocloud.store import Store
from comfy_autocloud.warmup import hash_later, memo
from comfy_autocloud.warmup.run import load_plan, run_warmup
from test_warmup import Env, MiB

SRC = str(Path(__file__).resolve().parents[1] / "src")
KEYS = ["checkpoints/a.safetensors", "checkpoints/b.safetensors"]


def two_models(tmp_path: Path) -> Env:
    """A volume with two 2 MiB checkpoints and a warmup list of both."""
    env = Env(tmp_path)
    env.model("checkpoints/a.safetensors", 2 * MiB, 1)
    env.model("checkpoints/b.safetensors", 2 * MiB, 2)
    env.list("checkpoints/*.safetensors")
    return env


@pytest.fixture
def menv(tmp_path: Path) -> Env:
    return two_models(tmp_path)


def _warmup(menv: Env, store: Store) -> list[str]:
    """A warmup through the store (the full path) that writes the memo; the statuses."""
    report = run_warmup(store, load_plan(menv.conf, menv.paths()), warm_page_cache=False, durability="ephemeral",
                        hashing="now", memo_dir=menv.paths().state_dir)
    return [o.status for o in report.outcomes]


def _proven(menv: Env) -> list[str] | None:
    """What the memo proves now: the keys it reports cached, None if it proves nothing."""
    proven = memo.load(menv.paths().state_dir, menv.cache, load_plan(menv.conf, menv.paths()))
    return None if proven is None else [o.key for o, _path in proven]


# ------------------------------------------------------------------------------------------------- memo

def test_the_memo_proves_an_unchanged_rerun_and_reports_what_the_store_would(menv: Env) -> None:
    store = Store(menv.cache)
    assert _warmup(menv, store) == ["copied", "copied"]
    assert _proven(menv) == KEYS
    proven = memo.load(menv.paths().state_dir, menv.cache, load_plan(menv.conf, menv.paths()))
    assert proven is not None
    for outcome, path in proven:
        entry = store.lookup(outcome.key)
        assert entry is not None and path == entry.path
        assert (outcome.status, outcome.size, outcome.source) == ("cached", entry.size, entry.source)
    assert _warmup(menv, store) == ["cached", "cached"]  # the full path writes it again too
    assert _proven(menv) == KEYS


def _evict(menv: Env, store: Store) -> None:
    store.evict("checkpoints/a.safetensors")


def _fetch_over(menv: Env, store: Store) -> None:
    """Another source's file of the same size committed at the key (what a fetch does)."""
    part = store.partial_path("checkpoints/a.safetensors", 2 * MiB)
    part.write_bytes((menv.cache / "checkpoints/b.safetensors").read_bytes())
    store.commit("checkpoints/a.safetensors", part, size=2 * MiB, sha256=sha256_of(part),
                 source="https://example.com/a.safetensors")


def _replace_behind_the_index(menv: Env, store: Store) -> None:
    """The file at the final path replaced, the index not yet told (a commit between its rename and its row)."""
    other = menv.cache / "checkpoints" / ".a.new"
    other.write_bytes((menv.cache / "checkpoints/a.safetensors").read_bytes())
    os.replace(other, menv.cache / "checkpoints/a.safetensors")


def _row_dropped(menv: Env, store: Store) -> None:
    store._index.drop_entry("checkpoints/a.safetensors")  # the index forgets, the file stays


def _adopted(menv: Env, store: Store) -> None:
    store.adopt("checkpoints/a.safetensors")  # the same file, indexed again as placed by hand: no etag now


def _touched(menv: Env, store: Store) -> None:
    store.touch("checkpoints/b.safetensors")  # any commit, even a recorded access


def _volume_changed(menv: Env, store: Store) -> None:
    src = menv.models / "checkpoints/a.safetensors"
    st = os.stat(src)
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


def _volume_grew(menv: Env, store: Store) -> None:
    menv.model("checkpoints/c.safetensors", MiB, 3)  # the glob selects one more file


def _conf_changed(menv: Env, store: Store) -> None:
    menv.list("checkpoints/a.safetensors")


@pytest.mark.parametrize(("change", "after"), [
    (_evict, ["copied", "cached"]),
    (_fetch_over, ["recopied", "cached"]),
    (_replace_behind_the_index, None),  # the next commit settles it; the memo must not vouch meanwhile
    (_row_dropped, ["copied", "cached"]),
    (_adopted, ["recopied", "cached"]),
    (_touched, ["cached", "cached"]),
    (_volume_changed, ["recopied", "cached"]),
    (_volume_grew, ["cached", "cached", "copied"]),
    (_conf_changed, ["cached"]),
])
def test_a_stale_memo_is_not_trusted(menv: Env, change, after: list[str] | None) -> None:
    store = Store(menv.cache)
    assert _warmup(menv, store) == ["copied", "copied"] and _proven(menv) == KEYS
    change(menv, store)
    assert _proven(menv) is None
    if after is not None:  # and the store, asked instead, copies what is not current
        assert _warmup(menv, store) == after
        assert _proven(menv) == [k for k in ("checkpoints/a.safetensors", "checkpoints/b.safetensors",
                                             "checkpoints/c.safetensors") if (menv.cache / k).exists()][:len(after)]


def test_a_memo_of_unsettled_copies_holds_only_in_their_boot(menv: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(menv.cache)
    report = run_warmup(store, load_plan(menv.conf, menv.paths()), warm_page_cache=False, durability="deferred",
                        hashing="now", memo_dir=menv.paths().state_dir)
    assert [o.status for o in report.outcomes] == ["copied", "copied"]
    assert _proven(menv) == KEYS
    monkeypatch.setattr(memo, "boot_id", lambda: "the-next-boot")  # the store reads them back then
    assert _proven(menv) is None
    monkeypatch.undo()
    assert store.settle() == 2
    assert memo.save(menv.paths().state_dir, store, load_plan(menv.conf, menv.paths()))
    monkeypatch.setattr(memo, "boot_id", lambda: "the-next-boot")  # settled: on disk, whatever the boot
    assert _proven(menv) == KEYS


def test_the_background_hashers_commits_make_the_memo_untrusted(menv: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """First copies are hashed after warmup returns (hash_later.py): what the hasher records is a commit, so the
    memo written by that warmup is not trusted afterwards; the next rerun, through the store, writes it anew."""
    monkeypatch.setattr(hash_later, "start", lambda cache, models: True)  # its work is done below, in this process
    store = Store(menv.cache)
    report = run_warmup(store, load_plan(menv.conf, menv.paths()), warm_page_cache=False, durability="ephemeral",
                        hashing="later", memo_dir=menv.paths().state_dir)
    assert [o.hash_pending for o in report.outcomes] == [True, True] and _proven(menv) == KEYS
    assert sorted(hash_later.hash_copies(menv.cache, menv.models)) == KEYS
    assert _proven(menv) is None
    assert _warmup(menv, store) == ["cached", "cached"] and _proven(menv) == KEYS


def test_no_memo_is_written_while_the_index_moves(menv: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(menv.cache)
    assert _warmup(menv, store) == ["copied", "copied"]
    tokens = iter(["before", "after"])
    monkeypatch.setattr(memo, "index_generation", lambda root: next(tokens))  # a commit during the lookups
    assert not memo.save(menv.paths().state_dir, store, load_plan(menv.conf, menv.paths()))
    assert not (menv.paths().state_dir / memo.MEMO_NAME).exists()


def test_a_line_that_selects_nothing_is_never_memoized(menv: Env) -> None:
    menv.list("checkpoints/*.safetensors", "loras/gone.safetensors")
    store = Store(menv.cache)
    report = run_warmup(store, load_plan(menv.conf, menv.paths()), warm_page_cache=False, durability="ephemeral",
                        hashing="now", memo_dir=menv.paths().state_dir)
    assert not report.ok and _proven(menv) is None


def test_a_damaged_memo_proves_nothing(menv: Env) -> None:
    store = Store(menv.cache)
    _warmup(menv, store)
    path = menv.paths().state_dir / memo.MEMO_NAME
    for text in ("", "{", "[]", json.dumps({"version": 1}), path.read_text().replace('"files"', '"filez"')):
        path.write_text(text)
        assert _proven(menv) is None


# ------------------------------------------------------------------------------------------------- CLI

def run_script(menv: Env, *args: str, env: dict[str, str] | None = None,
               call: str = "m.main()") -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """`autocloud ARGS` as its script runs it (a new process that ends at once, without closing the index):
    the process and the top-level modules it imported. `call` runs the command (`m` is cli.main)."""
    code = ("import json, os, sys\n"
            "from comfy_autocloud.cli import main as m\n"
            "real_exit = os._exit\n"
            "def report(rc):\n"
            "    sys.stderr.write('\\nMODULES ' + json.dumps(sorted({n.partition('.')[0] for n in sys.modules})))\n"
            "    sys.stderr.flush()\n"
            "    real_exit(rc)\n"
            "os._exit = report\n"
            f"sys.argv = ['autocloud', *{list(args)!r}]\n"
            f"{call}\n")
    env = {**menv.subprocess_env(), "PYTHONPATH": SRC, "AUTOCLOUD_SETTLE_DELAY": "3600", **(env or {})}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    _, _, line = proc.stderr.rpartition("MODULES ")
    assert line, proc.stderr
    return proc, set(json.loads(line))


def _cli(menv: Env, *args: str, env: dict[str, str] | None = None) -> tuple[list[dict], set[str]]:
    """`autocloud ARGS` as its script runs it; JSON lines and modules."""
    proc, modules = run_script(menv, *args, env=env)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")], modules


def _hits(menv: Env) -> list[int]:
    with Store(menv.cache) as store:
        return [e.hits for e in sorted(store.entries(), key=lambda e: e.key)]


def _wait_for(check, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("same_cache", [False, True], ids=["own-cache", "cache-is-the-global-cache"])
def test_a_proven_rerun_opens_no_store_and_its_accesses_are_recorded_after(menv: Env, same_cache: bool) -> None:
    """`autocloud warmup` as a user reruns it: the memo-proven rerun imports no SQLite; a detached process
    records the accesses (hits + 1 per file, as a rerun through the store) and writes the memo again. Also
    where CACHE_PATH is the global cache (the command used to close that store, removing the WAL the memo
    was written for)."""
    args = ["warmup", str(menv.conf), "--json", "--durability", "ephemeral", "--hash", "now"]
    env = {"AUTOCLOUD_CACHE": str(menv.cache)} if same_cache else {}
    out, modules = _cli(menv, *args, env=env)
    assert [o["status"] for o in out if "key" in o] == ["copied", "copied"] and "sqlite3" in modules
    before = json.loads((menv.paths().state_dir / memo.MEMO_NAME).read_text())["generation"]
    out, modules = _cli(menv, *args, env=env)
    assert [o["status"] for o in out if "key" in o] == ["cached", "cached"]
    assert out[-1]["summary"]["cached"] == 2 and out[-1]["summary"]["bytes_copied"] == 0
    assert not modules & {"sqlite3", "_sqlite3"}, "a proven rerun opened the store"
    # nor imports what only a copy or a changed yaml needs (each a library read from a cold disk)
    assert not modules & {"hashlib", "_hashlib", "shutil", "bz2", "lzma"}, sorted(modules)

    def rewritten() -> bool:
        try:
            data = json.loads((menv.paths().state_dir / memo.MEMO_NAME).read_text())
        except (OSError, ValueError):
            return False
        return data["generation"] != before

    _wait_for(rewritten, "the detached process to record the accesses and write the memo again")
    assert _proven(menv) == KEYS  # for the index as it now is
    assert _hits(menv) == [2, 2]  # the copy's access, then the rerun's


def test_a_file_evicted_by_another_process_between_reruns_is_copied_again(menv: Env) -> None:
    args = ["warmup", str(menv.conf), "--json", "--durability", "ephemeral", "--hash", "now", "--no-page-cache"]
    out, _ = _cli(menv, *args)
    assert [o["status"] for o in out if "key" in o] == ["copied", "copied"]
    evict = subprocess.run([sys.executable, "-m", "comfy_autocloud.cli.main", "--cache-dir", str(menv.cache),
                            "evict", "checkpoints/a.safetensors"], capture_output=True, text=True,
                           env={**menv.subprocess_env(), "PYTHONPATH": SRC}, timeout=60)
    assert evict.returncode == 0, evict.stderr
    out, modules = _cli(menv, *args)
    assert [o["status"] for o in out if "key" in o] == ["copied", "cached"] and "sqlite3" in modules
    assert (menv.cache / "checkpoints/a.safetensors").is_file()
