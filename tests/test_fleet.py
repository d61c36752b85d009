"""Fleet pieces against a real redis-server: registry, leases, GCRA limits, peer server, Redis loss."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from comfy_autocloud.fetch import FetchService
from comfy_autocloud.fleet.client import Fleet, FleetConfig
from comfy_autocloud.fleet.conn import FleetUnavailable, RedisGate
from comfy_autocloud.fleet.gcra import DownloadLimit, FleetByteLimiter
from comfy_autocloud.fleet.lease import Leases
from comfy_autocloud.fleet.peer_server import PeerLimits, PeerServer, PeerServerThread, parse_range
from comfy_autocloud.fleet.registry import Heartbeat, Holding, Registry
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.store import Store
from redis_server import TOKEN, RedisServer, redis_running
from servers import NginxOrigin, free_port, nginx_running, random_safetensors, safetensors_of, write_random_file

MiB = 2**20
pytestmark = pytest.mark.skipif(not RedisServer.available(),
                                reason="redis-server is not installed (apt-get install redis-server)")


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_running(tmp_path / "redis") as server:
        yield server


def config(redis_url: str, node: str, **kw: object) -> FleetConfig:
    base: dict[str, object] = {"redis_url": redis_url, "token": TOKEN, "node_id": node, "downloads_per_minute": None,
                               "lease_ttl": 3.0, "heartbeat_ttl": 3.0}
    base.update(kw)
    return FleetConfig(**base)  # type: ignore[arg-type]


def committed(store: Store, key: str, data: bytes) -> str:
    part = store.partial_path(key)
    part.write_bytes(data)
    sha = hashlib.sha256(data).hexdigest()
    store.commit(key, part, size=len(data), sha256=sha, source="test")
    return sha


def raw_get(port: int, path: str, headers: dict[str, str] | None = None, method: str = "GET"
            ) -> tuple[int, dict[str, str], bytes]:
    """http.client sends the path byte for byte (no client-side normalisation of `..`)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in (headers or {}).items():
            conn.putheader(k, v)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


AUTH = {"Authorization": f"Bearer {TOKEN}"}


# ---------------------------------------------------------------------------------------------- peer server

@pytest.fixture
def peer(tmp_path: Path) -> Iterator[tuple[PeerServerThread, Store, bytes, str]]:
    store = Store(tmp_path / "cache")
    data = random_safetensors(3 * MiB + 17)
    sha = committed(store, "checkpoints/a.safetensors", data)
    with PeerServerThread(PeerServer(store, TOKEN, node_id="p1")) as srv:
        yield srv, store, data, sha


def test_peer_serves_no_file_whose_sha256_is_not_known_yet(peer) -> None:  # type: ignore[no-untyped-def]
    """A warmup's first copy is committed without its hash (warmup/hash_later.py): a peer verifies what it gets
    against the ETag, so the file is not offered (nor announced) before its hash is recorded."""
    srv, store, _data, _sha = peer
    data = random_safetensors(MiB)
    part = store.partial_path("vae/w.safetensors")
    part.write_bytes(data)
    store.commit("vae/w.safetensors", part, size=len(data), sha256=None, source="file:///volume/vae/w.safetensors")
    status, _hdrs, body = raw_get(srv.port, "/v1/files/vae/w.safetensors", AUTH)
    assert status == 404 and b"sha256" in body
    store.hash_pending()
    status, hdrs, body = raw_get(srv.port, "/v1/files/vae/w.safetensors", AUTH)
    assert status == 200 and body == data and hdrs["ETag"] == f'"{hashlib.sha256(data).hexdigest()}"'


def test_peer_token_required(peer) -> None:  # type: ignore[no-untyped-def]
    srv, _store, data, sha = peer
    path = "/v1/files/checkpoints/a.safetensors"
    for headers in ({}, {"Authorization": "Bearer wrong-token-xxxxxx"}, {"Authorization": f"Basic {TOKEN}"},
                    {"Authorization": f"Bearer {TOKEN}x"}, {"Authorization": TOKEN}):
        status, hdrs, body = raw_get(srv.port, path, headers)
        assert status == 401, headers
        assert TOKEN.encode() not in body
        assert hdrs.get("WWW-Authenticate", "").startswith("Bearer")
    assert raw_get(srv.port, "/metrics")[0] == 401
    status, hdrs, body = raw_get(srv.port, path, AUTH)
    assert status == 200 and body == data and hdrs["ETag"] == f'"{sha}"'
    status, hdrs, body = raw_get(srv.port, path, {**AUTH, "Range": "bytes=100-1099"})
    assert status == 206 and body == data[100:1100]
    assert hdrs["Content-Range"] == f"bytes 100-1099/{len(data)}"
    status, hdrs, body = raw_get(srv.port, path, {**AUTH, "Range": "bytes=100-1099", "If-Range": '"other"'})
    assert status == 200 and body == data
    status, hdrs, _ = raw_get(srv.port, path, AUTH, method="HEAD")
    assert status == 200 and int(hdrs["Content-Length"]) == len(data)
    assert raw_get(srv.port, path, {**AUTH, "Range": f"bytes={len(data)}-"})[0] == 416
    status, _, text = raw_get(srv.port, "/metrics", AUTH)
    assert status == 200
    assert 'autocloud_peer_requests_total{node="p1",route="files",status="401"} 5' in text.decode()
    served = [ln for ln in text.decode().splitlines() if ln.startswith("autocloud_peer_bytes_served_total")
              and 'route="files"' in ln]
    assert served and int(served[0].rsplit(" ", 1)[1]) == 2 * len(data) + 1000
    assert TOKEN not in text.decode()


def test_public_metrics_opens_only_the_counters(tmp_path: Path) -> None:
    """AUTOCLOUD_PEER_METRICS_PUBLIC: Prometheus may scrape /metrics without the token; files still need it."""
    from comfy_autocloud.config import load_settings
    from comfy_autocloud.fleet.node import peer_limits

    store = Store(tmp_path / "cache")
    committed(store, "checkpoints/a.safetensors", random_safetensors(4096))
    settings = load_settings(env={"AUTOCLOUD_PEER_METRICS_PUBLIC": "1"})
    with PeerServerThread(PeerServer(store, TOKEN, node_id="p2", limits=peer_limits(settings))) as srv:
        status, _, text = raw_get(srv.port, "/metrics")
        assert status == 200 and b"autocloud_peer_requests_total" in text and TOKEN.encode() not in text
        assert raw_get(srv.port, "/v1/files/checkpoints/a.safetensors")[0] == 401
        assert raw_get(srv.port, "/v1/partial/checkpoints/a.safetensors")[0] == 401
        assert raw_get(srv.port, "/metrics/../v1/files/checkpoints/a.safetensors")[0] in (401, 404)


def test_peer_refuses_traversal_and_unverified(peer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    srv, store, _data, _sha = peer
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret")
    # a file placed in the cache by hand is not verified/indexed: not served
    (store.root / "checkpoints" / "unindexed.safetensors").write_bytes(b"x" * 100)
    # a symlink inside the cache pointing outside, and a folder symlinked outside
    os.symlink(secret, store.root / "checkpoints" / "link.safetensors")
    os.symlink(tmp_path, store.root / "evil")
    paths = [
        "/v1/files/../../secret.txt", "/v1/files/checkpoints/../../secret.txt",
        "/v1/files/checkpoints/..%2F..%2Fsecret.txt", "/v1/files/%2E%2E/%2E%2E/secret.txt",
        "/v1/files/%2Fetc%2Fpasswd", "/v1/files//etc/passwd", "/v1/files/checkpoints/link.safetensors",
        "/v1/files/evil/secret.txt", "/v1/files/.autocloud/index.sqlite", "/v1/files/checkpoints/unindexed.safetensors",
        "/v1/partial/checkpoints/a.safetensors/../../../secret.txt", "/v1/files/checkpoints%5C..%5C..%5Csecret.txt",
        "/v1/partial/evil/secret.txt", "/v1/partial/checkpoints/nothing.safetensors",
    ]
    for path in paths:
        status, _h, body = raw_get(srv.port, path, AUTH)
        assert status in (400, 404), (path, status)
        assert b"top secret" not in body and b"root:" not in body and b"SQLite" not in body


def test_peer_rate_limit_per_peer(tmp_path: Path) -> None:
    store = Store(tmp_path / "cache")
    committed(store, "loras/x.safetensors", safetensors_of(b"abc", 3000))
    with PeerServerThread(PeerServer(store, TOKEN, limits=PeerLimits(requests_per_s=10, burst=5))) as srv:
        t0 = time.monotonic()
        codes = []
        while time.monotonic() - t0 < 1.0:
            codes.append(raw_get(srv.port, "/v1/files/loras/x.safetensors", AUTH, method="HEAD")[0])
        elapsed = time.monotonic() - t0
    ok = codes.count(200)
    assert set(codes) <= {200, 429}
    assert ok <= 5 + 10 * elapsed + 1, (ok, elapsed)
    assert ok >= 5 + 10 * (elapsed - 0.3) - 1, (ok, elapsed)


def test_parse_range() -> None:
    assert parse_range("bytes=0-9", 100) == (0, 9)
    assert parse_range("bytes=90-", 100) == (90, 99)
    assert parse_range("bytes=-10", 100) == (90, 99)
    assert parse_range("bytes=50-500", 100) == (50, 99)
    assert parse_range("bytes=100-", 100) == "unsatisfiable"
    assert parse_range("bytes=0-1,5-6", 100) is None
    assert parse_range("bytes=x-y", 100) is None
    assert parse_range("items=0-1", 100) is None


# ---------------------------------------------------------------------------------------------- registry, leases

def test_registry_heartbeat_ttl_and_reconcile(redis: RedisServer, tmp_path: Path) -> None:
    gate = RedisGate(redis.url)
    reg = Registry(gate, "a", heartbeat_ttl=0.6)
    other = Registry(gate, "b", heartbeat_ttl=0.6)
    store = Store(tmp_path / "cache")
    sha = committed(store, "vae/v.safetensors", safetensors_of(b"v", 4096))
    beat = Heartbeat(reg, "http://127.0.0.1:1", lambda: [Holding(e.key, e.sha256, e.size) for e in store.entries()],
                     interval=0.1)
    beat.start()
    try:
        deadline = time.monotonic() + 5
        while not other.holders("vae/v.safetensors") and time.monotonic() < deadline:
            time.sleep(0.05)
        [p] = other.holders("vae/v.safetensors")
        assert (p.node, p.sha256, p.size) == ("a", sha, 4096)
        assert other.holders("vae/v.safetensors", "0" * 64) == []
        store.evict("vae/v.safetensors")  # any process may evict: the heartbeat reconciles
        deadline = time.monotonic() + 5
        while other.holders("vae/v.safetensors") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert other.holders("vae/v.safetensors") == []
        assert "a" in other.nodes()
    finally:
        beat.stop(leave=False)  # a crash: no goodbye
    time.sleep(0.8)
    assert "a" not in other.nodes(), "a node that stops heartbeating must drop out after its TTL"
    reg.announce("vae/w.safetensors", "1" * 64, 10)
    assert other.holders("vae/w.safetensors") == [], "holdings of a dead node are not offered"


def test_lease_exclusive_renewed_fenced(redis: RedisServer) -> None:
    a = Leases(RedisGate(redis.url), "a", ttl=0.6)
    b = Leases(RedisGate(redis.url), "b", ttl=0.6)
    la = a.try_acquire("k/x")
    assert la is not None
    assert b.try_acquire("k/x") is None
    time.sleep(1.5)  # more than twice the TTL: renewal keeps it
    assert b.try_acquire("k/x") is None
    holder = b.holder("k/x")
    assert holder is not None and holder.node == "a" and holder.fence == la.fence
    la.release()
    lb = b.try_acquire("k/x")
    assert lb is not None and lb.fence == la.fence + 1
    lb._stop.set()  # simulate a holder that stopped renewing (crashed process)
    lb._thread.join()
    time.sleep(0.8)
    lc = a.try_acquire("k/x")
    assert lc is not None and lc.fence == lb.fence + 1
    lb.release()  # the stale holder's release must not free the new holder's lease
    assert b.holder("k/x") is not None and b.holder("k/x").fence == lc.fence  # type: ignore[union-attr]
    lc.release()


# ---------------------------------------------------------------------------------------------- rate limits

def test_download_limit_gcra_measured(redis: RedisServer) -> None:
    # Two processes of one node share the limit: 120/min = 2/s, burst 3.
    lims = [DownloadLimit(RedisGate(redis.url), "n1", per_minute=120, burst=3) for _ in range(2)]
    t0 = time.monotonic()
    allowed = 0
    i = 0
    while time.monotonic() - t0 < 2.0:
        if lims[i % 2].try_acquire() == 0.0:
            allowed += 1
        i += 1
        time.sleep(0.005)
    elapsed = time.monotonic() - t0
    assert 3 + int(2 * elapsed) - 1 <= allowed <= 3 + int(2 * elapsed), (allowed, elapsed)
    # another node has its own budget
    assert DownloadLimit(RedisGate(redis.url), "n2", per_minute=120, burst=3).try_acquire() == 0.0
    # the wait it reports is right: after waiting it, one more is allowed
    while lims[0].try_acquire() == 0.0:
        pass
    wait = lims[0].try_acquire()
    assert 0 < wait <= 0.5 + 0.05
    time.sleep(wait + 0.01)
    assert lims[1].try_acquire() == 0.0


def test_banked_bytes_wait_for_the_reservation_that_took_them(redis: RedisServer) -> None:
    """A second connection on the node must not spend bytes another one reserved for later."""
    rate = 20 * MiB
    lim = FleetByteLimiter(RedisGate(redis.url), "origin", rate)
    lim.reserve(int(lim.burst))                    # spends the fleet burst: the next grant has to wait
    first = lim.reserve(64 * 1024)                 # reserves a whole grant, waits for it
    assert first > 0.02
    second = lim.reserve(64 * 1024)                # served from the bank: still not before that wait
    assert second >= first - 0.01, (first, second)


def test_fleet_byte_rate_measured(redis: RedisServer) -> None:
    rate = 24 * MiB
    limiters = [FleetByteLimiter(RedisGate(redis.url), "origin", rate) for _ in range(3)]  # three nodes
    total = [0, 0, 0]
    stop_at = time.monotonic() + 2.0

    def consume(i: int) -> None:
        while time.monotonic() < stop_at:
            limiters[i].acquire_blocking(256 * 1024)
            total[i] += 256 * 1024

    t0 = time.monotonic()
    threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    measured = sum(total) / (time.monotonic() - t0)
    assert 0.85 * rate <= measured <= 1.15 * rate + 3 * limiters[0].grant / 2.0, measured / rate
    assert all(t > 0 for t in total)


@pytest.mark.skipif(not NginxOrigin.available(), reason="nginx is not installed")
def test_origin_byte_rate_holds_across_nodes(redis: RedisServer, tmp_path: Path) -> None:
    """Two nodes download different files from an unthrottled origin under a 20 MiB/s fleet-wide limit."""
    rate = 20 * MiB
    size = 24 * MiB
    with nginx_running(tmp_path / "www", tmp_path / "nginx") as origin:
        specs = []
        for i in range(2):
            write_random_file(origin.data_dir / f"f{i}.bin", size, seed=i)
            specs.append(ModelSpec(folder="checkpoints", filename=f"f{i}.bin", sources=(origin.url(f"f{i}.bin"),)))
        services = [FetchService(Store(tmp_path / f"c{i}"), fleet=Fleet(config(redis.url, f"n{i}", origin_rate=rate)))
                    for i in range(2)]
        t0 = time.monotonic()
        threads = [threading.Thread(target=s.fetch, args=(spec,)) for s, spec in zip(services, specs, strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - t0
        for i, s in enumerate(services):
            assert s.store.lookup(f"checkpoints/f{i}.bin") is not None
    measured = 2 * size / elapsed
    assert measured <= 1.1 * rate, f"{measured / MiB:.1f} MiB/s over a {rate / MiB:.0f} MiB/s fleet limit"
    assert measured >= 0.6 * rate, f"only {measured / MiB:.1f} MiB/s"


# ---------------------------------------------------------------------------------------------- Redis down

def test_redis_never_started_node_works_alone(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    if not NginxOrigin.available():
        pytest.skip("nginx is not installed")
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with nginx_running(tmp_path / "www", tmp_path / "nginx") as origin:
        specs = []
        for i in range(3):
            write_random_file(origin.data_dir / f"g{i}.bin", MiB, seed=i)
            specs.append(ModelSpec(folder="loras", filename=f"g{i}.bin", sources=(origin.url(f"g{i}.bin"),)))
        fleet = Fleet(config(dead, "alone", downloads_per_minute=60, origin_rate=100 * MiB))
        service = FetchService(Store(tmp_path / "cache"), fleet=fleet)
        with caplog.at_level(logging.WARNING, logger="comfy_autocloud.fleet"):
            t0 = time.monotonic()
            for spec in specs:
                assert service.fetch(spec).size == MiB
            took = time.monotonic() - t0
    unreachable = [r for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]
    assert took < 5.0
    with pytest.raises(FleetUnavailable):
        fleet.registry.nodes()


def test_redis_comes_back(redis: RedisServer, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gate = RedisGate(redis.url, pause=0.2)
    reg = Registry(gate, "r1")
    reg.heartbeat("http://x")
    port = redis.port
    redis.kill()
    with caplog.at_level(logging.WARNING, logger="comfy_autocloud.fleet"):
        for _ in range(5):
            with pytest.raises(FleetUnavailable):
                reg.heartbeat("http://x")
        redis.start(port=port)
        time.sleep(0.3)
        reg.heartbeat("http://x")
    messages = [r.getMessage() for r in caplog.records]
    assert sum("unreachable" in m for m in messages) == 1, messages
    assert sum("reachable again" in m for m in messages) == 1, messages
    assert "r1" in reg.nodes()


# ---------------------------------------------------------------------------------------------- finishing / resuming

@contextlib.contextmanager
def download_lock_held(store: Store, key: str) -> Iterator[None]:
    """Hold `key`'s single-flight lock, as a process downloading it does."""
    import fcntl

    lock = store.lock_path(key)
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        os.close(fd)


def partial_while(store: Store, key: str, later: Callable[[], None], byte_range: str) -> tuple[int, bytes, float]:
    """GET /v1/partial/<key> from a peer server over `store` while `later` runs in a thread;
    (status, body, seconds the answer took)."""
    with PeerServerThread(PeerServer(store, TOKEN, node_id="holder")) as srv:
        t = threading.Thread(target=later)
        t0 = time.monotonic()
        t.start()
        status, _, body = raw_get(srv.port, f"/v1/partial/{key}", {**AUTH, "Range": byte_range})
        waited = time.monotonic() - t0
        t.join()
    return status, body, waited


def test_partial_request_while_the_holder_commits_waits_for_the_file(tmp_path: Path) -> None:
    """Record gone and lock still held = the holder is committing: a follower gets the file, not a 404."""
    store = Store(tmp_path / "cache")
    key = "checkpoints/finishing.safetensors"
    data = random_safetensors(2 * MiB + 5)
    part = store.partial_path(key)
    part.parent.mkdir(parents=True, exist_ok=True)
    part.write_bytes(data)  # every byte written and hashed; the engine already dropped the record

    def commit_later() -> None:
        time.sleep(0.5)
        store.commit(key, part, size=len(data), sha256=hashlib.sha256(data).hexdigest(), source="origin")

    with download_lock_held(store, key):
        status, body, waited = partial_while(store, key, commit_later, "bytes=100-")
    assert status == 206, status
    assert body == data[100:]
    assert waited >= 0.4  # it waited for the commit instead of answering 404 at once


def test_resumed_bytes_from_elsewhere_do_not_get_a_peer_marked_bad(redis: RedisServer, tmp_path: Path) -> None:
    """A partial streamed from another node may be the bad part: start over from the peer, blame nobody."""
    from comfy_autocloud.transfer.ranges import PartState, state_path

    key = "checkpoints/resumed.safetensors"
    data = random_safetensors(6 * MiB + 3)
    holder_store = Store(tmp_path / "holder")
    sha = committed(holder_store, key, data)
    holder = Fleet(config(redis.url, "holder"))
    follower = Fleet(config(redis.url, "follower"))
    with PeerServerThread(PeerServer(holder_store, TOKEN, node_id="holder")) as srv:
        holder.registry.heartbeat(srv.url)
        holder.announce(key, sha, len(data))
        service = FetchService(Store(tmp_path / "follower"), fleet=follower)
        # what an earlier stream from some other node left: half the file, wrong bytes, recorded done
        part = service.store.partial_path(key, len(data))
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(b"\0" * (len(data) // 2) + data[len(data) // 2:])
        PartState("http://elsewhere/v1/partial/x", len(data), '"partial-1"', None,
                  [(0, len(data) // 2)]).save(state_path(part))
        result = service.fetch(ModelSpec(folder="checkpoints", filename="resumed.safetensors",
                                         sources=("http://127.0.0.1:9/never-used",)))
        served = srv.server.metrics.bytes_served["files"]
    assert result.sha256 == sha and result.path.read_bytes() == data
    assert not follower.registry.is_bad("holder")
    expected = len(data) - len(data) // 2 + len(data)  # the resumed half, then the whole file again
    assert expected <= served <= 1.1 * expected  # (a request cut short by a steal may have sent a bit more)


def test_streams_form_a_chain_and_never_a_cycle(redis: RedisServer) -> None:
    """Followers arriving together stream holder -> a -> b -> c; a failed source never makes a loop."""
    from comfy_autocloud.fleet.streams import Streams

    gate = RedisGate(redis.url)
    key = "checkpoints/chain.safetensors"
    s = {n: Streams(gate, n) for n in ("h", "a", "b", "c")}
    s["h"].downloading(key)
    chain = [(n, s[n].choose(key, "h", set())) for n in ("a", "b", "c")]
    assert chain == [("a", "h"), ("b", "a"), ("c", "b")]  # each node sends one copy
    # b's source (a) fails: b must not pick c, which streams from b; the holder (1 follower) it is
    s["b"].unfollow(key, "a")
    assert s["b"].choose(key, "h", {"a"}) == "h"
    # c's source (b) fails: c may pick a (not downstream of c; no follower now), not b
    s["c"].unfollow(key, "b")
    assert s["c"].choose(key, "h", {"b"}) == "a"
    # the holder failed: nobody downstream of it is a better source; wait for the lease instead
    assert s["a"].choose(key, "h", {"h"}) == "h"
    # finished nodes leave; a new follower with nobody else downloading goes to the holder
    for n in ("a", "b", "c"):
        s[n].unfollow(key, "h")
        s[n].done(key)
    assert Streams(gate, "d").choose(key, "h", set()) == "h"


def test_streams_choose_is_atomic_under_a_crowd(redis: RedisServer) -> None:
    """Eight followers choosing at the same moment spread out: every source gets one follower (a chain)."""
    from collections import Counter

    from comfy_autocloud.fleet.streams import Streams

    key = "checkpoints/crowd.safetensors"
    Streams(RedisGate(redis.url), "h").downloading(key)
    barrier = threading.Barrier(8)
    picked: dict[str, str] = {}

    def follower(name: str) -> None:
        streams = Streams(RedisGate(redis.url), name)
        barrier.wait()
        picked[name] = streams.choose(key, "h", set())

    threads = [threading.Thread(target=follower, args=(f"f{i}",)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    load = Counter(picked.values())
    assert max(load.values()) == 1, load  # each choice saw every earlier one: a chain


def test_partial_request_before_the_first_byte_waits_for_it(tmp_path: Path) -> None:
    """Lock held, nothing written yet: the request waits for the download's first record, then streams."""
    from comfy_autocloud.transfer.ranges import PartState, live_path

    store = Store(tmp_path / "cache")
    key = "checkpoints/starting.safetensors"
    data = random_safetensors(MiB)
    part = store.partial_path(key)

    def start_later() -> None:
        time.sleep(0.4)
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(data[:4096] + b"\0" * (len(data) - 4096))
        PartState("http://origin/x", len(data), '"v1"', None, [(0, 4096)]).save(live_path(part), durable=False)

    with download_lock_held(store, key):  # the downloader is in its single-flight section, no byte yet
        status, body, waited = partial_while(store, key, start_later, "bytes=0-4095")
    assert status == 206 and body == data[:4096], status
    assert waited >= 0.3
