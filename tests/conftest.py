"""Shared fixtures: real origins on loopback (nginx, a chaos aiohttp server) and generated files."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from comfy_autocloud.store import Store
from servers import ChaosOrigin, NginxOrigin, stop_background, write_random_file

RandomFile = Callable[..., str]


@pytest.fixture(scope="session", autouse=True)
def no_background_left_behind(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Warmups in tests start the deferred flush (comfy_autocloud.store.settle), which waits ~35 s before it
    flushes, and the hasher of first copies: stop those still running on this session's temp dirs at the end."""
    yield
    stop_background(tmp_path_factory.getbasetemp())


@pytest.fixture(scope="session")
def nginx_origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NginxOrigin]:
    """nginx serving `origin.data_dir`; `/slow/` is limited to 2 MB/s per connection."""
    if not NginxOrigin.available():
        pytest.skip("nginx is not on PATH (apt-get install -y nginx-light)")
    base = tmp_path_factory.mktemp("nginx")
    origin = NginxOrigin(base / "data", base / "run", limit_rate="2m")
    origin.start()
    try:
        yield origin
    finally:
        origin.stop()


@pytest.fixture(scope="session")
def chaos_origin() -> Iterator[ChaosOrigin]:
    origin = ChaosOrigin().start()
    try:
        yield origin
    finally:
        origin.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    """An empty store in this test's temp dir."""
    s = Store(tmp_path / "cache")
    yield s
    s.close()


@pytest.fixture
def random_file() -> RandomFile:
    """`random_file(path, size, seed=0) -> sha256`: deterministic pseudo-random content."""

    def make(path: Path, size: int, seed: int = 0) -> str:
        return write_random_file(Path(path), size, seed)

    return make
