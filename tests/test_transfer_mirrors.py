"""Ranges from several URLs serving the same bytes (fleet peers): spread, and failing mirrors dropped."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest

from comfy_autocloud.errors import TransferError
from comfy_autocloud.transfer import Mirror, RetryPolicy, TransferOptions, download
from servers import Behaviour, ChaosOrigin, NginxOrigin, free_port, random_bytes

MiB = 2**20
FAST = RetryPolicy(attempts=2, backoff_base=0.01, backoff_max=0.05)


def test_ranges_spread_over_mirrors(nginx_origin: NginxOrigin, tmp_path: Path) -> None:
    data = random_bytes(24 * MiB + 5, seed=11)
    for name in ("a.bin", "b.bin", "c.bin"):
        (nginx_origin.data_dir / name).write_bytes(data)
    nginx_origin.clear_log()
    mirrors = (Mirror(nginx_origin.url("b.bin"), display="b"), Mirror(nginx_origin.url("c.bin"), display="c"))
    res = download(nginx_origin.url("a.bin"), tmp_path / "x.part",
                   TransferOptions(connections=6, mirrors=mirrors, retry=FAST))
    assert res.sha256 == hashlib.sha256(data).hexdigest()
    assert (tmp_path / "x.part").read_bytes() == data
    served = {n: nginx_origin.bytes_served(n) for n in ("a.bin", "b.bin", "c.bin")}
    assert all(v > 0 for v in served.values()), served  # every source carried part of the file
    # Every byte written once; the servers may count a little more (the tail of a request cut short when
    # a free worker takes over half of its piece was already on the wire).
    assert sum(res.by_source.values()) == len(data) and set(res.by_source) >= {"b", "c"}, res.by_source
    assert len(data) <= sum(served.values()) <= 1.1 * len(data), served


def test_mirror_headers_replace_the_calls(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    data = random_bytes(8 * MiB, seed=12)
    primary = chaos_origin.add("p.bin", Behaviour(data=data))
    mirror = chaos_origin.add("m.bin", Behaviour(data=data))
    opts = TransferOptions(connections=4, headers={"Authorization": "Bearer PRIMARYTOKEN"},
                           mirrors=(Mirror(mirror, {"Authorization": "Bearer MIRRORTOKEN"}),), retry=FAST)
    download(primary, tmp_path / "x.part", opts)
    seen = chaos_origin.seen_for("m.bin")
    assert seen and all(s.headers.get("Authorization") == "Bearer MIRRORTOKEN" for s in seen)
    assert all("If-Range" not in s.headers for s in seen)  # mirrors have their own validators


@pytest.mark.parametrize("how", ["404", "refused", "other size", "no ranges", "reset mid-body"])
def test_failing_mirror_is_dropped_and_others_finish(chaos_origin: ChaosOrigin, tmp_path: Path, how: str,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    data = random_bytes(16 * MiB + 7, seed=13)
    good = chaos_origin.add("good.bin", Behaviour(data=data))
    other = chaos_origin.add("other.bin", Behaviour(data=data))
    bad = {
        "404": lambda: chaos_origin.url("nothing-here.bin"),
        "refused": lambda: f"http://127.0.0.1:{free_port()}/x.bin",
        "other size": lambda: chaos_origin.add("short.bin", Behaviour(data=data[:-1])),
        "no ranges": lambda: chaos_origin.add("norange.bin", Behaviour(data=data, ranges=False)),
        "reset mid-body": lambda: chaos_origin.add(
            "reset.bin", Behaviour(data=data, reset_after=300_000, reset_times=10_000)),
    }[how]()
    mirrors = (Mirror(bad, display="bad-mirror"), Mirror(other, display="other"))
    with caplog.at_level(logging.WARNING, logger="comfy_autocloud.transfer"):
        res = download(good, tmp_path / "x.part", TransferOptions(connections=6, mirrors=mirrors, retry=FAST))
    assert res.sha256 == hashlib.sha256(data).hexdigest()
    assert "dropping source bad-mirror" in caplog.text
    assert res.by_source.get("bad-mirror", 0) < len(data)
    if how == "reset mid-body":
        assert res.by_source.get("bad-mirror", 0) > 0  # it delivered something before breaking


def test_last_source_failing_is_an_error(chaos_origin: ChaosOrigin, tmp_path: Path) -> None:
    data = random_bytes(4 * MiB, seed=14)
    # both answer HEAD, then break every body before its first byte
    primary = chaos_origin.add("p2.bin", Behaviour(data=data, reset_after=0, reset_times=10_000))
    mirror = chaos_origin.add("m2.bin", Behaviour(data=data, reset_after=0, reset_times=10_000))
    with pytest.raises(TransferError) as exc:
        download(primary, tmp_path / "x.part", TransferOptions(connections=2, mirrors=(Mirror(mirror),), retry=FAST))
    assert "127.0.0.1" in str(exc.value)
