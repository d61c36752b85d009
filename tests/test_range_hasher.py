"""fsutil.RangeHasher: the sha256 of a file hashed as far as it is written, through a mapping or by reads."""

from __future__ import annotations

import hashlib
import mmap
import os
import threading
from pathlib import Path

import pytest

from comfy_autocloud import fsutil
from comfy_autocloud.fsutil import RangeHasher, sha256_of

MiB = 2**20


def test_whole_file_and_an_empty_one(tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 17)
    (tmp_path / "f").write_bytes(data)
    (tmp_path / "empty").write_bytes(b"")
    assert sha256_of(tmp_path / "f") == hashlib.sha256(data).hexdigest()
    assert sha256_of(tmp_path / "empty") == hashlib.sha256(b"").hexdigest()


def test_follows_a_growing_file_in_small_and_large_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsutil, "HASH_SLICE", MiB)  # several slices per call
    path = tmp_path / "growing.part"
    data = os.urandom(5 * MiB + 3)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        hasher = RangeHasher(fd)
        written = 0
        for step in (1, 4096, MiB - 7, 3 * MiB, 5 * MiB + 3):  # the file grows between calls: remapped
            os.pwrite(fd, data[written:step], written)
            written = step
            before = hasher.done
            assert hasher.update_to(written) == written - before and hasher.done == written
        hasher.close()
        assert hasher.hexdigest() == hashlib.sha256(data).hexdigest()
    finally:
        os.close(fd)


def test_reads_where_the_file_cannot_be_mapped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(20 * MiB + 1)  # more than one fallback read
    (tmp_path / "f").write_bytes(data)

    def refuse(*args: object, **kwargs: object) -> mmap.mmap:
        raise OSError("no mmap on this file system")

    monkeypatch.setattr(mmap, "mmap", refuse)
    assert sha256_of(tmp_path / "f") == hashlib.sha256(data).hexdigest()


def test_stops_between_slices_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsutil, "HASH_SLICE", MiB)
    (tmp_path / "f").write_bytes(os.urandom(4 * MiB))
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        hasher = RangeHasher(fd)
        stop = threading.Event()
        calls = []

        def stop_after_two() -> bool:
            calls.append(1)
            if len(calls) > 2:
                stop.set()
            return stop.is_set()

        assert hasher.update_to(4 * MiB, stop_after_two) == 2 * MiB
        hasher.close()
    finally:
        os.close(fd)
