"""Transfer engine against a real nginx: correctness, adaptivity, single stream, rate limits, copies."""

from __future__ import annotations

import hashlib
import threading
import time
from pathlib import Path

import pytest

from comfy_autocloud.errors import Cancelled
from comfy_autocloud.progress import CancelToken
from comfy_autocloud.transfer import (
    RateLimiter,
    TransferOptions,
    copy_file,
    discard_partial,
    download,
    probe,
    state_path,
)
from comfy_autocloud.transfer.ranges import PartState, SegmentTable
from servers import Behaviour, ChaosOrigin, NginxOrigin, random_bytes

MiB = 1 << 20


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("size", [0, 1, 12345, 5 * MiB + 123, 9 * MiB])
def test_ranged_download_is_correct(nginx_origin: NginxOrigin, random_file, tmp_path: Path, size: int) -> None:
    name = f"sized-{size}.bin"
    want = random_file(nginx_origin.data_dir / name, size, seed=size)
    part = tmp_path / "out.part"
    calls: list[tuple[int, int | None]] = []
    r = download(nginx_origin.url(name), part, TransferOptions(), progress=lambda d, t: calls.append((d, t)))
    assert r.sha256 == want == sha(part)
    assert r.size == size == part.stat().st_size
    # Work stealing may cut a request short: its unneeded tail is counted, and small.
    assert size <= r.bytes_downloaded <= size + MiB and r.resumed_bytes == 0
    assert r.etag and r.last_modified
    assert not state_path(part).exists()
    assert calls[-1] == (size, size)
    assert set(r.phases) == {"probe", "transfer", "hash_tail", "records"}  # where the call's time went
    assert all(v >= 0 for v in r.phases.values()) and sum(r.phases.values()) <= r.seconds


def test_fixed_connections_and_progress_rate(nginx_origin: NginxOrigin, random_file, tmp_path: Path) -> None:
    want = random_file(nginx_origin.data_dir / "fixed.bin", 12 * MiB, seed=3)
    part = tmp_path / "fixed.part"
    calls: list[float] = []
    t0 = time.monotonic()
    r = download(nginx_origin.url("slow/fixed.bin"), part, TransferOptions(connections=3),
                 progress=lambda d, t: calls.append(time.monotonic()))
    elapsed = time.monotonic() - t0
    assert r.sha256 == want and r.connections == 3
    ranged = [e for e in nginx_origin.entries("slow/fixed.bin") if e.status == 206]
    assert len(ranged) >= 3 and all(e.range.startswith("bytes=") for e in ranged)
    assert all(e.if_range for e in ranged)  # every ranged request carries a validator
    assert len(calls) <= elapsed * 10 + 3


def test_adaptive_goes_past_16_on_throttled_origin(nginx_origin: NginxOrigin, random_file, tmp_path: Path) -> None:
    """nginx limits each connection to 2 MB/s: the controller must keep adding connections past 16."""
    want = random_file(nginx_origin.data_dir / "throttled.bin", 256 * MiB, seed=4)
    t0 = time.monotonic()
    r = download(nginx_origin.url("slow/throttled.bin"), tmp_path / "t.part", TransferOptions())
    elapsed = time.monotonic() - t0
    assert r.sha256 == want
    assert r.connections > 16, r
    assert elapsed < 20


def test_no_range_origin_single_stream(nginx_origin: NginxOrigin, random_file, tmp_path: Path) -> None:
    want = random_file(nginx_origin.data_dir / "norange.bin", 3 * MiB + 7, seed=5)
    r = download(nginx_origin.url("norange/norange.bin"), tmp_path / "n.part", TransferOptions())
    assert r.sha256 == want and r.connections == 1
    entries = nginx_origin.entries("norange/norange.bin")
    assert [e.status for e in entries if e.method == "GET"] == [200]


def test_range_ignored_despite_accept_ranges(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    """An origin that advertises nothing and answers 200 to every Range: one stream, right bytes."""
    data = random_bytes(2 * MiB + 3, seed=6)
    url = chaos_origin.add("ignore-range", Behaviour(data=data, ranges=False))
    r = download(url, tmp_path / "i.part", TransferOptions())
    assert r.sha256 == hashlib.sha256(data).hexdigest() and r.connections == 1


def test_head_refused_falls_back_to_get_range(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    data = random_bytes(3 * MiB + 11, seed=7)
    url = chaos_origin.add("nohead", Behaviour(data=data, head_allowed=False))
    r = download(url, tmp_path / "h.part", TransferOptions(connections=2))
    assert r.sha256 == hashlib.sha256(data).hexdigest()
    seen = chaos_origin.seen_for("nohead")
    assert seen[0].method == "HEAD" and seen[1].headers.get("Range") == "bytes=0-"
    # The probe's open answer is reused for the first piece, not thrown away.
    assert r.bytes_downloaded <= len(data) + 2 * MiB


def test_probe_reports_size_and_validators(nginx_origin: NginxOrigin, random_file) -> None:
    random_file(nginx_origin.data_dir / "probe.bin", 1000, seed=8)
    info = probe(nginx_origin.url("probe.bin"), TransferOptions())
    assert info.size == 1000 and info.accept_ranges and info.etag


def test_rate_limit_per_download(nginx_origin: NginxOrigin, random_file, tmp_path: Path) -> None:
    want = random_file(nginx_origin.data_dir / "rl.bin", 8 * MiB, seed=9)
    t0 = time.monotonic()
    r = download(nginx_origin.url("rl.bin"), tmp_path / "rl.part", TransferOptions(rate_limit=4 * MiB))
    elapsed = time.monotonic() - t0
    assert r.sha256 == want
    assert 1.7 <= elapsed < 8, elapsed


def test_shared_limiter_across_threads(nginx_origin: NginxOrigin, random_file, tmp_path: Path) -> None:
    """Two downloads in two threads (two event loops) share one 4 MiB/s bucket: 8 MiB take ~2 s."""
    wants = [random_file(nginx_origin.data_dir / f"shared{i}.bin", 4 * MiB, seed=20 + i) for i in range(2)]
    limiter = RateLimiter(4 * MiB)
    results: dict[int, str] = {}

    def run(i: int) -> None:
        r = download(nginx_origin.url(f"shared{i}.bin"), tmp_path / f"s{i}.part", TransferOptions(limiter=limiter))
        results[i] = r.sha256

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    elapsed = time.monotonic() - t0
    assert results == {0: wants[0], 1: wants[1]}
    assert 1.7 <= elapsed < 8, elapsed


def test_cancel_keeps_partial_then_resume(nginx_origin: NginxOrigin, random_file, tmp_path: Path) -> None:
    size = 16 * MiB
    want = random_file(nginx_origin.data_dir / "cancel.bin", size, seed=10)
    part = tmp_path / "c.part"
    token = CancelToken()

    def on_progress(done: int, total: int | None) -> None:
        if done >= size // 3:
            token.cancel()

    t0 = time.monotonic()
    with pytest.raises(Cancelled):
        download(nginx_origin.url("slow/cancel.bin"), part, TransferOptions(connections=4),
                 progress=on_progress, cancel=token)
    assert time.monotonic() - t0 < 10
    assert part.exists() and state_path(part).exists()
    state = PartState.load(state_path(part))
    assert state is not None and 0 < state.done_bytes() < size
    r = download(nginx_origin.url("slow/cancel.bin"), part, TransferOptions(connections=4))
    assert r.sha256 == want
    assert r.resumed_bytes == state.done_bytes()
    assert r.bytes_downloaded + r.resumed_bytes >= size
    assert r.bytes_downloaded <= size - state.done_bytes() + 4 * 512 * 1024


def test_discard_partial_removes_part_and_state(tmp_path: Path) -> None:
    part = tmp_path / "x.part"
    part.write_bytes(b"abc")
    PartState("k", 3, None, None, [(0, 1)]).save(state_path(part))
    discard_partial(part)
    discard_partial(part)  # idempotent
    assert not part.exists() and not state_path(part).exists()


def test_copy_file(tmp_path: Path, random_file) -> None:
    src = tmp_path / "src.bin"
    want = random_file(src, 40 * MiB + 5, seed=11)
    calls: list[int] = []
    r = copy_file(src, tmp_path / "dst.part", progress=lambda d, t: calls.append(d))
    assert r.sha256 == want == sha(tmp_path / "dst.part") and r.size == 40 * MiB + 5
    assert calls[-1] == r.size
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    assert copy_file(empty, tmp_path / "e.part").sha256 == hashlib.sha256(b"").hexdigest()


def test_copy_file_cancel(tmp_path: Path, random_file) -> None:
    src = tmp_path / "src.bin"
    random_file(src, 8 * MiB, seed=12)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        copy_file(src, tmp_path / "dst.part", cancel=token)


def test_segment_table_work_stealing_and_prefix() -> None:
    t = SegmentTable.fresh(100 * MiB)
    a = t.take("a", 4 * MiB, MiB)
    b = t.take("b", 4 * MiB, MiB)
    assert a is not None and b is not None and (a.start, a.end, b.start, b.end) == (0, 4 * MiB, 4 * MiB, 8 * MiB)
    a.pos = a.end
    a.owner = None
    assert t.prefix() == 4 * MiB
    rest = t.take("c", 200 * MiB, MiB)  # the whole unowned remainder
    assert rest is not None and rest.end == 100 * MiB
    stolen = t.take("d", 4 * MiB, MiB)  # nothing unowned: half of the largest remaining segment
    assert stolen is not None and stolen.end == 100 * MiB and rest.end == stolen.start
    assert sorted((s.start, s.end) for s in t.segments) == [(s.start, s.end) for s in t.segments]
    assert sum(s.end - s.start for s in t.segments) == 100 * MiB
    t2 = SegmentTable.from_done(10, [(0, 3), (5, 7)])
    assert [(s.start, s.pos, s.end) for s in t2.segments] == [(0, 3, 3), (3, 3, 5), (5, 7, 7), (7, 7, 10)]
    assert t2.prefix() == 3 and t2.done_intervals() == [(0, 3), (5, 7)]
