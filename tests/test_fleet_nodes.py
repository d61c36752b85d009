"""Fleet end to end: real redis-server, nginx origin, nodes as separate processes on loopback."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from comfy_autocloud.fsutil import sha256_of
from comfy_autocloud.store import Store
from redis_server import TOKEN, FleetNode, RedisServer, redis_running
from servers import NginxOrigin, http_get, nginx_running, write_random_file

MiB = 2**20
KEY = "checkpoints/model.safetensors"
pytestmark = [
    pytest.mark.skipif(not RedisServer.available(),
                       reason="redis-server is not installed (apt-get install redis-server)"),
    pytest.mark.skipif(not NginxOrigin.available(), reason="nginx is not installed (apt-get install nginx-light)"),
]




def finish(proc, timeout: float = 60.0) -> dict:  # type: ignore[no-untyped-def]
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"fetch failed ({proc.returncode}): {out}\n{err[-3000:]}"
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def fleet_env(tmp_path: Path) -> Iterator[tuple[RedisServer, NginxOrigin, list[FleetNode]]]:
    nodes: list[FleetNode] = []
    with redis_running(tmp_path / "redis") as redis, \
            nginx_running(tmp_path / "www", tmp_path / "nginx", limit_rate="8m") as origin:
        try:
            yield redis, origin, nodes
        finally:
            for n in nodes:
                n.stop()


def test_four_nodes_origin_serves_once(fleet_env, tmp_path: Path) -> None:
    redis, origin, nodes = fleet_env
    size = 96 * MiB + 777
    sha = write_random_file(origin.data_dir / "model.safetensors", size, seed=1)
    nodes += [FleetNode(f"n{i}", tmp_path, redis.url).start_peer() for i in range(4)]
    t0 = time.monotonic()
    procs = [n.fetch(origin.url("slow/model.safetensors"), extra=("--connections", "8")) for n in nodes]
    results = [finish(p) for p in procs]
    took = time.monotonic() - t0
    for n, r in zip(nodes, results, strict=True):
        assert r["sha256"] == sha
        assert sha256_of(n.final(KEY)) == sha
        assert Store(n.cache).lookup(KEY) is not None
        partial = Store(n.cache).private / "partial"
        assert not (list(partial.iterdir()) if partial.exists() else []), "records left after the commit"
    served = origin.bytes_served("slow/model.safetensors")
    assert served <= 1.05 * size, f"origin served {served / size:.2f}x the file"
    sources = sorted(r["source"] for r in results)
    assert sum(s.startswith(("peer ", "peers ")) for s in sources) == 3, sources
    print(f"4 nodes in {took:.2f}s, origin {served / size:.3f}x, sources {sources}")


def lease_holder(redis: RedisServer) -> str | None:
    import redis as redis_py

    value = redis_py.Redis.from_url(redis.url, decode_responses=True).get(f"autocloud:lease:{KEY}")
    return value.split(" ")[0] if value else None


def recorded(node: FleetNode) -> int:
    from comfy_autocloud.transfer.ranges import PartState, state_path

    state = PartState.load(state_path(Store(node.cache).partial_path(KEY)))
    return state.done_bytes() if state else 0


def wait_until(cond, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_origin_holder_killed_another_takes_over(fleet_env, tmp_path: Path) -> None:
    redis, origin, nodes = fleet_env
    size = 64 * MiB + 5
    sha = write_random_file(origin.data_dir / "model.safetensors", size, seed=2)
    nodes += [FleetNode(f"k{i}", tmp_path, redis.url).start_peer() for i in range(3)]
    url = origin.url("slow/model.safetensors")  # 8 MB/s per connection, 2 connections: ~4 s for the file
    procs = {n.name: n.fetch(url, extra=("--connections", "2")) for n in nodes}
    wait_until(lambda: lease_holder(redis) is not None, 20, "a lease holder")
    first = lease_holder(redis)
    victim = next(n for n in nodes if n.name == first)
    wait_until(lambda: recorded(victim) >= 0.25 * size, 20, "the holder to reach 25%")
    victim.kill()
    survivors = [n for n in nodes if n is not victim]
    results = [finish(procs[n.name], timeout=60) for n in survivors]
    for n, r in zip(survivors, results, strict=True):
        assert r["sha256"] == sha
        assert sha256_of(n.final(KEY)) == sha
    # the killed node: nothing at the final path, nothing indexed, only a resumable .part
    assert not victim.final(KEY).exists()
    assert Store(victim.cache).lookup(KEY) is None
    sources = sorted(r["source"] for r in results)
    assert sum(s.startswith("http://") for s in sources) == 1, sources  # exactly one took over the origin
    assert sum(s.startswith(("peer ", "peers ")) for s in sources) == 1, sources
    assert lease_holder(redis) is None  # released after the takeover
    assert origin.bytes_served("slow/model.safetensors") <= 2.05 * size


def test_lying_peer_caught_marked_bad_and_skipped(fleet_env, tmp_path: Path) -> None:
    import redis as redis_py

    redis, origin, nodes = fleet_env
    size = 12 * MiB + 3
    sha = write_random_file(origin.data_dir / "model.safetensors", size, seed=3)
    url = origin.url("model.safetensors")
    liar, honest, third = (FleetNode(n, tmp_path, redis.url).start_peer() for n in ("liar", "honest", "third"))
    nodes += [liar, honest, third]
    assert finish(liar.fetch(url))["sha256"] == sha
    # its copy rots on disk (same size, other bytes) while Redis still lists it as a verified holder
    with open(liar.final(KEY), "r+b") as f:
        f.seek(size // 2)
        block = f.read(4096)
        f.seek(size // 2)
        f.write(bytes(b ^ 0xFF for b in block))
    r = finish(honest.fetch(url))
    assert r["sha256"] == sha and r["source"].startswith("http://"), r
    assert sha256_of(honest.final(KEY)) == sha
    client = redis_py.Redis.from_url(redis.url, decode_responses=True)
    assert client.exists("autocloud:bad:liar"), "the lying peer must be marked bad in Redis"
    assert 0 < client.pttl("autocloud:bad:liar") <= 600_000
    served_before = origin.bytes_served("model.safetensors")
    r3 = finish(third.fetch(url))
    assert r3["sha256"] == sha and r3["source"] == "peer honest", r3
    assert origin.bytes_served("model.safetensors") == served_before
    status = json.loads(__import__("subprocess").run(
        [__import__("sys").executable, "-m", "comfy_autocloud.cli.main", "fleet", "status", "--key", KEY, "--json"],
        env=third.env(), capture_output=True, text=True, check=True).stdout)
    holders = {h["node"] for h in status["files"][KEY]["holders"]}
    assert holders == {"honest", "third"}, holders  # the bad node is not offered


def peer_files_bytes(node: FleetNode) -> int:
    """Bytes of verified files this node's peer server has sent (its /metrics counter)."""
    status, body = http_get(f"http://127.0.0.1:{node.port}/metrics", {"Authorization": f"Bearer {TOKEN}"})
    assert status == 200, body
    m = re.search(rb'autocloud_peer_bytes_served_total\{node="[^"]+",route="files"\} (\d+)', body)
    assert m, body
    return int(m.group(1))


def three_holders(fleet_env, tmp_path: Path, size: int, seed: int):  # type: ignore[no-untyped-def]
    """a from the origin, b and c from peers: three verified copies; then d, which has none."""
    redis, origin, nodes = fleet_env
    sha = write_random_file(origin.data_dir / "model.safetensors", size, seed=seed)
    url = origin.url("model.safetensors")
    a, b, c, d = (FleetNode(n, tmp_path, redis.url).start_peer() for n in "abcd")
    nodes += [a, b, c, d]
    for n in (a, b, c):
        assert finish(n.fetch(url))["sha256"] == sha
    assert origin.bytes_served("model.safetensors") == size
    return sha, url, (a, b, c, d)


def test_ranges_from_several_peers_at_once(fleet_env, tmp_path: Path) -> None:
    _, origin, _ = fleet_env
    size = 40 * MiB + 11
    sha, url, (a, b, c, d) = three_holders(fleet_env, tmp_path, size, seed=21)
    before = {n.name: peer_files_bytes(n) for n in (a, b, c)}
    r = finish(d.fetch(url))
    assert r["sha256"] == sha and sha256_of(d.final(KEY)) == sha
    assert r["source"].startswith("peers "), r  # one download spread over the holders
    sent = {n.name: peer_files_bytes(n) - before[n.name] for n in (a, b, c)}
    assert all(v > 0 for v in sent.values()), sent
    # every byte from the peers, none from the origin (a request cut short by a steal may have sent a bit more)
    assert size <= sum(sent.values()) <= 1.1 * size, sent
    assert origin.bytes_served("model.safetensors") == size


def test_peer_sending_wrong_ranges_is_found_and_marked_bad(fleet_env, tmp_path: Path) -> None:
    import redis as redis_py

    redis, origin, _ = fleet_env
    size = 40 * MiB + 11
    sha, url, (_, b, _, d) = three_holders(fleet_env, tmp_path, size, seed=22)
    # b's copy rots everywhere (same size, other bytes) while Redis still lists it as a verified holder
    with open(b.final(KEY), "r+b") as f:
        for pos in range(0, size, 1 << 20):
            f.seek(pos)
            f.write(b"\xff" * min(4096, size - pos))
    r = finish(d.fetch(url))
    assert r["sha256"] == sha and sha256_of(d.final(KEY)) == sha, r
    client = redis_py.Redis.from_url(redis.url, decode_responses=True)
    assert client.exists("autocloud:bad:b"), "the peer that sent wrong ranges must be marked bad"
    assert not client.exists("autocloud:bad:a") and not client.exists("autocloud:bad:c")
    assert origin.bytes_served("model.safetensors") == size  # the origin never saw the fourth node
    assert not list(Store(d.cache).partial_path(KEY).parent.glob("*.suspect")), "mixed bytes left behind"


def test_redis_killed_mid_run_nodes_go_on_alone(fleet_env, tmp_path: Path) -> None:
    redis, origin, nodes = fleet_env
    size = 48 * MiB + 11
    sha = write_random_file(origin.data_dir / "model.safetensors", size, seed=4)
    nodes += [FleetNode(f"r{i}", tmp_path, redis.url).start_peer() for i in range(3)]
    url = origin.url("slow/model.safetensors")
    procs = [n.fetch(url, extra=("--connections", "2")) for n in nodes]
    wait_until(lambda: any(recorded(n) >= 0.2 * size for n in nodes), 20, "20% somewhere")
    redis.kill()
    t0 = time.monotonic()
    results = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err[-3000:]
        results.append(json.loads(out.strip().splitlines()[-1]))
        assert err.count("is unreachable") <= 1, err  # logged once per process, not per request
    assert time.monotonic() - t0 < 30
    for n, r in zip(nodes, results, strict=True):
        assert r["sha256"] == sha and sha256_of(n.final(KEY)) == sha
    # a node fetching after Redis is gone works alone too
    late = FleetNode("late", tmp_path, redis.url).start_peer()
    nodes.append(late)
    p = late.fetch(origin.url("model.safetensors"))
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and json.loads(out.splitlines()[-1])["sha256"] == sha
    assert err.count("is unreachable") == 1, err
    time.sleep(0.5)
    for n in nodes:
        assert n.peer is not None and n.peer.poll() is None, f"peer server of {n.name} died: {n.peer_log()[-2000:]}"
        assert n.peer_log().count("is unreachable") <= 1, n.peer_log()
