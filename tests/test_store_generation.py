"""The index generation (store/generation.py): a token every commit to the index changes, read without SQLite.

The warmup rerun memo trusts it to say that nothing was committed since it was written.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from comfy_autocloud.store import Store
from comfy_autocloud.store import generation as gen_mod
from comfy_autocloud.store.generation import WAL_INDEX_HEADER, index_generation, index_path


def test_the_generation_moves_with_every_commit_and_only_then(tmp_path: Path) -> None:
    with Store(tmp_path / "cache") as store:
        (tmp_path / "cache" / "checkpoints").mkdir()
        (tmp_path / "cache" / "checkpoints" / "x.bin").write_bytes(b"x" * 100)
        store.adopt("checkpoints/x.bin")
        first = index_generation(store.root)
        assert first is not None and ":wal:" in first
        assert store.lookup("checkpoints/x.bin") is not None and store.entries()  # reads commit nothing
        assert index_generation(store.root) == first
        store.touch("checkpoints/x.bin")  # an access another process records is a commit too
        second = index_generation(store.root)
        assert second not in (None, first)
        store.pin("checkpoints/x.bin")
        assert index_generation(store.root) not in (None, first, second)


def test_a_torn_or_missing_wal_index_gives_no_generation(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    shm = Path(f"{index_path(store.root)}-shm")
    header = shm.read_bytes()[: 2 * WAL_INDEX_HEADER]
    assert index_generation(store.root) is not None
    with open(shm, "r+b") as fh:  # a writer between the two copies of the header
        fh.seek(WAL_INDEX_HEADER + 8)
        fh.write(bytes([header[WAL_INDEX_HEADER + 8] ^ 0xFF]))
    assert index_generation(store.root) is None
    with open(shm, "r+b") as fh:
        fh.write(header)
    store.close()  # the last connection folds the WAL in and removes it: the database file alone
    assert not Path(f"{index_path(store.root)}-wal").exists()
    assert index_generation(store.root) is None  # just written: its coarse timestamps could repeat
    assert index_generation(tmp_path / "elsewhere") is None


def test_a_still_database_file_is_its_own_generation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Store(tmp_path / "cache").close()
    monkeypatch.setattr(gen_mod, "STILL_NS", 0)
    closed = index_generation(tmp_path / "cache")
    assert closed is not None and ":db:" in closed
    with Store(tmp_path / "cache") as store:  # a connection brings the WAL back: another token
        assert index_generation(store.root) not in (None, closed)


HOLDS_WAL_INDEX = """
import fcntl, sys
with open(sys.argv[1], "r+b") as fh:
    try:  # the wal-index's lock bytes (SQLite's unix VFS: 120-135, the 'someone has it open' byte is 128)
        fcntl.lockf(fh, fcntl.LOCK_EX | fcntl.LOCK_NB, 16, 120)
    except OSError:
        sys.exit(0)  # another process holds it: as SQLite sees a live connection
    sys.exit(1)
"""


def _another_process_sees_a_connection(shm: Path) -> bool:
    return subprocess.run([sys.executable, "-c", HOLDS_WAL_INDEX, str(shm)], timeout=60).returncode == 0


def test_reading_the_generation_keeps_this_processs_sqlite_locks(tmp_path: Path) -> None:
    """Closing a descriptor drops every POSIX lock the process holds on that file. Reading the generation
    once opened and closed the wal-index, so a process with the index open (warmup writing its memo) lost
    its hold: the next process to open the index rebuilt the wal-index under it ("disk I/O error")."""
    with Store(tmp_path / "cache") as store:
        shm = Path(f"{index_path(store.root)}-shm")
        assert _another_process_sees_a_connection(shm)
        for _ in range(3):
            assert index_generation(store.root) is not None
        assert _another_process_sees_a_connection(shm)
    # the WAL removed with the last connection and started anew: read from the new file, not the old one
    with Store(tmp_path / "cache") as store:
        (tmp_path / "cache" / "checkpoints").mkdir()
        (tmp_path / "cache" / "checkpoints" / "x.bin").write_bytes(b"x" * 10)
        before = index_generation(store.root)
        store.adopt("checkpoints/x.bin")
        assert index_generation(store.root) not in (None, before)
        assert _another_process_sees_a_connection(Path(f"{index_path(store.root)}-shm"))
