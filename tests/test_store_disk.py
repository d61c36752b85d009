"""Disk-full behaviour on a real, small tmpfs: refuse before downloading, never corrupt what is cached."""

from __future__ import annotations

import errno
import hashlib
from pathlib import Path

import pytest

from comfy_autocloud.errors import IntegrityError, NotEnoughSpace
from comfy_autocloud.store import Store
from mounts import tmpfs
from servers import safetensors_of

MiB = 2**20


def blob(tag: str, size: int) -> bytes:
    """A valid safetensors file of `size` bytes (the store checks model files' format) named by `tag`."""
    return safetensors_of(hashlib.sha256(tag.encode()).digest(), size)


def put(store: Store, key: str, data: bytes, **kw: object) -> None:
    part = store.partial_path(key)
    part.write_bytes(data)
    store.commit(key, part, size=len(data), sha256=hashlib.sha256(data).hexdigest(), source="s",
                 **kw)  # type: ignore[arg-type]


def test_reserve_refuses_on_disk_free_and_evicts_when_that_helps(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs") as fs:
        s = Store(fs / "cache", min_free_disk=4 * MiB)  # no cap: only the disk limits
        put(s, "checkpoints/pinned.safetensors", blob("p", 24 * MiB), pin=True)
        put(s, "checkpoints/cold.safetensors", blob("c", 20 * MiB))
        with pytest.raises(NotEnoughSpace) as info:
            s.reserve("checkpoints/huge.safetensors", 48 * MiB)
        assert info.value.subject == "checkpoints/huge.safetensors"
        assert "needs 48.0 MiB + 4.0 MiB kept free" in info.value.reason and "free at" in info.value.reason
        assert s.lookup("checkpoints/cold.safetensors") is not None  # nothing evicted for nothing
        # 30 MiB fits once the cold file goes.
        with s.reserve("checkpoints/next.safetensors", 30 * MiB) as r:
            assert [e.key for e in r.evicted] == ["checkpoints/cold.safetensors"]
            part = s.partial_path("checkpoints/next.safetensors")
            data = blob("n", 30 * MiB)
            part.write_bytes(data)
            s.commit("checkpoints/next.safetensors", part, size=len(data),
                     sha256=hashlib.sha256(data).hexdigest(), source="s")
        assert s.verify(rehash=True, fix=False).ok
        s.close()


def test_download_hitting_enospc_leaves_index_and_files_intact(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "fs") as fs:
        s = Store(fs / "cache", min_free_disk=0)
        keep = blob("keep", 40 * MiB)
        put(s, "checkpoints/keep.safetensors", keep, pin=True)
        key = "checkpoints/toolarge.safetensors"
        part = s.partial_path(key)
        with pytest.raises(OSError) as info, open(part, "wb") as fh:  # what the transfer engine meets
            for _ in range(40):
                fh.write(blob("chunk", MiB))
                fh.flush()
        assert info.value.errno == errno.ENOSPC
        with pytest.raises(IntegrityError):
            s.commit(key, part, size=40 * MiB, sha256="0" * 64, source="s")
        assert not s.path_for(key).exists()
        assert [e.key for e in s.entries()] == ["checkpoints/keep.safetensors"]
        assert s.path_for("checkpoints/keep.safetensors").read_bytes() == keep
        part.unlink()
        assert s.verify(rehash=True, fix=False).ok
        s.close()


def test_commit_copy_onto_full_folder_mount_fails_cleanly(tmp_path: Path) -> None:
    """A model folder that is its own small filesystem: rename becomes copy, and the copy hits ENOSPC."""
    s = Store(tmp_path / "cache", min_free_disk=0)
    with tmpfs(s.root / "checkpoints", "64m"):
        keep = blob("keep", 40 * MiB)
        put(s, "checkpoints/keep.safetensors", keep)  # copied across filesystems
        key = "checkpoints/second.safetensors"
        data = blob("second", 30 * MiB)
        part = s.partial_path(key)
        part.write_bytes(data)
        with pytest.raises(NotEnoughSpace, match="disk full while copying"):
            s.commit(key, part, size=len(data), sha256=hashlib.sha256(data).hexdigest(), source="s")
        assert part.read_bytes() == data  # the verified download is kept for a retry
        assert sorted(p.name for p in (s.root / "checkpoints").iterdir()) == ["keep.safetensors"]  # no temp
        assert [e.key for e in s.entries()] == ["checkpoints/keep.safetensors"]
        assert s.path_for("checkpoints/keep.safetensors").read_bytes() == keep
        # reserve() checks the folder's own filesystem and frees space there first.
        with s.reserve(key, len(data)) as r:
            assert [e.key for e in r.evicted] == ["checkpoints/keep.safetensors"]
            s.commit(key, part, size=len(data), sha256=hashlib.sha256(data).hexdigest(), source="s")
        assert s.path_for(key).read_bytes() == data
        assert s.verify(rehash=True, fix=False).ok
        s.close()
