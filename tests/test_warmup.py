"""Warmup: plan/globs, copies, rerun no-op, changed files, kill -9, yaml merge, clean, list, status.

Real files on a real "volume" directory, the real CLI (in-process through click, or as a subprocess
where a process must die), the real store underneath.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import click
import pytest
import yaml
from click.testing import CliRunner

from comfy_autocloud.cli.context import AppContext
from comfy_autocloud.cli.warmup_cmd import warmup_cmd
from comfy_autocloud.config import load_settings
from comfy_autocloud.errors import IntegrityError, ManifestError
from comfy_autocloud.fetch import FetchService
from comfy_autocloud.fsutil import sha256_of
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.manifest.warmup_conf import parse_warmup_text
from comfy_autocloud.store import Store
from comfy_autocloud.store.settle import _settler_waiting
from comfy_autocloud.store.store import PRIVATE_DIR
from comfy_autocloud.transfer.localcopy import copy_file
from comfy_autocloud.warmup import extra_paths, pagecache
from comfy_autocloud.warmup.extra_paths import BEGIN, END, SECTION, search_order
from comfy_autocloud.warmup.hashes import SIDECAR
from comfy_autocloud.warmup.plan import build_plan
from comfy_autocloud.warmup.run import WarmupPaths, load_plan, run_warmup
from servers import safetensors_of, stop_background, wait_hashed

MiB = 1 << 20
REPO = Path(__file__).resolve().parents[1]




def write(path: Path, size: int, seed: int) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fill = hashlib.sha256(str(seed).encode()).digest()
    # model files are checked for their format on commit: a .safetensors name gets a valid safetensors file
    # (the few-byte files of the planning tests are never committed)
    model = path.suffix == ".safetensors" and size >= 128
    data = safetensors_of(fill, size) if model else (fill * (size // 32 + 1))[:size]
    path.write_bytes(data)
    return sha256_of(path)


class Env:
    """A ComfyUI on a volume, a cache dir, a warmup list, and the CLI pointed at them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.comfy = tmp / "volume" / "ComfyUI"
        self.models = self.comfy / "models"
        self.cache = tmp / "fast_cache"
        self.conf = tmp / "warmup_models.conf"
        self.models.mkdir(parents=True)
        self.env = {"COMFYUI_PATH": str(self.comfy), "CACHE_PATH": str(self.cache), "WARMUP_CONFIG": str(self.conf),
                    "AUTOCLOUD_CACHE": str(tmp / "autocloud"), "AUTOCLOUD_CONFIG": str(tmp / "none.yaml"),
                    "SKIP_WARMUP": "", "AUTOCLOUD_MAX_SIZE": "", "AUTOCLOUD_POLICY": ""}

    def model(self, rel: str, size: int, seed: int) -> str:
        return write(self.models / rel, size, seed)

    def list(self, *lines: str) -> None:
        self.conf.write_text("\n".join(lines) + "\n")

    def cli(self, *args: str) -> click.testing.Result:
        group = click.Group("autocloud", commands={"warmup": warmup_cmd})
        old = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            obj = AppContext(load_settings({}))
            return CliRunner().invoke(group, ["warmup", *args], obj=obj, catch_exceptions=False)
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def json_lines(self, *args: str) -> tuple[int, list[dict]]:
        r = self.cli(*args, "--json")
        return r.exit_code, [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]

    def paths(self) -> WarmupPaths:
        return WarmupPaths(self.comfy, self.cache)

    def hashed(self) -> None:
        """Wait for the background hasher a first copy starts (warmup/hash_later.py) to finish."""
        wait_hashed(self.cache)

    def subprocess_env(self) -> dict[str, str]:
        env = {**os.environ, **self.env}
        env["PYTHONPATH"] = str(REPO / "src") + os.pathsep + env.get("PYTHONPATH", "")
        return env


@pytest.fixture
def wenv(tmp_path: Path) -> Env:
    return Env(tmp_path)


def final_files(cache: Path) -> list[Path]:
    """Every file at a final path in the cache (the private dir excluded)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(cache):
        if Path(dirpath) == cache:
            dirnames[:] = [d for d in dirnames if d != PRIVATE_DIR]
        out += [Path(dirpath) / f for f in filenames]
    return sorted(out)


# ------------------------------------------------------------------------------------------------- plan

def test_plan_expands_globs_like_the_shell(wenv: Env) -> None:
    for name in ("sdxl_a.safetensors", "sdxl_b.safetensors", ".sdxl_hidden.safetensors", "flux.safetensors"):
        wenv.model(f"checkpoints/{name}", 10, 1)
    for name in ("detail_01.safetensors", "detail_02.safetensors", "detail_100.safetensors"):
        wenv.model(f"loras/SDXL/{name}", 10, 2)
    (wenv.models / "checkpoints" / "sdxl_dir.safetensors").mkdir()
    entries = parse_warmup_text("\n".join([
        "checkpoints/sdxl_*.safetensors",
        "loras/SDXL/detail_??.safetensors",
        "checkpoints/sdxl_a.safetensors",  # also selected by the glob: copied once
        "checkpoints/nothing_*.bin",
        "vae/absent.safetensors",
        "upscale_models/*.pth",
    ]), "w.conf")
    plan = build_plan(entries, wenv.models)
    assert [i.key for i in plan.items] == [
        "checkpoints/sdxl_a.safetensors", "checkpoints/sdxl_b.safetensors",
        "loras/SDXL/detail_01.safetensors", "loras/SDXL/detail_02.safetensors"]
    assert all(i.source == wenv.models / i.folder / i.filename for i in plan.items)
    reasons = {m.key: m.reason for m in plan.missing}
    assert reasons["checkpoints/nothing_*.bin"].startswith("no file in ")
    assert reasons["vae/absent.safetensors"] == f"not on the volume: {wenv.models / 'vae/absent.safetensors'}"
    assert reasons["upscale_models/*.pth"] == f"no folder {wenv.models / 'upscale_models'} on the volume"
    assert [m.line for m in plan.missing] == ["w.conf:4", "w.conf:5", "w.conf:6"]
    spec = plan.items[0].spec()
    assert spec.sources == (f"file://{wenv.models}/checkpoints/sdxl_a.safetensors",) and spec.size == 10


# ------------------------------------------------------------------------------------------------- copy

def test_copy_is_correct_and_a_rerun_copies_nothing(wenv: Env) -> None:
    want = {f"checkpoints/m{i}.safetensors": wenv.model(f"checkpoints/m{i}.safetensors", (i + 1) * MiB + i, i)
            for i in range(6)}
    want["loras/a b [x].safetensors"] = wenv.model("loras/a b [x].safetensors", 3 * MiB, 10)
    want["unet/sub/u.safetensors"] = wenv.model("unet/sub/u.safetensors", 2 * MiB, 11)
    wenv.list("checkpoints/m*.safetensors", "loras/a b [[]x].safetensors", "unet/sub/u.safetensors")

    code, out = wenv.json_lines()
    assert code == 0, out
    files = {o["key"]: o for o in out if "key" in o}
    assert {k: o["status"] for k, o in files.items()} == dict.fromkeys(want, "copied")
    assert out[-1]["summary"]["bytes_copied"] == sum(os.path.getsize(wenv.models / k) for k in want)
    for key, digest in want.items():
        assert sha256_of(wenv.cache / key) == digest
    assert final_files(wenv.cache) == sorted(wenv.cache / k for k in want)
    stamps = {k: os.stat(wenv.cache / k).st_ino for k in want}

    # Rerun: nothing copied, the same inodes, well under a second for 8 files (through the API).
    store = Store(wenv.cache)
    t0 = time.perf_counter()
    report = run_warmup(store, load_plan(wenv.conf, wenv.paths()), warm_page_cache=True)
    took = time.perf_counter() - t0
    assert [o.status for o in report.outcomes] == ["cached"] * 8 and report.bytes_copied == 0
    assert took < 1.0, took
    assert {k: os.stat(wenv.cache / k).st_ino for k in want} == stamps
    code, out = wenv.json_lines()
    assert code == 0 and out[-1]["summary"]["cached"] == 8 and out[-1]["summary"]["bytes_copied"] == 0


def test_changed_volume_file_is_copied_again(wenv: Env) -> None:
    wenv.model("checkpoints/a.safetensors", 2 * MiB, 1)
    wenv.model("checkpoints/b.safetensors", 2 * MiB, 2)
    wenv.list("checkpoints/*.safetensors")
    assert wenv.cli().exit_code == 0
    new = wenv.model("checkpoints/a.safetensors", 2 * MiB, 3)  # same size, new content and mtime
    st = os.stat(wenv.models / "checkpoints/a.safetensors")
    os.utime(wenv.models / "checkpoints/a.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    code, rows = wenv.json_lines("--list")
    assert {r["key"]: r["cache"] for r in rows} == {"checkpoints/a.safetensors": "stale",
                                                    "checkpoints/b.safetensors": "yes"}
    code, out = wenv.json_lines()
    assert code == 0
    assert {o["key"]: o["status"] for o in out if "key" in o} == {"checkpoints/a.safetensors": "recopied",
                                                                  "checkpoints/b.safetensors": "cached"}
    assert sha256_of(wenv.cache / "checkpoints/a.safetensors") == new


def sidecar(wenv: Env) -> dict:
    return json.loads((wenv.models / SIDECAR).read_text())["files"]


def test_hash_sidecar_on_the_volume_replaces_hashing(wenv: Env) -> None:
    a = wenv.model("checkpoints/a.safetensors", 3 * MiB, 1)
    b = wenv.model("checkpoints/b.safetensors", 2 * MiB, 2)
    wenv.list("checkpoints/*.safetensors")
    assert wenv.cli("--no-setup").exit_code == 0
    wenv.hashed()
    # The first warmup's copies were hashed (in the background, after it returned) and what was found is
    # written beside the models, keyed by size + mtime.
    st = os.stat(wenv.models / "checkpoints/a.safetensors")
    assert sidecar(wenv)["checkpoints/a.safetensors"] == {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                                          "sha256": a}
    assert Store(wenv.cache).lookup("checkpoints/b.safetensors").sha256 == b

    # A new machine (empty cache): the recorded hash is what the store gets, so the bytes were not hashed.
    # Proven by a record that lies (same size + mtime): it is taken as is, as documented.
    doc = json.loads((wenv.models / SIDECAR).read_text())
    doc["files"]["checkpoints/a.safetensors"]["sha256"] = "0" * 64
    (wenv.models / SIDECAR).write_text(json.dumps(doc))
    shutil.rmtree(wenv.cache)
    code, out = wenv.json_lines("--no-setup")
    assert code == 0 and {o["key"]: o["status"] for o in out if "key" in o} == dict.fromkeys(
        ("checkpoints/a.safetensors", "checkpoints/b.safetensors"), "copied")
    assert Store(wenv.cache).lookup("checkpoints/a.safetensors").sha256 == "0" * 64
    assert sha256_of(wenv.cache / "checkpoints/a.safetensors") == a  # the bytes themselves are the volume's

    # A record whose mtime no longer matches is not used: the file is hashed again and the record replaced.
    os.utime(wenv.models / "checkpoints/a.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    code, out = wenv.json_lines("--no-setup")
    assert code == 0 and {o["key"]: o["status"] for o in out if "key" in o}["checkpoints/a.safetensors"] == "recopied"
    wenv.hashed()
    assert Store(wenv.cache).lookup("checkpoints/a.safetensors").sha256 == a
    assert sidecar(wenv)["checkpoints/a.safetensors"]["sha256"] == a


def test_first_copies_are_hashed_after_warmup_returns_or_while_copying_with_hash_now(wenv: Env) -> None:
    a = wenv.model("checkpoints/a.safetensors", 3 * MiB, 1)
    b = wenv.model("checkpoints/b.safetensors", 2 * MiB, 2)
    wenv.list("checkpoints/*.safetensors")
    code, out = wenv.json_lines("--no-setup")
    assert code == 0 and [o["hash_pending"] for o in out if "key" in o] == [True, True]
    assert out[-1]["summary"]["hash_pending"] == 2
    wenv.hashed()
    with Store(wenv.cache) as store:
        assert store.unhashed() == []
        assert {k: store.lookup(k).sha256 for k in ("checkpoints/a.safetensors", "checkpoints/b.safetensors")} == {
            "checkpoints/a.safetensors": a, "checkpoints/b.safetensors": b}
    assert {k: v["sha256"] for k, v in sidecar(wenv).items()} == {"checkpoints/a.safetensors": a,
                                                                  "checkpoints/b.safetensors": b}
    # The next pod (empty cache) copies with the recorded hashes: nothing left to hash.
    shutil.rmtree(wenv.cache)
    code, out = wenv.json_lines("--no-setup")
    assert code == 0 and out[-1]["summary"]["hash_pending"] == 0
    assert Store(wenv.cache).lookup("checkpoints/a.safetensors").sha256 == a

    # --hash now (or AUTOCLOUD_WARMUP_HASH=now): every sha256 is known when the command returns.
    c = wenv.model("checkpoints/c.safetensors", MiB, 3)
    code, out = wenv.json_lines("--no-setup", "--hash", "now")
    assert code == 0 and out[-1]["summary"]["hash_pending"] == 0
    assert Store(wenv.cache).lookup("checkpoints/c.safetensors").sha256 == c
    assert sidecar(wenv)["checkpoints/c.safetensors"]["sha256"] == c
    wenv.env["AUTOCLOUD_WARMUP_HASH"] = "sometimes"
    with pytest.raises(ManifestError, match=r"AUTOCLOUD_WARMUP_HASH.*unknown hashing 'sometimes'"):
        wenv.cli("--no-setup")


def test_a_killed_background_hasher_loses_nothing(wenv: Env) -> None:
    """Copies left unhashed (hasher killed, or never started) are hashed by the next warmup that copies."""
    a = wenv.model("checkpoints/a.safetensors", 2 * MiB, 1)
    wenv.list("checkpoints/a.safetensors")
    with Store(wenv.cache) as store:  # what a warmup whose hasher died leaves: an unhashed copy
        part = store.partial_path("checkpoints/a.safetensors")
        shutil.copyfile(wenv.models / "checkpoints/a.safetensors", part)
        st = os.stat(wenv.models / "checkpoints/a.safetensors")
        store.commit("checkpoints/a.safetensors", part, size=st.st_size, sha256=None,
                     source=f"file://{wenv.models}/checkpoints/a.safetensors", etag=f"{st.st_size}-{st.st_mtime_ns}")
    b = wenv.model("checkpoints/b.safetensors", MiB, 2)
    wenv.list("checkpoints/a.safetensors", "checkpoints/b.safetensors")
    code, out = wenv.json_lines("--no-setup")
    assert code == 0 and {o["key"]: o["status"] for o in out if "key" in o} == {
        "checkpoints/a.safetensors": "cached", "checkpoints/b.safetensors": "copied"}
    wenv.hashed()
    with Store(wenv.cache) as store:
        assert store.unhashed() == []
        assert store.lookup("checkpoints/a.safetensors").sha256 == a
    assert sidecar(wenv)["checkpoints/a.safetensors"]["sha256"] == a
    assert sidecar(wenv)["checkpoints/b.safetensors"]["sha256"] == b


def test_bad_or_unwritable_sidecar_costs_a_rehash_never_a_failure(wenv: Env) -> None:
    a = wenv.model("checkpoints/a.safetensors", MiB, 1)
    wenv.list("checkpoints/a.safetensors")
    (wenv.models / SIDECAR).parent.mkdir(parents=True)
    (wenv.models / SIDECAR).write_text("{not json")
    assert wenv.cli("--no-setup").exit_code == 0
    wenv.hashed()
    assert Store(wenv.cache).lookup("checkpoints/a.safetensors").sha256 == a
    assert sidecar(wenv)["checkpoints/a.safetensors"]["sha256"] == a  # rewritten whole
    # A volume where it cannot be written (here: a file where its folder should be): copied and hashed anyway.
    shutil.rmtree(wenv.models / SIDECAR.parent)
    (wenv.models / SIDECAR.parent).write_text("in the way")
    shutil.rmtree(wenv.cache)
    code, out = wenv.json_lines("--no-setup")
    assert code == 0 and out[0]["status"] == "copied"
    wenv.hashed()
    assert Store(wenv.cache).lookup("checkpoints/a.safetensors").sha256 == a


def test_default_durability_is_deferred_and_settles_in_the_background(wenv: Env) -> None:
    """Nothing waits for the disk by default; the entries are settled by a detached flush afterwards."""
    wenv.model("checkpoints/d.safetensors", 2 * MiB, 1)
    wenv.model("checkpoints/f.safetensors", 2 * MiB, 2)
    wenv.list("checkpoints/d.safetensors")
    wenv.env["AUTOCLOUD_SETTLE_DELAY"] = "600"  # not during this test (stopped when the session ends)
    assert wenv.cli("--no-setup").exit_code == 0
    with Store(wenv.cache) as store:
        assert [k for k, _, _ in store.unsettled()] == ["checkpoints/d.safetensors"]
    wenv.list("checkpoints/f.safetensors")
    assert wenv.cli("--no-setup", "--durability", "durable").exit_code == 0
    with Store(wenv.cache) as store:
        assert [k for k, _, _ in store.unsettled()] == ["checkpoints/d.safetensors"]  # durable: no mark
    wenv.list("checkpoints/d.safetensors", "checkpoints/f.safetensors")
    (wenv.models / "checkpoints/d.safetensors").touch()  # copied again, now settled at once
    # The flush still waiting (600 s) would cover this copy too, so no second one would start: stop it.
    stop_background(wenv.cache)
    deadline = time.monotonic() + 30
    while _settler_waiting(wenv.cache) and time.monotonic() < deadline:
        time.sleep(0.02)
    wenv.env["AUTOCLOUD_SETTLE_DELAY"] = "0"
    assert wenv.cli("--no-setup").exit_code == 0
    deadline = time.monotonic() + 30
    with Store(wenv.cache) as store:
        while store.unsettled() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert store.unsettled() == []


def test_ephemeral_durability_and_its_setting(wenv: Env) -> None:
    want = {f"checkpoints/e{i}.safetensors": wenv.model(f"checkpoints/e{i}.safetensors", 2 * MiB + i, i)
            for i in range(3)}
    wenv.list("checkpoints/e*.safetensors")
    code, out = wenv.json_lines("--no-setup", "--durability", "ephemeral")
    assert code == 0 and out[-1]["summary"]["copied"] == 3
    wenv.hashed()
    assert Store(wenv.cache).unsettled() == []  # a cache that dies with the machine needs no check
    for key, digest in want.items():
        assert sha256_of(wenv.cache / key) == digest
        assert Store(wenv.cache).lookup(key).sha256 == digest
    wenv.env["AUTOCLOUD_WARMUP_DURABILITY"] = "fast"
    with pytest.raises(ManifestError, match=r"AUTOCLOUD_WARMUP_DURABILITY.*unknown durability 'fast'"):
        wenv.cli("--no-setup")
    r = wenv.cli("--no-setup", "--durability", "sometimes")
    assert r.exit_code == 2 and "sometimes" in r.stderr


def test_a_source_that_changes_while_copied_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "volume.safetensors"
    write(src, 40 * MiB, 1)
    part = tmp_path / "x.part"

    def touch_source(done: int, total: int | None) -> None:
        if done < (total or 0):
            st = os.stat(src)
            os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 1))

    for hashed in (True, False):
        with pytest.raises(IntegrityError, match="changed while it was being copied"):
            copy_file(src, part, progress=touch_source, hash=hashed)


def test_missing_files_are_reported_and_the_rest_copied(wenv: Env) -> None:
    wenv.model("vae/v.safetensors", MiB, 1)
    wenv.list("checkpoints/gone.safetensors", "vae/v.safetensors", "loras/x_*.safetensors")
    r = wenv.cli()
    assert r.exit_code == 1
    assert "checkpoints/gone.safetensors" in r.stderr and "not on the volume" in r.stderr
    assert f"{wenv.conf}:1" in r.stderr and "loras/x_*.safetensors" in r.stderr
    assert (wenv.cache / "vae/v.safetensors").is_file()
    code, out = wenv.json_lines()
    assert code == 1 and out[-1]["summary"]["missing"] == 2 and out[-1]["summary"]["cached"] == 1


def test_page_cache_is_warmed(wenv: Env) -> None:
    wenv.model("checkpoints/a.safetensors", 16 * MiB, 1)
    wenv.list("checkpoints/a.safetensors")
    assert wenv.cli("--no-page-cache").exit_code == 0
    cached = wenv.cache / "checkpoints/a.safetensors"
    fd = os.open(cached, os.O_RDONLY)
    try:
        os.fsync(fd)  # written back first (the default durability leaves that to later): dirty pages stay cached
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # drop just this file's pages
    finally:
        os.close(fd)
    before = pagecache.resident_bytes(cached)
    assert before is not None and before < 16 * MiB
    code, out = wenv.json_lines()  # a rerun (nothing to copy) still warms RAM, in the background
    assert code == 0 and out[-1]["summary"]["page_cache_background_bytes"] == 16 * MiB
    deadline = time.monotonic() + 5
    while pagecache.resident_bytes(cached) != 16 * MiB and time.monotonic() < deadline:
        time.sleep(0.05)
    assert pagecache.resident_bytes(cached) == 16 * MiB


def test_cachestat_and_mincore_count_the_same_pages(wenv: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """`resident_bytes` asks cachestat (Linux >= 6.5) and falls back to mincore; both count the same pages."""
    path = wenv.tmp / "f.bin"
    write(path, 16 * MiB + 5, 3)
    lib = pagecache._load_libc()
    assert lib is not None
    fd = os.open(path, os.O_RDONLY)
    try:
        for state in ("written", "dropped", "partly read"):
            if state == "dropped":
                os.fsync(fd)  # dirty pages cannot be dropped
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            if state == "partly read":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # no readahead around what is read
                os.pread(fd, 3 * MiB, 4 * MiB)
            by_kernel = pagecache._cachestat_pages(lib, fd)
            walked = pagecache._mincore_pages(lib, fd, 16 * MiB + 5)
            assert walked is not None
            assert by_kernel in (None, walked), state
            if state == "dropped":
                assert walked < 16 * MiB // mmap.PAGESIZE
            if state == "partly read":
                assert walked >= 3 * MiB // mmap.PAGESIZE
    finally:
        os.close(fd)
    monkeypatch.setattr(pagecache, "_cachestat_works", False)  # as on a kernel without it
    assert pagecache.resident_bytes(path) == walked * mmap.PAGESIZE


@pytest.mark.parametrize("how", ["populate", "no populate on this kernel", "reads"])
def test_read_through_brings_every_page_in(wenv: Env, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """MADV_POPULATE_READ a block at a time (page tables bounded), else reads: either way all of the file."""
    path = wenv.tmp / "f.bin"
    size = 3 * MiB + 5
    write(path, size, 4)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    before = pagecache.resident_bytes(path)
    assert before is not None and before < size
    monkeypatch.setattr(pagecache, "POPULATE_BLOCK", MiB)  # 4 blocks, the last one short
    monkeypatch.setattr(pagecache, "_populate_works", pagecache._populate_works)  # restored after the test
    if how == "no populate on this kernel":
        monkeypatch.setattr(pagecache, "_MADV_POPULATE_READ", 0x7FFF)  # advice the kernel refuses: EINVAL
    if how == "reads":
        monkeypatch.setattr(pagecache, "_populate_works", False)
    assert pagecache.read_through(path) == size
    assert pagecache.resident_bytes(path) == size
    assert pagecache._populate_works is (how == "populate" and _linux() >= (5, 14))


def _linux() -> tuple[int, ...]:
    """This Linux kernel's (major, minor); (0,) elsewhere."""
    if sys.platform != "linux":
        return (0,)
    return tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])


def test_cachestat_is_used_where_the_kernel_has_it(tmp_path: Path) -> None:
    if _linux() < (6, 5):
        pytest.skip(f"cachestat needs Linux >= 6.5 (this is {sys.platform} {os.uname().release})")
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * (MiB + 1))
    lib = pagecache._load_libc()
    fd = os.open(path, os.O_RDONLY)
    try:
        assert lib is not None and pagecache._cachestat_pages(lib, fd) == (MiB + 1 + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    finally:
        os.close(fd)
    assert pagecache.resident_bytes(path) == MiB + 1


# ------------------------------------------------------------------------------------------------- kill -9

def test_kill_9_mid_copy_never_exposes_a_partial_file(wenv: Env) -> None:
    want = {f"checkpoints/big{i}.safetensors": wenv.model(f"checkpoints/big{i}.safetensors", 64 * MiB, i)
            for i in range(4)}
    wenv.list("checkpoints/big*.safetensors")
    partial_dir = wenv.cache / PRIVATE_DIR / "partial"
    interrupted = mid_copy = 0
    # Kill at a few moments: after the first byte lands in a partial file (parallel and one at a time),
    # and right after the first file is committed (one at a time), so some kills land mid-copy for sure.
    # Every other round in the ephemeral mode (no fsync before the rename): a kill must not tell them apart.
    for parallel, wait_for, delay, durability in ((4, "part", 0.0, "durable"), (4, "part", 0.03, "ephemeral"),
                                                  (1, "part", 0.0, "durable"), (1, "commit", 0.0, "ephemeral"),
                                                  (1, "commit", 0.02, "durable"), (1, "part", 0.2, "ephemeral")):
        for p in final_files(wenv.cache):
            p.unlink()
        argv = [sys.executable, "-m", "comfy_autocloud.cli.warmup_cmd", "--no-setup", "--no-page-cache",
                "--parallel", str(parallel), "--durability", durability]
        proc = subprocess.Popen(argv, env=wenv.subprocess_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20

        def reached(what: str = wait_for) -> bool:
            return bool(final_files(wenv.cache)) if what == "commit" else any(partial_dir.glob("*.part"))

        while not reached() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        present = final_files(wenv.cache)
        for p in present:  # whatever is at a final path is complete and correct
            key = p.relative_to(wenv.cache).as_posix()
            assert os.path.getsize(p) == 64 * MiB and sha256_of(p) == want[key], (parallel, delay, key)
        interrupted += len(present) < len(want)
        mid_copy += 0 < len(present) < len(want)  # killed after some commits, before the others
        assert wait_for != "commit" or present, "the first commit was never seen"
        code, out = wenv.json_lines("--no-setup", "--no-page-cache")
        assert code == 0, out
        assert final_files(wenv.cache) == sorted(wenv.cache / k for k in want)
        for key, digest in want.items():
            assert sha256_of(wenv.cache / key) == digest
    assert interrupted >= 3 and mid_copy >= 1, "the kills never landed mid-copy: the test proved nothing"


# ------------------------------------------------------------------------------------------------- yaml

USER_YAML = """\
# my own paths
a111:
    base_path: /opt/webui/
    checkpoints: models/Stable-diffusion
    loras: |
         models/Lora
         models/LyCORIS

mine:
    base_path: /data/models
    is_default: true
    checkpoints: ckpts/
"""


def test_setup_only_merges_keeps_user_sections_and_backs_up_once(wenv: Env) -> None:
    y = wenv.comfy / "extra_model_paths.yaml"
    y.write_text(USER_YAML)
    wenv.list("checkpoints/a.safetensors", "ipadapter/x.bin")
    code, out = wenv.json_lines("--setup-only")
    assert code == 0 and out[0]["changed"] and out[0]["backup"] == f"{y}.bak"
    text = y.read_text()
    assert text.startswith(USER_YAML.rstrip()) and BEGIN in text
    assert Path(f"{y}.bak").read_text() == USER_YAML
    data = yaml.safe_load(text)
    assert data["a111"] == yaml.safe_load(USER_YAML)["a111"] and data["mine"]["checkpoints"] == "ckpts/"
    assert data[SECTION]["base_path"] == str(wenv.cache) and data[SECTION]["is_default"] is True
    assert data[SECTION]["ipadapter"] == "ipadapter/"  # folders from the list, beyond the defaults
    order = search_order(text, y.parent, "checkpoints", wenv.models / "checkpoints")
    assert order[:3] == [wenv.cache / "checkpoints", Path("/data/models/ckpts"), wenv.models / "checkpoints"]

    # Idempotent: same text, no new backup.
    bak_mtime = os.stat(f"{y}.bak").st_mtime_ns
    code, out = wenv.json_lines("--setup-only")
    assert code == 0 and not out[0]["changed"] and y.read_text() == text
    # A new cache path rewrites only our block; the one backup still holds the user's original.
    wenv.env["CACHE_PATH"] = str(wenv.tmp / "other_cache")
    code, out = wenv.json_lines("--setup-only")
    assert out[0]["changed"] and out[0]["backup"] is None and os.stat(f"{y}.bak").st_mtime_ns == bak_mtime
    text2 = y.read_text()
    assert text2.count(BEGIN) == 1 and yaml.safe_load(text2)[SECTION]["base_path"] == str(wenv.tmp / "other_cache")
    assert text2.startswith(USER_YAML.rstrip()) and Path(f"{y}.bak").read_text() == USER_YAML


def test_a_rerun_compares_the_yaml_bytes_and_still_sees_every_edit(wenv: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    """A rerun finds the yaml current by its bytes (no YAML parsed), yet any edit, another cache or another
    version of the merging code makes it merge again."""
    y = wenv.comfy / "extra_model_paths.yaml"
    y.write_text(USER_YAML)
    wenv.model("checkpoints/a.safetensors", MiB, 1)
    wenv.list("checkpoints/a.safetensors")
    code, out = wenv.json_lines()
    assert code == 0 and out[-1]["summary"]["setup"]["changed"]
    memo = wenv.paths().yaml_memo
    text = y.read_text()
    merges: list[str] = []
    real_merge = extra_paths.merged_text
    monkeypatch.setattr(extra_paths, "merged_text", lambda old, *a: merges.append(old) or real_merge(old, *a))

    code, out = wenv.json_lines()
    assert code == 0 and not out[-1]["summary"]["setup"]["changed"] and merges == [] and y.read_text() == text
    # A new pod (empty cache, same volume and cache path): still no YAML parsed, the memo is on the volume.
    shutil.rmtree(wenv.cache)
    code, out = wenv.json_lines()
    assert code == 0 and not out[-1]["summary"]["setup"]["changed"] and merges == [] and y.read_text() == text

    # The user adds a section after ours: ours must be last again, theirs kept.
    y.write_text(text + "late:\n    base_path: /late\n    checkpoints: c/\n")
    code, out = wenv.json_lines()
    assert out[-1]["summary"]["setup"]["changed"] and len(merges) == 1
    now = y.read_text()
    assert now.rstrip().endswith(END) and yaml.safe_load(now)["late"] == {"base_path": "/late", "checkpoints": "c/"}
    # A hand edit inside our block is undone.
    y.write_text(now.replace(f"base_path: {wenv.cache}", "base_path: /elsewhere"))
    code, out = wenv.json_lines()
    assert out[-1]["summary"]["setup"]["changed"] and y.read_text() == now and len(merges) == 2
    # The same bytes for another cache are not current.
    other = wenv.tmp / "other_cache"
    other.mkdir()  # the same store state there, copied by another process: closing descriptors of the index
    # files here would drop this process's SQLite locks on them (POSIX locks belong to the process)
    subprocess.run(["cp", "-a", str(wenv.cache / PRIVATE_DIR), str(other / PRIVATE_DIR)], check=True)
    wenv.env["CACHE_PATH"] = str(other)
    code, out = wenv.json_lines()
    assert out[-1]["summary"]["setup"]["changed"] and yaml.safe_load(y.read_text())[SECTION]["base_path"] == str(other)
    wenv.env["CACHE_PATH"] = str(wenv.cache)
    code, out = wenv.json_lines()
    assert out[-1]["summary"]["setup"]["changed"] and y.read_text() == now
    # Another version of the merging code, or a damaged memo: merged (and found current) again, never a failure.
    merges.clear()
    monkeypatch.setattr(extra_paths, "__file__", str(wenv.conf))
    code, out = wenv.json_lines()
    assert code == 0 and not out[-1]["summary"]["setup"]["changed"] and len(merges) == 1
    memo.write_bytes(b"\xff not a digest")
    code, out = wenv.json_lines()
    assert code == 0 and not out[-1]["summary"]["setup"]["changed"] and len(merges) == 2
    code, out = wenv.json_lines()
    assert code == 0 and len(merges) == 2 and y.read_text() == now


COMFY_CHECKOUT = os.environ.get("COMFYUI_PATH", "")

LOAD_WITH_COMFYUI = """
import json, sys
sys.argv = ["main.py"]
sys.path.insert(0, {checkout!r})
import folder_paths
from utils.extra_config import load_extra_path_config
load_extra_path_config({yaml!r})
print(json.dumps({{f: folder_paths.get_folder_paths(f) for f in ("checkpoints", "loras", "ipadapter")}}))
"""


@pytest.mark.skipif(not (Path(COMFY_CHECKOUT) / "utils" / "extra_config.py").is_file(),
                    reason="set COMFYUI_PATH to a ComfyUI checkout to check the yaml with ComfyUI's own loader")
def test_comfyui_itself_searches_the_cache_first(wenv: Env) -> None:
    y = wenv.comfy / "extra_model_paths.yaml"
    y.write_text(USER_YAML)
    wenv.list("checkpoints/a.safetensors", "ipadapter/x.bin")
    assert wenv.cli("--setup-only").exit_code == 0
    script = LOAD_WITH_COMFYUI.format(checkout=COMFY_CHECKOUT, yaml=str(y))
    r = subprocess.run([sys.executable, "-c", script], cwd=COMFY_CHECKOUT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.splitlines()[-1])
    models = Path(COMFY_CHECKOUT) / "models"
    assert got["checkpoints"][:3] == [str(wenv.cache / "checkpoints"), "/data/models/ckpts",
                                      str(models / "checkpoints")]
    assert got["loras"][0] == str(wenv.cache / "loras")
    assert got["ipadapter"] == [str(wenv.cache / "ipadapter")]


def test_setup_creates_the_yaml_and_refuses_to_clobber_bad_yaml(wenv: Env) -> None:
    y = wenv.comfy / "extra_model_paths.yaml"
    assert wenv.cli("--setup-only").exit_code == 0  # no list and no yaml yet: the default folders
    assert not Path(f"{y}.bak").exists()
    assert search_order(y.read_text(), y.parent, "loras", wenv.models / "loras")[0] == wenv.cache / "loras"
    for bad in ("a: [unclosed\n", "- a list\n", f"{SECTION}:\n    base_path: /x\n"):
        y.write_text(bad)
        with pytest.raises(Exception) as exc:
            wenv.cli("--setup-only")
        assert str(y) in str(exc.value)
        assert y.read_text() == bad


def test_search_order_matches_comfyui_rules(tmp_path: Path) -> None:
    text = "s1:\n    base_path: rel\n    vae: v1\n    is_default: true\ns2:\n    vae: |\n        /abs/v2\n        v3\n"
    assert search_order(text, tmp_path, "vae", tmp_path / "models/vae") == [
        tmp_path / "rel/v1", tmp_path / "models/vae", Path("/abs/v2"), tmp_path / "v3"]


# ---------------------------------------------------------------------------------------- clean / list / status

def test_clean_removes_only_what_warmup_copied(wenv: Env) -> None:
    digest = wenv.model("checkpoints/a.safetensors", MiB, 1)
    wenv.model("loras/l.safetensors", MiB, 2)
    wenv.list("checkpoints/a.safetensors", "loras/l.safetensors")
    assert wenv.cli().exit_code == 0
    other = wenv.tmp / "elsewhere" / "o.safetensors"
    other_sha = write(other, MiB, 3)
    store = Store(wenv.cache)
    FetchService(store).fetch(ModelSpec(folder="checkpoints", filename="o.safetensors", sources=(other.as_uri(),)))
    own = wenv.cache / "vae" / "users_own.safetensors"
    write(own, 1000, 4)
    store.pin("loras/l.safetensors")

    code, out = wenv.json_lines("--clean")
    assert code == 0
    assert out[0]["removed"] == ["checkpoints/a.safetensors"] and out[0]["bytes_freed"] == MiB
    assert [k["key"] for k in out[0]["kept"]] == ["loras/l.safetensors"] and "pinned" in out[0]["kept"][0]["reason"]
    assert not (wenv.cache / "checkpoints/a.safetensors").exists()
    assert sha256_of(wenv.cache / "checkpoints/o.safetensors") == other_sha and own.is_file()
    assert (wenv.cache / "loras/l.safetensors").is_file()
    assert sha256_of(wenv.models / "checkpoints/a.safetensors") == digest  # the volume is never touched
    assert Store(wenv.cache).lookup("checkpoints/o.safetensors") is not None


def test_list_and_status(wenv: Env) -> None:
    wenv.model("checkpoints/sdxl_1.safetensors", MiB, 1)
    wenv.model("checkpoints/sdxl_2.safetensors", MiB, 2)
    wenv.list("checkpoints/sdxl_*.safetensors", "vae/missing.safetensors")
    code, rows = wenv.json_lines("--list")
    assert code == 1
    assert [(r["key"], r["on_volume"], r["cache"]) for r in rows] == [
        ("checkpoints/sdxl_1.safetensors", True, "no"), ("checkpoints/sdxl_2.safetensors", True, "no"),
        ("vae/missing.safetensors", False, "no")]
    assert "not on the volume" in rows[2]["reason"]
    wenv.cli()
    code, rows = wenv.json_lines("--list")
    assert [r["cache"] for r in rows] == ["yes", "yes", "no"] and rows[0]["size"] == MiB
    human = wenv.cli("--list")
    assert "sdxl_2.safetensors" in human.stdout and "missing" in human.stdout
    assert "2 of 3 on the volume, 2 in the cache and current" in human.stdout.replace("\n", " ")

    code, out = wenv.json_lines("--status")
    st = out[0]
    assert code == 0 and st["cache"]["warmup_entries"] == 2 and st["cache"]["warmup_bytes"] == 2 * MiB
    assert st["volume"]["exists"] and st["extra_model_paths"]["cache_first"] is True
    assert st["cache"]["disk_free"] > 0
    human = wenv.cli("--status").stdout
    assert "cache first" in human and str(wenv.cache) in human.replace("\n", "")


def test_conflicting_modes_are_refused(wenv: Env) -> None:
    wenv.list()
    r = wenv.cli("--list", "--clean")
    assert r.exit_code == 2 and "cannot be combined" in r.stderr


# ---------------------------------------------------------------------------------------- background / wrappers

def test_background_returns_at_once_and_finishes(wenv: Env) -> None:
    want = {f"checkpoints/b{i}.safetensors": wenv.model(f"checkpoints/b{i}.safetensors", 32 * MiB, i)
            for i in range(4)}
    wenv.list("checkpoints/b*.safetensors")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "comfy_autocloud.cli.warmup_cmd", "--background", "--json"],
                       env=wenv.subprocess_env(), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 10
    job = json.loads(r.stdout.splitlines()[-1])
    assert job["background"]["started"] and job["setup"]["changed"]
    assert (wenv.comfy / "extra_model_paths.yaml").is_file()  # written before returning
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        _code, out = wenv.json_lines("--status")
        if not out[0]["background"]["running"]:
            break
        time.sleep(0.1)
    assert out[0]["background"]["pid"] == job["background"]["pid"] and not out[0]["background"]["running"]
    for key, digest in want.items():
        assert sha256_of(wenv.cache / key) == digest
    log = Path(job["background"]["log"]).read_text()
    assert "4 copied" in log


def test_runpod_warmup_wrapper(wenv: Env) -> None:
    wenv.model("checkpoints/a.safetensors", MiB, 1)
    wenv.list("checkpoints/a.safetensors")
    env = {k: v for k, v in wenv.subprocess_env().items() if k != "PYTHONPATH"} | {"AUTOCLOUD_PYTHON": sys.executable}
    run = [REPO / "runpod" / "warmup.sh"]
    r = subprocess.run(["bash", *run, "--list"], env=env, capture_output=True, text=True, timeout=60, cwd=wenv.tmp)
    assert r.returncode == 0, r.stderr
    assert "checkpoints/a.safetensors" in r.stdout and "1 of 1 on the volume, 0 in the cache" in r.stdout
    r = subprocess.run(["bash", *run], env=env, capture_output=True, text=True, timeout=60, cwd=wenv.tmp)
    assert r.returncode == 0, r.stderr
    assert (wenv.cache / "checkpoints/a.safetensors").is_file()
    # The default list name is found beside the scripts when the cwd has none.
    env.pop("WARMUP_CONFIG")
    r = subprocess.run(["bash", *run, "--list", "--json"], env=env, capture_output=True, text=True, timeout=60,
                       cwd=wenv.tmp / "volume")
    assert str(REPO / "runpod" / "warmup_models.conf") in r.stdout
