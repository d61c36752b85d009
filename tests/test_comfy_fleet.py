"""The ComfyUI adapter as a fleet node (no ComfyUI needed): it fetches through peers and, with
AUTOCLOUD_PEER_SERVE=1, serves its own verified files, so one ComfyUI container is a whole node."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from comfy_autocloud.comfy.runtime import Adapter
from comfy_autocloud.config import load_settings
from comfy_autocloud.manifest.spec import ModelSpec
from redis_server import TOKEN, RedisServer, redis_running
from servers import NginxOrigin, free_port, nginx_running, write_random_file

MiB = 2**20
pytestmark = pytest.mark.skipif(not (NginxOrigin.available() and RedisServer.available()),
                                reason="nginx and redis-server are needed (./dev test installs them)")


def _adapter(tmp_path: Path, name: str, redis_url: str, spec: ModelSpec, **extra: str) -> Adapter:
    env = {"AUTOCLOUD_CONFIG": str(tmp_path / "none.yaml"), "AUTOCLOUD_CACHE": str(tmp_path / name),
           "AUTOCLOUD_REDIS_URL": redis_url, "AUTOCLOUD_PEER_TOKEN": TOKEN, "AUTOCLOUD_NODE_ID": name,
           "AUTOCLOUD_FLEET_HEARTBEAT_TTL": "1.5", **extra}
    a = Adapter.create(load_settings(env=env))
    a.catalog.add([spec])
    return a


def test_comfy_node_serves_peers_and_fetches_from_them(tmp_path: Path) -> None:
    size = 12 * MiB
    with nginx_running(tmp_path / "www", tmp_path / "nginx", limit_rate="8m") as origin, \
            redis_running(tmp_path / "redis") as redis:
        sha = write_random_file(origin.data_dir / "shared.safetensors", size, seed=77)
        spec = ModelSpec(folder="checkpoints", filename="shared.safetensors", sha256=sha,
                         sources=(origin.url("slow/shared.safetensors"),))
        port = free_port()
        a = _adapter(tmp_path, "node-a", redis.url, spec, AUTOCLOUD_PEER_SERVE="1",
                     AUTOCLOUD_PEER_HOST="127.0.0.1", AUTOCLOUD_PEER_PORT=str(port))
        b = _adapter(tmp_path, "node-b", redis.url, spec)
        try:
            assert a.peer_node is not None and a.peer_node.url == f"http://127.0.0.1:{port}"
            assert b.peer_node is None  # serving is opt-in
            path_a = a.resolve_missing("checkpoints", "shared.safetensors")
            assert path_a is not None and path_a.stat().st_size == size
            fleet = b.fetch_service.fleet
            assert fleet is not None
            deadline = time.monotonic() + 10  # the heartbeat announces node-a's file
            while not fleet.registry.holders(spec.key) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert [h.node for h in fleet.registry.holders(spec.key)] == ["node-a"]
            path_b = b.resolve_missing("checkpoints", "shared.safetensors")
            assert path_b is not None and path_b.read_bytes() == path_a.read_bytes()
            assert origin.bytes_served("/slow/shared.safetensors") == size  # node-b took it from node-a
        finally:
            b.close()
            a.close()


def test_broken_fleet_config_means_alone_not_broken(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    env = {"AUTOCLOUD_CONFIG": str(tmp_path / "none.yaml"), "AUTOCLOUD_CACHE": str(tmp_path / "c"),
           "AUTOCLOUD_REDIS_URL": "redis://127.0.0.1:1/0"}  # no peer token: the fleet cannot be joined
    a = Adapter.create(load_settings(env=env))
    try:
        assert a.fetch_service.fleet is None and a.peer_node is None
        assert "not joining the fleet" in caplog.text and "AUTOCLOUD_PEER_TOKEN" in caplog.text
    finally:
        a.close()
