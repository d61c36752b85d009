"""verify(): orphans, missing files, stale leftovers of dead downloads, size/sha256 mismatch -> quarantine."""

from __future__ import annotations

import fcntl
import hashlib
import os
import time
from pathlib import Path

from comfy_autocloud.store import Store
from servers import safetensors_of

MiB = 2**20


def put(store: Store, key: str, data: bytes) -> None:
    part = store.partial_path(key)
    part.write_bytes(data)
    store.commit(key, part, size=len(data), sha256=hashlib.sha256(data).hexdigest(), source="s")


def make_old(*paths: Path) -> None:
    t = time.time() - 3 * 3600
    for p in paths:
        os.utime(p, (t, t))


def kinds(report) -> list[tuple[str, str | None, bool]]:
    return sorted((f.kind, f.key, f.fixed) for f in report.findings)


def test_verify_finds_and_fixes_each_kind(tmp_path: Path) -> None:
    s = Store(tmp_path / "c")
    put(s, "checkpoints/good.safetensors", safetensors_of(b"good", 400))
    put(s, "checkpoints/gone.safetensors", safetensors_of(b"gone", 400))
    put(s, "loras/rot.safetensors", safetensors_of(b"rot!", 400))
    put(s, "loras/short.safetensors", safetensors_of(b"long", 400))
    s.path_for("checkpoints/gone.safetensors").unlink()
    s.path_for("loras/rot.safetensors").write_bytes(safetensors_of(b"ROT!", 400))  # same size, other bytes (bit rot)
    s.path_for("loras/short.safetensors").write_bytes(b"cut")
    orphan = s.root / "vae" / "mine.safetensors"
    orphan.parent.mkdir()
    orphan.write_bytes(b"a user's own file")
    # Leftovers of a download killed long ago, and of one running now.
    dead_part = s.partial_path("checkpoints/dead.safetensors")
    dead_part.write_bytes(b"x" * 10)
    dead_state = dead_part.with_name(dead_part.name + ".state")
    dead_state.write_text("{}")
    dead_lock = s.lock_path("checkpoints/dead.safetensors")
    dead_lock.write_text("123\n")
    live_part = s.partial_path("checkpoints/live.safetensors")
    live_part.write_bytes(b"y" * 10)
    live_lock = s.lock_path("checkpoints/live.safetensors")
    live_lock.write_text("")
    fresh_part = s.partial_path("checkpoints/fresh.safetensors")
    temp = s.root / "checkpoints" / ".good.safetensors.0123456789ab.actmp"
    temp.write_bytes(b"t")
    make_old(dead_part, dead_state, dead_lock, live_part, live_lock, temp)
    fresh_part.write_bytes(b"z")  # a download that just started and holds no lock yet
    holder = os.open(live_lock, os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        dry = s.verify(rehash=True, fix=False)
        assert not dry.ok
        assert kinds(dry) == [
            ("missing", "checkpoints/gone.safetensors", False),
            ("orphan", "vae/mine.safetensors", False),
            ("sha256_mismatch", "loras/rot.safetensors", False),
            ("size_mismatch", "loras/short.safetensors", False),
            ("stale_lock", None, False),
            ("stale_partial", None, False),
            ("stale_partial", None, False),
            ("stale_temp", None, False),
        ]
        assert dead_part.exists() and len(s.entries()) == 4  # --no-fix changes nothing

        fixed = s.verify(rehash=True, fix=True)
        assert [f.kind for f in fixed.problems] == []
        assert fixed.ok  # the orphan is reported, not a remaining problem
        assert [f.path for f in fixed.findings if f.kind == "orphan"] == [str(orphan)]
    finally:
        os.close(holder)
    assert orphan.exists()
    assert not dead_part.exists() and not dead_state.exists() and not dead_lock.exists() and not temp.exists()
    assert live_part.exists() and live_lock.exists() and fresh_part.exists()
    assert [e.key for e in s.entries()] == ["checkpoints/good.safetensors"]
    quarantined = sorted(p.name.split("-", 2)[2] for p in (s.private / "quarantine").iterdir())
    assert quarantined == ["rot.safetensors", "short.safetensors"]
    assert not s.path_for("loras/rot.safetensors").exists()
    fresh_part.unlink()
    again = s.verify(rehash=True)  # the download holding the lock has ended: its leftovers go now
    assert again.ok
    assert kinds(again) == [("orphan", "vae/mine.safetensors", False), ("stale_lock", None, True),
                            ("stale_partial", None, True)]
    assert not live_part.exists() and not live_lock.exists()
    s.close()


def test_verify_drops_rows_of_dead_processes(tmp_path: Path) -> None:
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    s = Store(tmp_path / "c")
    s._index.execute("INSERT INTO reservations(key, nbytes, pid, pstart, created) VALUES(?,?,?,?,?)",
                     ("loras/x.safetensors", 5, p.pid, "1", time.time()))
    s._index.execute("INSERT INTO leases(key, pid, pstart, token, created) VALUES(?,?,?,?,?)",
                     ("loras/x.safetensors", p.pid, "1", "tok", time.time()))
    r = s.verify()
    assert r.ok and kinds(r) == [("dead_lease", "loras/x.safetensors", True),
                                 ("dead_reservation", "loras/x.safetensors", True)]
    assert s._index.conn().execute("SELECT COUNT(*) FROM leases").fetchone()[0] == 0
    s.close()


def test_verify_notices_a_file_replaced_by_hand(tmp_path: Path) -> None:
    s = Store(tmp_path / "c")
    put(s, "vae/v.safetensors", safetensors_of(b"v", 96))
    path = s.path_for("vae/v.safetensors")
    tmp = path.with_name("new")
    tmp.write_bytes(safetensors_of(b"w", 96))
    os.replace(tmp, path)
    r = s.verify()
    assert r.ok and kinds(r) == [("inode_changed", "vae/v.safetensors", True)]
    assert kinds(s.verify()) == []
    bad = s.verify(rehash=True)
    assert kinds(bad) == [("sha256_mismatch", "vae/v.safetensors", True)]
    s.close()


def test_folder_alias_inside_the_cache_is_not_an_orphan(tmp_path: Path) -> None:
    s = Store(tmp_path / "c")
    (s.root / "diffusion_models").mkdir()
    (s.root / "unet").symlink_to("diffusion_models", target_is_directory=True)
    put(s, "unet/u.safetensors", safetensors_of(b"u", 96))
    assert (s.root / "diffusion_models" / "u.safetensors").exists()
    assert kinds(s.verify()) == []
    s.close()
