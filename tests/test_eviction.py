"""Eviction policies, victim selection, the simulator, and that the simulator predicts the real Store."""

from __future__ import annotations

import hashlib
import math
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
    write_trace,
)
from comfy_autocloud.store.eviction import ADAPT_EPOCH, NextRequestPolicy
from comfy_autocloud.store.simulate import held_out_byte_hit_ratio, simulate
from servers import safetensors_of
from traces import realistic_trace, zipf_trace

GiB = 2**30


def test_get_policy_names() -> None:
    names = ("default", "lru", "lfuda", "gdsf", "gdlfu", "lrfu-1d", "lrfu-14d", "lrfu-tod", "lrfu-next")
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
            data = safetensors_of(hashlib.sha256(key.encode()).digest(), size)
            with store.reserve(key, size):
                part = store.partial_path(key)
                part.write_bytes(data)
                store.commit(key, part, size=size, sha256=hashlib.sha256(data).hexdigest(), source="trace")
        assert {e.key for e in store.entries()} == set(sim.table)
    assert hits == simulate(trace, capacity, policy).hits
    assert sim.evictions > 10  # the trace really exercises eviction
    store.close()


@pytest.mark.parametrize("shape", ["realistic", "scans", "drift"])
def test_adaptive_default_at_least_the_best_textbook_policy(shape: str) -> None:
    """Issue 16's targets on three differently shaped held-out traces (the defaults were tuned on seed 0):
    at a cap of 10% of the library, never below LRU, LFU-DA or GDSF, and >= 1.20x LRU on the realistic one."""
    trace = {"realistic": lambda: realistic_trace(5, days=42),
             "scans": lambda: realistic_trace(2, days=28, scan_every_days=1.0, scan_size=(40, 120)),
             "drift": lambda: realistic_trace(3, days=28, drift=0.9, scan_every_days=0)}[shape]()
    cap = sum({k: s for _t, k, s in trace}.values()) // 10
    textbook = {p: held_out_byte_hit_ratio(trace, cap, p)[0] for p in ("lru", "lfuda", "gdsf")}
    default, sim = held_out_byte_hit_ratio(trace, cap, "default")
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


def test_hourly_frequency_ranks_by_the_coming_hours() -> None:
    """A model used every morning outranks one used as often every evening when the morning comes, and
    the other way round in the evening; weights stay finite over years (rescaled), order unchanged."""
    pol = get_policy("lrfu-tod")
    day, t0 = 86400.0, 1_700_006_400.0  # a UTC midnight
    for d in range(10):
        pol.observe(t0 + d * day + 9 * 3600, "checkpoints/morning", GiB)
        pol.observe(t0 + d * day + 20 * 3600, "checkpoints/evening", GiB)
    morning, evening = Item("checkpoints/morning", GiB, 0.0), Item("checkpoints/evening", GiB, 0.0)
    pol.observe(t0 + 10 * day + 8 * 3600, "loras/x", GiB)  # 8:00
    assert pol.rank(morning) > pol.rank(evening)
    pol.observe(t0 + 10 * day + 19 * 3600, "loras/x", GiB)  # 19:00
    assert pol.rank(evening) > pol.rank(morning)
    assert pol.rank(Item("loras/never", GiB, 0.0))[0] == float("-inf")
    later = t0 + 300 * 14 * day  # past the rescale point: old history is forgotten, new counts as usual
    pol.observe(later + 9 * 3600, "checkpoints/morning", GiB)
    pol.observe(later + 9 * 3600 + 60, "checkpoints/morning", GiB)
    pol.observe(later + 9 * 3600 + 120, "checkpoints/evening", GiB)
    assert pol.rank(morning) > pol.rank(evening) and all(math.isfinite(pol.rank(i)[0]) for i in (morning, evening))



def test_next_request_ranks_by_the_expected_wait() -> None:
    """lrfu-next evicts the file whose next request is expected furthest away: at 8:00 a model used
    every morning outranks one used as often every evening, at 12:00 the other way round; a model used
    every day at 9:00 still outranks, at 10:00, one used once a week at 11:00 (a window of the coming
    hours would rank that one first); more requests, shorter wait; forgetting drops the start times too."""
    pol = get_policy("lrfu-next")
    assert isinstance(pol, NextRequestPolicy)
    day, t0 = 86400.0, 1_700_006_400.0  # a UTC midnight
    for d in range(21):
        pol.observe(t0 + d * day + 9 * 3600, "checkpoints/morning", GiB)
        pol.observe(t0 + d * day + 20 * 3600, "checkpoints/evening", GiB)
        pol.observe(t0 + d * day + 9 * 3600 + 60, "vae/morning-twice", GiB)
        pol.observe(t0 + d * day + 9 * 3600 + 120, "vae/morning-twice", GiB)
        if d % 7 == 0:
            pol.observe(t0 + d * day + 11 * 3600, "loras/weekly", GiB)
    morning, evening = Item("checkpoints/morning", GiB, 0.0), Item("checkpoints/evening", GiB, 0.0)
    weekly, twice = Item("loras/weekly", GiB, 0.0), Item("vae/morning-twice", GiB, 0.0)
    pol.observe(t0 + 21 * day + 8 * 3600, "loras/x", GiB)  # 8:00
    assert pol.rank(morning) > pol.rank(evening)
    assert pol.rank(twice) > pol.rank(morning)
    wait_at_8 = -pol.rank(morning)[0]  # hours
    pol.observe(t0 + 21 * day + 10 * 3600, "loras/x", GiB)  # 10:00, the morning's use is over
    assert pol.rank(morning) > pol.rank(weekly)
    pol.observe(t0 + 21 * day + 12 * 3600, "loras/x", GiB)  # 12:00
    assert pol.rank(evening) > pol.rank(morning)
    assert -pol.rank(morning)[0] > wait_at_8 + 3  # its hour has passed: it waits for tomorrow
    assert pol.rank(Item("loras/never", GiB, 0.0))[0] == float("-inf")
    small = NextRequestPolicy("t", 14 * day, max_keys=4)
    for i in range(12):
        small.observe(t0 + i, f"k{i}", 1)
    assert small.weight.keys() == small.first.keys() and len(small.first) <= 4


def test_next_request_wait_without_a_prior_is_finite_or_inf() -> None:
    """With no prior, a key whose requests were all forgotten by the decay has no next request: its
    wait is infinite (it goes first), not a division by zero."""
    pol = NextRequestPolicy("t", 3600.0, prior=0.0)
    pol.observe(0.0, "a", 1)
    pol.observe(1e9, "b", 1)  # 'a' decayed to nothing (but not yet forgotten)
    assert pol.rank(Item("a", 1, 0.0))[0] == float("-inf")
    assert math.isfinite(pol.rank(Item("b", 1, 0.0))[0])


@pytest.mark.parametrize("policy", ["lru", "lfuda", "gdsf", "gdlfu", "lrfu-1d", "lrfu-14d"])
def test_simulator_heap_picks_what_sorting_picks(policy: str) -> None:
    """The simulator's heap (what makes the default's shadows cheap) evicts exactly what sorting the
    table with `select_victims` evicts, request by request, across forgetting in decayed frequency."""
    trace = realistic_trace(0, days=14)
    cap = sum({k: s for _t, k, s in trace}.values()) // 10
    fast, slow = Simulator(cap, policy), Simulator(cap, policy)
    assert fast._heap is not None
    slow._heap = None  # the plain path: sort the table at each miss
    for t, key, size in trace:
        assert fast.request(t, key, size) == slow.request(t, key, size)
        assert fast.table.keys() == slow.table.keys(), (t, key)
    assert fast.evictions == slow.evictions > 100


def test_adaptive_state_round_trip_continues_exactly() -> None:
    """Saved (through JSON) half-way and resumed, the default learns exactly what one uninterrupted
    replay learns: same shadows, scores and choice, same victims."""
    import json

    trace = realistic_trace(4, days=21)
    cap = sum({k: s for _t, k, s in trace}.values()) // 10
    whole, first = AdaptivePolicy(cap), AdaptivePolicy(cap)
    for t, key, size in trace:
        whole.observe(t, key, size)
    half = len(trace) // 2
    for t, key, size in trace[:half]:
        first.observe(t, key, size)
    resumed = AdaptivePolicy(cap)
    resumed.load_state(json.loads(json.dumps(first.state())))
    for t, key, size in trace[half:]:
        resumed.observe(t, key, size)
    assert resumed.state() == whole.state()
    assert whole.switches > 0  # the trace makes it change its mind
    items = [Item(k, s, t, hits=1) for t, k, s in trace[-200:]]
    items = list({it.key: it for it in items}.values())
    need = sum(it.size for it in items) // 2
    assert [v.key for v in select_victims(resumed, items, need)] == [v.key for v in select_victims(whole, items, need)]
    with pytest.raises(ValueError, match="capacity"):
        AdaptivePolicy(cap + 1).load_state(whole.state())


def _run_requests(store: Store, trace: list[tuple[float, str, int]]) -> None:
    """Each request as ComfyUI's loader makes it: a touch when cached, else reserve + download + commit."""
    for _t, key, size in trace:
        if store.lookup(key) is not None:
            store.touch(key)
            continue
        data = safetensors_of(hashlib.sha256(key.encode()).digest(), size)  # model files are checked on commit
        with store.reserve(key, size):
            part = store.partial_path(key)
            part.write_bytes(data)
            store.commit(key, part, size=size, sha256=hashlib.sha256(data).hexdigest(), source="t")


def _scaled_trace(requests: int) -> tuple[list[tuple[float, str, int]], int]:
    trace = zipf_trace(seed=5, requests=requests, models=24, scan_share=0.2)
    trace = [(t, k, max(1, s // 2**20)) for t, k, s in trace]
    return trace, sum(sorted({k: s for _t, k, s in trace}.values())[-6:])


def _fed(cap: int, store: Store) -> AdaptivePolicy:
    """The reference: a fresh default policy that replayed the store's whole access log."""
    ref = AdaptivePolicy(cap)
    for t, key, size in store.access_history():
        ref.observe(t, key, size)
    return ref


def test_next_process_resumes_from_the_saved_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """A new process loads the state the last one saved and replays only the newer access-log rows,
    ending exactly where a replay of the whole log ends; a state that does not match is ignored."""
    import json
    import logging

    import comfy_autocloud.store.store as store_mod
    from comfy_autocloud.store.layout import POLICY_STATE_NAME as STATE_NAME

    monkeypatch.setattr(store_mod, "SAVE_EVERY", 25)
    trace, cap = _scaled_trace(260)
    kw = dict(max_size=cap, high_watermark=1.0, low_watermark=1.0, min_free_disk=0)
    first = Store(tmp_path / "c", **kw)
    _run_requests(first, trace[:200])
    state = tmp_path / "c" / ".autocloud" / STATE_NAME
    saved = json.loads(state.read_text())
    assert 0 < saved["built_to"] <= first.last_access_id()
    first.close()

    # The next process relearns nothing: with a replay window of 40 rows (of 200+) it could not match
    # the reference from the log alone.
    monkeypatch.setattr(store_mod, "POLICY_REPLAY", 40)
    second = Store(tmp_path / "c", **kw)
    _run_requests(second, trace[200:])
    assert second.would_evict(cap // 2) is not None  # feeds it the last rows
    assert second.policy.state() == _fed(cap, second).state()
    second.close()

    # Ignored, with the reason: a file that does not parse, one built up to a row the log no longer
    # holds as saved (warnings), one for another cap (a user's change: info). The store then replays the
    # newest POLICY_REPLAY rows.
    good = state.read_text()
    bad_row = json.loads(good)
    bad_row["built_to_key"] = "checkpoints/other.safetensors"
    for text, reason in (("{not json", "policy-state.json"), (json.dumps(bad_row), "no longer holds"),
                         (good, "capacity")):
        state.write_text(text)
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="comfy_autocloud.store.policy_state"):
            other = Store(tmp_path / "c", **{**kw, "max_size": cap + 1 if reason == "capacity" else cap})
            assert other.would_evict(cap) is not None
        assert reason in caplog.text and str(state) in caplog.text, caplog.text
        levels = {r.levelno for r in caplog.records if str(state) in r.getMessage()}
        assert levels == ({logging.INFO} if reason == "capacity" else {logging.WARNING}), caplog.text
        assert other.policy.state() != _fed(cap, other).state()  # it relearned from 40 rows only
        other.close()


def test_two_processes_sharing_a_cache_converge(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two stores on one cache that started from different points: after one saves, the other adopts
    that state (it is further along), and from then on both make the same choices."""
    import comfy_autocloud.store.store as store_mod
    from comfy_autocloud.store.layout import POLICY_STATE_NAME as STATE_NAME

    monkeypatch.setattr(store_mod, "SAVE_EVERY", 10**9)  # only the first save of each process
    monkeypatch.setattr(store_mod, "POLICY_REPLAY", 20)
    trace, cap = _scaled_trace(160)
    kw = dict(max_size=cap, high_watermark=1.0, low_watermark=1.0, min_free_disk=0)
    a = Store(tmp_path / "c", **kw)
    _run_requests(a, trace[:120])  # a learns from row 1 on and saves once, early
    assert a.would_evict(cap) is not None
    own = a.policy.state()
    (tmp_path / "c" / ".autocloud" / STATE_NAME).unlink()  # lost: b cannot start from a's state
    b = Store(tmp_path / "c", **kw)
    assert b.would_evict(cap) is not None  # b starts from the newest 20 rows, then saves
    assert b.policy.state() != own  # two lineages
    assert a.would_evict(cap) is not None and a.policy.state() == b.policy.state()  # a adopted b's
    _run_requests(a, trace[120:140])
    _run_requests(b, trace[140:])
    for s in (a, b):
        assert s.would_evict(cap) is not None
    assert a.policy.state() == b.policy.state()
    a.close()
    b.close()


def test_every_registered_policy_is_a_valid_setting(tmp_path: Path) -> None:
    from comfy_autocloud.config import POLICIES, load_settings
    from comfy_autocloud.store.eviction import POLICY_NAMES

    assert set(POLICIES) == set(POLICY_NAMES)
    env = {"AUTOCLOUD_POLICY": "lrfu-1d", "AUTOCLOUD_CONFIG": str(tmp_path / "none.yaml"), "HOME": str(tmp_path)}
    assert load_settings(env=env).policy == "lrfu-1d"
