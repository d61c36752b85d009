"""Resuming: kill -9 of a downloading process at several points, and files that change between runs."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from comfy_autocloud.errors import Cancelled
from comfy_autocloud.progress import CancelToken
from comfy_autocloud.transfer import TransferOptions, download, state_path
from comfy_autocloud.transfer.ranges import PartState, normalize
from servers import Behaviour, ChaosOrigin, NginxOrigin, random_bytes

MiB = 1 << 20
CONNS = 4
CHILD = """
import sys
from pathlib import Path
from comfy_autocloud.transfer import TransferOptions, download
r = download(sys.argv[1], Path(sys.argv[2]), TransferOptions(connections=int(sys.argv[3])))
print(r.sha256, r.bytes_downloaded, r.resumed_bytes, flush=True)
"""


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    if not header.startswith("bytes="):
        return None
    lo, _, hi = header[6:].partition("-")
    return int(lo), (int(hi) + 1 if hi else size)


def _wait_for_state(path: Path, at_least: int, proc: subprocess.Popen[bytes], timeout: float) -> PartState:
    """Wait until the state record has >= at_least bytes done and was just rewritten, then return it."""
    deadline = time.monotonic() + timeout
    last_mtime = None
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the download finished before it could be killed"
        try:
            mtime = path.stat().st_mtime_ns
        except FileNotFoundError:
            mtime = None
        if mtime is not None and mtime != last_mtime:
            state = PartState.load(path)
            if state is not None and state.done_bytes() >= at_least:
                return state
            last_mtime = mtime
        time.sleep(0.005)
    raise AssertionError(f"no state with {at_least} bytes done within {timeout}s")


@pytest.mark.slow
def test_kill9_at_five_points_then_resume(nginx_origin: NginxOrigin, random_file, tmp_path: Path) -> None:
    size = 24 * MiB
    want = random_file(nginx_origin.data_dir / "kill.bin", size, seed=40)
    url = nginx_origin.url("slow/kill.bin")  # 2 MB/s per connection
    part = tmp_path / "kill.part"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    previous: list[tuple[int, int]] = []
    log_lines = 0
    for k, fraction in enumerate((0.08, 0.25, 0.42, 0.6, 0.78)):
        proc = subprocess.Popen([sys.executable, "-c", CHILD, url, str(part), str(CONNS)], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            state = _wait_for_state(state_path(part), int(size * fraction), proc, timeout=30)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
        assert proc.returncode == -signal.SIGKILL
        time.sleep(0.2)  # let nginx log the requests the kill cut short
        entries = nginx_origin.entries("slow/kill.bin")
        new = entries[log_lines:]
        log_lines = len(entries)
        # This run asked only for bytes the previous record did not already hold.
        for e in new:
            rng = _parse_range(e.range, size)
            if rng is None:
                continue
            for lo, hi in previous:
                assert rng[1] <= lo or rng[0] >= hi, (k, e.range, previous)
        # Records only grow: nothing finished is ever forgotten.
        assert state.size == size and state.done_bytes() >= sum(hi - lo for lo, hi in previous)
        assert normalize(previous + state.done, size) == state.done
        previous = state.done
    done_before = sum(hi - lo for lo, hi in previous)
    served_before = nginx_origin.bytes_served("slow/kill.bin")
    out = subprocess.run([sys.executable, "-c", CHILD, url, str(part), str(CONNS)], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    digest, downloaded, resumed = out.stdout.split()
    assert digest == want == hashlib.sha256(part.read_bytes()).hexdigest()
    assert not state_path(part).exists()
    remaining = size - done_before
    # The last run re-fetched at most what was unfinished, plus one in-flight read per connection.
    assert int(resumed) >= done_before
    assert int(downloaded) <= remaining + CONNS * MiB
    assert nginx_origin.bytes_served("slow/kill.bin") - served_before <= remaining + CONNS * 4 * MiB


def test_changed_file_between_runs_restarts(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    old = random_bytes(4 * MiB, seed=41)
    b = Behaviour(data=old, etag='"old"', trickle=4 * MiB)
    url = chaos_origin.add("changing", b)
    part = tmp_path / "c.part"
    token = CancelToken()

    def on_progress(done: int, total: int | None) -> None:
        if done >= MiB:
            token.cancel()

    with pytest.raises(Cancelled):
        download(url, part, TransferOptions(connections=2), progress=on_progress, cancel=token)
    assert PartState.load(state_path(part)) is not None
    new = random_bytes(4 * MiB + 100, seed=42)
    b.data, b.etag, b.last_modified, b.trickle = new, '"new"', "Tue, 02 Jan 2024 00:00:00 GMT", None
    r = download(url, part, TransferOptions(connections=2))
    assert r.sha256 == hashlib.sha256(new).hexdigest() and r.resumed_bytes == 0 and r.etag == '"new"'


def test_if_range_mismatch_restarts_on_the_full_answer(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    """Same size and the HEAD still says the old ETag, but the content changed: If-Range catches it."""
    old = random_bytes(2 * MiB, seed=43)
    b = Behaviour(data=old, etag='"same"', trickle=2 * MiB)
    url = chaos_origin.add("ifrange", b)
    part = tmp_path / "i.part"
    token = CancelToken()
    with pytest.raises(Cancelled):
        download(url, part, TransferOptions(connections=2), cancel=token,
                 progress=lambda d, t: token.cancel() if d >= 512 * 1024 else None)
    # The origin now serves new bytes under a new ETag to GETs, while HEAD is answered from a stale
    # cache (old ETag): the resumed ranged GETs carry If-Range "same" and get a full 200 back.
    new = random_bytes(2 * MiB, seed=44)
    b.data, b.trickle, b.etag, b.head_etag = new, None, '"changed"', '"same"'
    r = download(url, part, TransferOptions(connections=2))
    assert r.sha256 == hashlib.sha256(new).hexdigest()
    gets = [s for s in chaos_origin.seen_for("ifrange") if s.method == "GET"]
    assert any("If-Range" in s.headers for s in gets)


@pytest.mark.parametrize("any_source", [False, True])
def test_resume_from_another_source_only_when_the_caller_verifies(nginx_origin: NginxOrigin, tmp_path: Path,
                                                                   any_source: bool) -> None:
    """A partial recorded from URL A is resumed from URL B only with resume_any_source (sha256 checked later)."""
    data = random_bytes(8 * MiB + 9, seed=31)
    (nginx_origin.data_dir / "b.bin").write_bytes(data)
    part = tmp_path / "x.part"
    half = len(data) // 2
    part.write_bytes(data[:half] + b"\0" * (len(data) - half))
    PartState("http://peer-a/v1/partial/x", len(data), '"partial-1"', None, [(0, half)]).save(state_path(part))
    nginx_origin.clear_log()
    res = download(nginx_origin.url("b.bin"), part, TransferOptions(connections=2, resume_any_source=any_source))
    assert res.sha256 == hashlib.sha256(data).hexdigest()
    assert res.resumed_bytes == (half if any_source else 0)
    rest = len(data) - res.resumed_bytes
    assert rest <= nginx_origin.bytes_served("b.bin") <= rest + MiB  # only what was missing (+ a cut-short tail)


def test_live_progress_record_runs_ahead_of_the_durable_one(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    """`.live` (for peers streaming this download) is rewritten ~10x a second and only names written bytes."""
    import threading

    from comfy_autocloud.transfer.ranges import live_path

    data = random_bytes(3 * MiB, seed=41)
    url = chaos_origin.add("live.bin", Behaviour(data=data, trickle=2 * MiB))
    part = tmp_path / "x.part"
    seen: list[PartState] = []
    stop = threading.Event()

    def watch() -> None:
        last = None
        while not stop.is_set():
            st = PartState.load(live_path(part))
            if st is not None and st.done != last:
                last = st.done
                seen.append(st)
                for lo, hi in st.done:  # every byte it names is already in the file
                    with open(part, "rb") as f:
                        f.seek(lo)
                        assert f.read(hi - lo) == data[lo:hi]
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        res = download(url, part, TransferOptions(connections=1))
    finally:
        stop.set()
        watcher.join()
    assert res.sha256 == hashlib.sha256(data).hexdigest()
    assert len(seen) >= 6, f"only {len(seen)} live updates in a ~1.5 s download (the durable record: ~3)"
    assert not live_path(part).exists() and not state_path(part).exists()


def test_finished_download_can_keep_a_complete_live_record(nginx_origin: NginxOrigin, tmp_path: Path) -> None:
    """keep_live_record: the fleet's holder leaves `.live` = every byte (no `.state`) until its commit."""
    from comfy_autocloud.transfer.ranges import live_path, remove_live

    data = random_bytes(3 * MiB + 1, seed=42)
    (nginx_origin.data_dir / "kept.bin").write_bytes(data)
    part = tmp_path / "x.part"
    download(nginx_origin.url("kept.bin"), part, TransferOptions(connections=2, keep_live_record=True))
    live = PartState.load(live_path(part))
    assert live is not None and live.done == [(0, len(data))] and not state_path(part).exists()
    remove_live(part)
    assert not live_path(part).exists()
    download(nginx_origin.url("kept.bin"), tmp_path / "y.part", TransferOptions(connections=2))
    assert not live_path(tmp_path / "y.part").exists()
