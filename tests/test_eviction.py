"""Eviction policies, victim selection, the simulator, and that the simulator predicts the real Store."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from comfy_autocloud.errors import ManifestError
from comfy_autocloud.store import (
    AdaptivePolicy,
    Item,
    Simulator,
    Store,
    bytes_freed,
    get_policy,
    read_trace,
    select_victims,
    simulate,
    write_trace,
)
from comfy_autocloud.store.eviction import ADAPT_EPOCH
from traces import realistic_trace, zipf_trace

GiB = 2**30


def test_get_policy_names() -> None:
    names = ("default", "lru", "lfuda", "gdsf", "gdlfu", "lrfu-1d", "lrfu-14d")
    assert {get_policy(n).name for n in names} == set(names)
    with pytest.raises(ValueError, match="known: default, lfuda, gdsf, lru"):
        get_policy("fifo")


def test_priorities() -> None:
    # "gdlfu" (the default before the adaptive policy): LFU-DA plus a per-download cost.
    lru, d, gdsf = get_policy("lru"), get_policy("gdlfu"), get_policy("gdsf")
    assert lru.priority(10, 5, now=123.0, clock=7.0) == 123.0
    # Frequency dominates, size only through the per-download cost; the clock lifts new entries.
    assert d.priority(10 * GiB, 3, 0, 0) > d.priority(10 * GiB, 2, 0, 0)
    assert d.priority(100 * 2**20, 1, 0, 0) > d.priority(10 * GiB, 1, 0, 0)
    assert d.priority(10 * GiB, 1, 0, 0) < 2 < d.priority(10 * GiB, 1, 0, clock=1.0)
    assert gdsf.priority(100, 1, 0, 0) > gdsf.priority(10_000, 1, 0, 0)
    victims = [Item("a", 1, 0, priority=1.5), Item("b", 1, 0, priority=4.0)]
    assert d.clock_after(2.0, victims) == 4.0 and d.clock_after(5.0, victims) == 5.0
    assert lru.clock_after(2.0, victims) == 2.0


def test_select_victims_rules() -> None:
    items = [
        Item("cheap", 10, 0, priority=1),
        Item("pinned", 10, 0, priority=0, pinned=True),
        Item("busy", 10, 0, priority=0, in_use=True),
        Item("self", 10, 0, priority=0),
        Item("twin_a", 10, 0, priority=2, group=(1, 7)),
        Item("twin_b", 10, 0, priority=9, group=(1, 7)),
        Item("twin_of_pinned", 10, 0, priority=0.5, group=(1, 8)),
        Item("pinned_twin", 10, 0, priority=50, group=(1, 8), pinned=True),
        Item("dear", 10, 0, priority=5),
    ]
    pol = get_policy("gdlfu")  # ranks by the rows' stored priority
    assert select_victims(pol, items, 0) == []
    v = select_victims(pol, items, 10, protect={"self"})
    assert [x.key for x in v] == ["cheap"]
    # twin_a alone frees nothing, so selection continues to dear, then twin_b completes the inode.
    v = select_victims(pol, items, 25, protect={"self"})
    assert [x.key for x in v] == ["cheap", "twin_a", "dear", "twin_b"]
    assert bytes_freed(v, items) == 30
    everything = select_victims(pol, items, 10**9, protect={"self"})
    assert {x.key for x in everything} == {"cheap", "twin_a", "twin_b", "dear"}
    assert bytes_freed(everything, items) == 30


@pytest.mark.parametrize("capacity_gib", [100, 200, 400])
def test_default_beats_lru_on_byte_hit_ratio(capacity_gib: int) -> None:
    trace = zipf_trace(seed=7, requests=5000)
    sizes = {k: s for _t, k, s in trace}
    assert min(sizes.values()) >= 100 * 2**20 and max(sizes.values()) <= 20 * GiB
    assert sum(sizes.values()) > 2000 * GiB  # a multi-TB library, as in the seed
    lru = simulate(trace, capacity_gib * GiB, "lru")
    default = simulate(trace, capacity_gib * GiB, "default")
    assert default.requests == lru.requests == 5000
    assert default.byte_hit_ratio > lru.byte_hit_ratio, (default, lru)
    # classic GDSF keeps many small files: more object hits, not more bytes.
    gdsf = simulate(trace, capacity_gib * GiB, "gdsf")
    assert gdsf.object_hit_ratio > default.object_hit_ratio
    assert gdsf.byte_hit_ratio < default.byte_hit_ratio


def test_simulate_edge_cases() -> None:
    r = simulate([(0, "a", 50), (1, "a", 50), (2, "huge", 500), (3, "a", 60), (4, "a", 60)], 100, "lru")
    assert (r.requests, r.hits, r.bytes_hit, r.evictions) == (5, 2, 110, 0)
    assert simulate([], 10).byte_hit_ratio == 0.0


def test_trace_csv_round_trip_and_errors(tmp_path: Path) -> None:
    trace = zipf_trace(seed=1, requests=50)
    path = tmp_path / "t.csv"
    write_trace(path, trace)
    back = list(read_trace(path))
    assert [(k, s) for _t, k, s in back] == [(k, s) for _t, k, s in trace]
    cases = {
        "key,size\n": "t.csv:1",
        "timestamp,key,size\n1,a,10\n2,b\n": "t.csv:3",
        "timestamp,key,size\nnow,a,10\n": "t.csv:2",
        "timestamp,key,size\n1,a,1.5G\n": "t.csv:2",
        "timestamp,key,size\n1,a,-3\n": "t.csv:2",
        "timestamp,key,size\n1,,3\n": "t.csv:2",
        "": "t.csv:1",
    }
    for text, where in cases.items():
        path.write_text(text)
        with pytest.raises(ManifestError) as info:
            list(read_trace(path))
        assert info.value.subject.endswith(where), (text, info.value)
    with pytest.raises(ManifestError, match="cannot read trace"):
        list(read_trace(tmp_path / "absent.csv"))


@pytest.mark.parametrize("policy", ["default", "lru"])
def test_simulator_predicts_the_real_store(tmp_path: Path, policy: str) -> None:
    """One trace through a real Store (reserve/commit/touch) and the simulator: same hits, same contents."""
    trace = zipf_trace(seed=3, requests=120, models=16, scan_share=0.2)
    scale = 2**20  # shrink GB-sized models to KB-sized files, keeping proportions
    trace = [(t, k, max(1, s // scale)) for t, k, s in trace]
    capacity = sum(sorted({k: s for _t, k, s in trace}.values())[-5:])
    store = Store(tmp_path / "c", max_size=capacity, policy=policy, high_watermark=1.0, low_watermark=1.0,
                  min_free_disk=0)
    sim = Simulator(capacity, policy)
    hits = 0
    for t, key, size in trace:
        sim_hit = sim.request(t, key, size)
        if store.lookup(key) is not None:
            store.touch(key)
            hits += 1
            assert sim_hit, key
        else:
            assert not sim_hit, key
            data = hashlib.sha256(key.encode()).digest() * (size // 32 + 1)
            data = data[:size]
            with store.reserve(key, size):
                part = store.partial_path(key)
                part.write_bytes(data)
                store.commit(key, part, size=size, sha256=hashlib.sha256(data).hexdigest(), source="trace")
        assert {e.key for e in store.entries()} == set(sim.table)
    assert hits == simulate(trace, capacity, policy).hits
    assert sim.evictions > 10  # the trace really exercises eviction
    store.close()


def _held_out_bhr(trace: list[tuple[float, str, int]], capacity: int, policy: str) -> tuple[float, Simulator]:
    """Byte hit ratio on the second half of the trace, the cache warmed by the first."""
    sim = Simulator(capacity, policy)
    split = len(trace) // 2
    asked = hit = 0
    for i, (t, key, size) in enumerate(trace):
        h = sim.request(t, key, size)
        if i >= split:
            asked += size
            hit += size if h else 0
    return hit / asked, sim


@pytest.mark.parametrize("shape", ["realistic", "scans", "drift"])
def test_adaptive_default_at_least_the_best_textbook_policy(shape: str) -> None:
    """Issue 16's targets on three differently shaped held-out traces (the defaults were tuned on seed 0):
    at a cap of 10% of the library, never below LRU, LFU-DA or GDSF, and >= 1.20x LRU on the realistic one."""
    trace = {"realistic": lambda: realistic_trace(5, days=42),
             "scans": lambda: realistic_trace(2, days=28, scan_every_days=1.0, scan_size=(40, 120)),
             "drift": lambda: realistic_trace(3, days=28, drift=0.9, scan_every_days=0)}[shape]()
    cap = sum({k: s for _t, k, s in trace}.values()) // 10
    textbook = {p: _held_out_bhr(trace, cap, p)[0] for p in ("lru", "lfuda", "gdsf")}
    default, sim = _held_out_bhr(trace, cap, "default")
    assert default >= max(textbook.values()), (default, textbook)
    if shape == "realistic":
        assert default >= 1.20 * textbook["lru"], (default, textbook)
    policy = sim.policy
    assert isinstance(policy, AdaptivePolicy)
    assert policy.switches <= len(trace) // ADAPT_EPOCH // 10  # hysteresis: it does not flap


def test_adaptive_hands_over_to_the_shadow_that_does_better() -> None:
    """Three models used in turn, then the same with two one-off models after each round (a scan): LRU
    loses every hot model to the scan, LFU-DA keeps them. Starting with LRU, the adaptive policy keeps
    it while both do as well, then hands over to LFU-DA once."""
    pol = AdaptivePolicy(4 * GiB, candidates=("lru", "lfuda"))
    t = 0.0
    for i in range(600):
        pol.observe(t, f"hot{i % 3}", GiB)
        t += 1.0
    assert pol.chosen == "lru" and pol.switches == 0
    for i in range(1000):
        for key in ("hot0", "hot1", "hot2", f"scan{2 * i}", f"scan{2 * i + 1}"):
            pol.observe(t, key, GiB)
            t += 1.0
    assert pol.chosen == "lfuda" and pol.switches == 1
    # The real cache follows the chosen shadow: what the shadow does not hold goes first.
    hot, scanned = Item("hot1", GiB, t - 3, hits=900), Item("scan7", GiB, t - 1)
    assert pol.rank(scanned) < pol.rank(hot)
    assert [v.key for v in select_victims(pol, [hot, scanned], GiB)] == ["scan7"]


def test_adaptive_policy_in_the_store_keeps_pins_and_learns_from_the_log(tmp_path: Path) -> None:
    """The Store feeds its access log to the adaptive policy before choosing victims; pinned files stay."""
    store = Store(tmp_path / "c", max_size=3 * 100, high_watermark=1.0, low_watermark=1.0, min_free_disk=0)
    assert isinstance(store.policy, AdaptivePolicy)

    def put(key: str) -> None:
        data = key.encode().ljust(100, b".")
        with store.reserve(key, 100):
            part = store.partial_path(key)
            part.write_bytes(data)
            store.commit(key, part, size=100, sha256=hashlib.sha256(data).hexdigest(), source="t")

    put("loras/pinned")
    store.pin("loras/pinned")
    put("loras/hot")
    for _ in range(5):
        store.touch("loras/hot")
    put("loras/once")
    put("loras/new")  # evicts: never the pinned one, and the hot one outranks the one used once
    assert {e.key for e in store.entries()} == {"loras/pinned", "loras/hot", "loras/new"}
    shadow = store.policy.shadows[store.policy.chosen]
    assert "loras/hot" in shadow.table  # it has seen every access in the log
    store.close()
