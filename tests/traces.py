"""The synthetic model-access traces that tests and benchmarks share (one generator, seeded).

`realistic_trace` is the shape real ComfyUI nodes see: a node runs sessions (a user at work, then a
pause); a session runs one to a few workflows from that user's own list; a workflow loads several
models in a stable order (checkpoint, then VAE / text encoders, then LoRAs, a ControlNet, an
upscaler), many workflows share a checkpoint and differ after it; users work at their own hours (the
load follows the time of day), their lists drift day by day as new LoRAs and workflows appear, and now
and then a batch job touches many rare models once each. Sizes run from 10 MB upscalers to 20+ GB
checkpoints. `zipf_trace` is the older independent-reference shape (Zipf popularity, no order, bursts
of one-off models), kept as a contrast for eviction policies.

Score on the later part of a trace (trained/tuned on the earlier part), and tune on one seed, report
on others.
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

Request = tuple[float, str, int]
MB = 10**6
GB = 10**9
DAY = 86400.0
T0 = 1_700_006_400.0  # a UTC midnight

# family -> (checkpoints, checkpoint size range, VAEs, text encoders with sizes)
_FAMILIES = {
    "sd15": (60, (2.0 * GB, 4.3 * GB), [("vae/vae-ft-mse.safetensors", 335 * MB)], []),
    "sdxl": (80, (6.5 * GB, 7.1 * GB), [("vae/sdxl_vae.safetensors", 335 * MB)], []),
    "flux": (30, (11.9 * GB, 23.8 * GB), [("vae/ae.safetensors", 335 * MB)],
             [("text_encoders/t5xxl_fp16.safetensors", 9.79 * GB), ("text_encoders/clip_l.safetensors", 246 * MB)]),
    "sd3": (10, (5.9 * GB, 16.5 * GB), [("vae/sd3_vae.safetensors", 168 * MB)],
            [("text_encoders/t5xxl_fp8.safetensors", 4.89 * GB), ("text_encoders/clip_g.safetensors", 1.39 * GB)]),
}
_FAMILY_WEIGHT = {"sd15": 0.25, "sdxl": 0.4, "flux": 0.28, "sd3": 0.07}


def _log_uniform(rng: random.Random, lo: float, hi: float) -> int:
    return int(math.exp(rng.uniform(math.log(lo), math.log(hi))))


def _zipf_pick(rng: random.Random, items: list[str], alpha: float = 1.0) -> str:
    weights = [1.0 / (i + 1) ** alpha for i in range(len(items))]
    return rng.choices(items, weights)[0]


@dataclass
class _Library:
    rng: random.Random
    sizes: dict[str, int] = field(default_factory=dict)
    checkpoints: dict[str, list[str]] = field(default_factory=dict)
    loras: dict[str, list[str]] = field(default_factory=dict)
    controlnets: dict[str, list[str]] = field(default_factory=dict)
    upscalers: list[str] = field(default_factory=list)
    counter: int = 0

    def add(self, folder: str, size: float) -> str:
        self.counter += 1
        key = f"{folder}/m{self.counter:05d}.safetensors"
        self.sizes[key] = int(size)
        return key

    def new_lora(self, fam: str) -> str:
        key = self.add("loras", _log_uniform(self.rng, 10 * MB, 900 * MB))
        self.loras[fam].insert(0, key)  # the newest LoRAs are the ones people try
        return key


def _library(rng: random.Random) -> _Library:
    lib = _Library(rng)
    for fam, (n, (lo, hi), vaes, encoders) in _FAMILIES.items():
        lib.checkpoints[fam] = [lib.add("checkpoints", _log_uniform(rng, lo, hi)) for _ in range(n)]
        lib.loras[fam] = [lib.add("loras", _log_uniform(rng, 10 * MB, 900 * MB)) for _ in range(200)]
        lib.controlnets[fam] = [lib.add("controlnet", _log_uniform(rng, 300 * MB, 2.5 * GB)) for _ in range(10)]
        for key, size in vaes + encoders:
            lib.sizes[key] = int(size)
    lib.upscalers = [lib.add("upscale_models", _log_uniform(rng, 10 * MB, 70 * MB)) for _ in range(6)]
    return lib


def _workflow(lib: _Library, rng: random.Random) -> list[str]:
    """One workflow's loads in order: checkpoint, VAE / text encoders, LoRAs, ControlNet, upscaler."""
    fam = rng.choices(list(_FAMILY_WEIGHT), list(_FAMILY_WEIGHT.values()))[0]
    _n, _sizes, vaes, encoders = _FAMILIES[fam]
    flow = [_zipf_pick(rng, lib.checkpoints[fam], 1.1)]
    if fam != "sd15" or rng.random() < 0.5:
        flow.append(vaes[0][0])
    flow += [k for k, _s in encoders]
    flow += list(dict.fromkeys(_zipf_pick(rng, lib.loras[fam], 0.8) for _ in range(rng.choice((0, 1, 1, 2, 2, 3)))))
    if rng.random() < 0.25:
        flow.append(rng.choice(lib.controlnets[fam]))
    if rng.random() < 0.3:
        flow.append(rng.choice(lib.upscalers))
    return flow


@dataclass
class _User:
    hour: float  # centre of this user's working hours (UTC)
    flows: list[list[str]]
    rate: float  # sessions per day


def realistic_trace(seed: int, *, days: int = 42, users: int = 20, sessions_per_day: float = 30.0,
                    drift: float = 0.25, tweak: float = 0.4, scan_every_days: float = 3.0,
                    scan_size: tuple[int, int] = (20, 60), start: float = T0) -> list[Request]:
    """Rows `(timestamp, key, size)` of one node over `days`, ordered by time.

    `drift`: chance per user and day that one of their workflows is replaced by a new one (often with a
    freshly released LoRA). `tweak`: chance per run that one LoRA is swapped for another.
    `scan_every_days`: mean days between batch jobs that touch `scan_size` rare models of the library's
    long tail once each (0 turns them off).
    """
    rng = random.Random(seed)
    lib = _library(rng)
    people = [_User(hour=rng.choice((8.0, 10.0, 13.0, 15.0, 19.0, 22.0)) + rng.uniform(-1, 1),
                    flows=[_workflow(lib, rng) for _ in range(rng.randint(3, 7))],
                    rate=rng.uniform(0.5, 1.5)) for _ in range(users)]
    total_rate = sum(u.rate for u in people)
    starts: list[tuple[float, int]] = []  # (session start, user index; -1 = batch job)
    for day in range(days):
        base = start + day * DAY
        for i, u in enumerate(people):
            if day and rng.random() < drift:  # this user's habits move on
                if rng.random() < 0.5:
                    fam = rng.choice(list(lib.loras))
                    lib.new_lora(fam)
                u.flows[rng.randrange(len(u.flows))] = _workflow(lib, rng)
            n = _poisson(rng, sessions_per_day * u.rate / total_rate)
            for _ in range(n):
                hour = (u.hour + rng.gauss(0, 2.0)) % 24
                starts.append((base + hour * 3600, i))
        if scan_every_days and rng.random() < 1.0 / scan_every_days:
            starts.append((base + rng.uniform(0, DAY), -1))
    starts.sort()
    rows: list[Request] = []
    t = start
    for when, who in starts:
        t = max(t + rng.uniform(60, 600), when)  # one node: a session waits for the previous one
        t = _batch(lib, rng, rows, t, scan_size) if who < 0 else _session(people[who], lib, rng, rows, t, tweak)
    return rows


def _poisson(rng: random.Random, lam: float) -> int:
    n, p, limit = 0, 1.0, math.exp(-lam)
    while True:
        p *= rng.random()
        if p <= limit:
            return n
        n += 1


def _session(user: _User, lib: _Library, rng: random.Random, rows: list[Request], t: float,
             tweak: float) -> float:
    """A few runs of the user's workflows; a run reloads only what the previous run did not load, and
    now and then the user tries another LoRA of the same family in place of one of the workflow's."""
    weights = [1.0 / (i + 1) for i in range(len(user.flows))]
    flow = rng.choices(user.flows, weights)[0]
    loaded: list[str] = []
    for _run in range(1 + min(3, int(rng.expovariate(1.2)))):
        loras = [i for i, k in enumerate(flow) if k.startswith("loras/")]
        if loras and rng.random() < tweak:
            fam = next(f for f, ks in lib.checkpoints.items() if flow[0] in ks)
            flow = list(flow)
            flow[rng.choice(loras)] = _zipf_pick(rng, lib.loras[fam], 0.6)
        for key in flow:
            if key not in loaded:
                rows.append((round(t, 3), key, lib.sizes[key]))
                t += rng.uniform(3, 45)  # loading, encoding, sampling until the next loader
        loaded = flow
        t += rng.uniform(30, 600)  # the user looks at the results, edits the prompt
        if rng.random() < 0.5:
            flow = rng.choices(user.flows, weights)[0]
    return t


def _batch(lib: _Library, rng: random.Random, rows: list[Request], t: float, size: tuple[int, int]) -> float:
    """A batch job (an evaluation, a LoRA sweep): many models of the library's long tail, each touched once."""
    fams = list(lib.checkpoints)
    for _ in range(rng.randint(*size)):
        fam = rng.choice(fams)
        pool = lib.checkpoints[fam] if rng.random() < 0.4 else lib.loras[fam]
        key = pool[rng.randrange(len(pool) // 4, len(pool))]  # not the few everyone uses
        rows.append((round(t, 3), key, lib.sizes[key]))
        t += rng.uniform(20, 120)
    return t


# ---------------------------------------------------------------------------- independent reference model
_KINDS = (  # (folder, share of the library, min size, max size): a typical ComfyUI model library
    ("loras", 0.55, 100 * 2**20, 900 * 2**20),
    ("controlnet", 0.10, 700 * 2**20, 2_500 * 2**20),
    ("vae", 0.05, 160 * 2**20, 400 * 2**20),
    ("checkpoints", 0.30, 2 * 2**30, 20 * 2**30),
)


def zipf_trace(*, seed: int = 0, requests: int = 5000, models: int = 400, alpha: float = 0.9,
               scan_share: float = 0.15, interval: float = 30.0) -> list[Request]:
    """A seeded independent-reference trace: Zipf-popular library plus one-off scans.

    Popular models follow Zipf(alpha) over a library whose sizes run from 100 MB LoRAs to 20 GB
    checkpoints (log-uniform within each kind; popularity independent of size). `scan_share` of the
    requests are bursts of models tried exactly once (someone browsing new checkpoints), which is what
    flushes an LRU cache.
    """
    rng = random.Random(seed)
    library: list[tuple[str, int]] = []
    for i in range(models):
        r, acc = rng.random(), 0.0
        kind = _KINDS[-1]
        for kind in _KINDS:
            acc += kind[1]
            if r <= acc:
                break
        folder, _share, lo, hi = kind
        size = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        library.append((f"{folder}/model_{i:04d}.safetensors", size))
    rng.shuffle(library)
    cum = list(itertools.accumulate(1.0 / (rank + 1) ** alpha for rank in range(models)))
    trace: list[Request] = []
    now = 1_700_000_000.0
    scan_id = 0
    while len(trace) < requests:
        now += rng.expovariate(1.0 / interval)
        if rng.random() < scan_share / 4:
            for _ in range(min(rng.randint(2, 6), requests - len(trace))):  # a burst of one-off models
                folder, _share, lo, hi = _KINDS[3] if rng.random() < 0.6 else _KINDS[0]
                size = int(math.exp(rng.uniform(math.log(lo), math.log(hi))))
                trace.append((now, f"{folder}/scan_{scan_id:05d}.safetensors", size))
                scan_id += 1
                now += rng.expovariate(1.0 / interval)
            continue
        key, size = library[rng.choices(range(models), cum_weights=cum)[0]]
        trace.append((now, key, size))
    return trace
