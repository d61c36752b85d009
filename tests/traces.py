"""Synthetic access traces for the predictor's tests and `bench/predict.py`: users running a handful of
workflows (checkpoint -> LoRAs -> VAE, a fixed order each), and which ones depends on the hour (morning
and evening crowds differ)."""

from __future__ import annotations

import random
import time

MiB = 2**20


def workflow_trace(runs: int, seed: int, *, checkpoints: int, loras: int, flows: int, start: float,
                   max_gap: float, favourites: float | None = None) -> list[tuple[float, str, int]]:
    """Rows `(timestamp, key, size)`. The first half of the `flows` is run before noon UTC, the second half
    after; with `favourites` = p, four flows of each half are picked with probability p (the rest uniformly)."""
    rng = random.Random(seed)
    ckpts = [f"checkpoints/c{i}.safetensors" for i in range(checkpoints)]
    lora_keys = [f"loras/l{i}.safetensors" for i in range(loras)]
    vaes = [f"vae/v{i}.safetensors" for i in range(3)]
    size = {k: rng.randint(2000, 6000) * MiB for k in ckpts}
    size |= {k: rng.randint(20, 200) * MiB for k in lora_keys} | {k: 300 * MiB for k in vaes}
    chains = [[rng.choice(ckpts), *rng.sample(lora_keys, rng.randint(1, 3)), rng.choice(vaes)] for _ in range(flows)]
    half = flows // 2
    rows, t = [], start
    for _ in range(runs):
        pool = chains[:half] if time.gmtime(t).tm_hour < 12 else chains[half:]
        if favourites is not None:
            flow = rng.choice(pool[:4]) if rng.random() < favourites else rng.choice(pool)
        else:
            flow = rng.choice(pool)
        for key in flow:
            rows.append((round(t, 1), key, size[key]))
            t += rng.uniform(5, 60)
        t += rng.uniform(60, max_gap)
    return rows
