"""Predictive preloading: the access log, the predictor, `predict --evaluate`, and live prefetching."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from comfy_autocloud.cli.main import main
from comfy_autocloud.fetch import FetchService
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.predict import MostPopular, Predictor, collapse_repeats, evaluate
from comfy_autocloud.preload_popular import PopularPreloader
from comfy_autocloud.store import Store
from comfy_autocloud.store import index as index_mod
from servers import NginxOrigin, nginx_running, write_random_file
from traces import workflow_trace

MiB = 2**20
T0 = 1_700_000_000.0 - (1_700_000_000 % 86400)  # a UTC midnight


def _workflow_trace(n_runs: int = 600, seed: int = 0) -> list[tuple[float, str, int]]:
    return workflow_trace(n_runs, seed, checkpoints=6, loras=20, flows=12, start=T0, max_gap=1800)


def test_predictor_learns_transitions_and_hours() -> None:
    p = Predictor()
    for day in range(3):
        base = T0 + day * 86400
        p.fit([(base + 9 * 3600, "checkpoints/morning", 1), (base + 9 * 3600 + 10, "loras/m", 1),
               (base + 20 * 3600, "checkpoints/evening", 1), (base + 20 * 3600 + 10, "loras/e", 1)])
    assert p.predict("checkpoints/morning", T0 + 9 * 3600, 1) == ["loras/m"]
    assert p.predict("checkpoints/evening", T0 + 20 * 3600, 1) == ["loras/e"]
    # Nothing known about the previous model: the hour decides.
    assert p.predict("unknown", T0 + 9 * 3600 + 5, 2)[0] in ("checkpoints/morning", "loras/m")
    assert p.predict(None, T0 + 20 * 3600, 2)[0] in ("checkpoints/evening", "loras/e")
    # A gap of more than a session does not make a transition.
    q = Predictor().fit([(T0, "a", 1), (T0 + 7 * 3600, "b", 1)])
    assert "a" not in q.transitions or not q.transitions["a"]
    assert collapse_repeats([(1.0, "a", 1), (2.0, "a", 1), (9.0, "a", 1), (9.5, "b", 1)]) == [
        (1.0, "a", 1), (9.0, "a", 1), (9.5, "b", 1)]


def test_evaluate_beats_most_popular() -> None:
    trace = _workflow_trace()
    r = evaluate(trace)
    base = r["baseline"]
    assert isinstance(base, dict)
    assert r["requests_train"] == int(len(trace) * 0.7)
    assert r["top1"] >= 2 * base["top1"] and r["top3"] >= r["top1"]  # type: ignore[operator]
    assert 0 < r["useful_bytes"] <= r["prefetched_bytes"]  # type: ignore[operator]
    assert MostPopular().fit(trace).predict("x", 0, 1)  # the baseline predicts regardless of context


def _write_trace(path: Path, rows: list[tuple[float, str, int]]) -> Path:
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["timestamp", "key", "size"])
        w.writerows(rows)
    return path


def test_cli_evaluate_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trace = _write_trace(tmp_path / "trace.csv", _workflow_trace(300, seed=1))
    rc = main(["--cache-dir", str(tmp_path / "cache"), "predict", "--evaluate", str(trace), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert {"top1", "top3", "prefetched_bytes", "useful_bytes", "baseline"} <= set(out)
    assert out["top1"] > out["baseline"]["top1"]
    rc = main(["--cache-dir", str(tmp_path / "cache"), "predict", "--evaluate", str(trace), "--capacity", "8G"])
    assert rc == 0 and "most popular" in capsys.readouterr().out

    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,key,size\n1,a,10\n2,b,notanumber\n")
    rc = main(["--cache-dir", str(tmp_path / "cache"), "predict", "--evaluate", str(bad)])
    assert rc == 1 and f"{bad}:3" in capsys.readouterr().err


def test_access_log_is_written_by_touch_and_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = Store(tmp_path / "cache")
    for name in ("a", "b"):
        part = store.partial_path(f"loras/{name}.safetensors")
        part.parent.mkdir(parents=True, exist_ok=True)
        part.write_bytes(name.encode() * 10)
        import hashlib

        store.commit(f"loras/{name}.safetensors", part, size=10, sha256=hashlib.sha256(name.encode() * 10).hexdigest(),
                     source="test")
    store.touch("loras/a.safetensors")
    store.touch("loras/missing.safetensors")  # not cached: no row
    hist = store.access_history()
    assert [k for _t, k, _s in hist] == ["loras/a.safetensors", "loras/b.safetensors", "loras/a.safetensors"]
    assert all(s == 10 for _t, _k, s in hist)
    monkeypatch.setattr(index_mod, "ACCESS_LOG_MAX", 50)
    monkeypatch.setattr(index_mod, "ACCESS_LOG_TRIM", 10)
    for _ in range(200):
        store.touch("loras/b.safetensors")
    assert len(store.access_history(10_000)) <= 60  # rotated, not a file growing per access
    assert store.last_access_id() >= 203


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[NginxOrigin]:
    if not NginxOrigin.available():
        pytest.skip("nginx is not installed (./dev test installs it)")
    with nginx_running(tmp_path / "www", tmp_path / "nginx") as o:
        yield o


def test_preloader_fetches_what_usually_comes_next(tmp_path: Path, origin: NginxOrigin,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    specs = []
    for i, name in enumerate(("ckpt.safetensors", "lora.safetensors", "other.safetensors")):
        sha = write_random_file(origin.data_dir / name, 2 * MiB + i, seed=i)
        specs.append(ModelSpec(folder="loras", filename=name, sources=(origin.url(name),), sha256=sha,
                               size=2 * MiB + i))
    ckpt, lora, other = specs
    store = Store(tmp_path / "cache", max_size=64 * MiB)
    svc = FetchService(store)
    for spec in specs:
        svc.fetch(spec)
    for _ in range(5):  # the workflow: ckpt, then lora
        store.touch(ckpt.key)
        store.touch(lora.key)
    store.touch(other.key)
    store.evict(lora.key)
    store.touch(ckpt.key)  # ckpt was just used: lora is what usually follows

    rc = main(["--cache-dir", str(tmp_path / "cache"), "predict", "--json", "--top", "1"])
    assert rc == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["after"] == ckpt.key and shown["next"][0]["key"] == lora.key

    pre = PopularPreloader(store, svc, lambda: specs, rate=500 * MiB, top=0, predict_top=1, interval=3600)
    assert pre.predicted() == [lora.key]
    assert pre.run_once(predicted_only=True) == [lora.key]
    assert store.lookup(lora.key) is not None

    # Within the cap: with no room for it in the preloader's budget, the guess is not fetched.
    store.evict(lora.key)
    store.touch(ckpt.key)
    tight = Store(tmp_path / "cache", max_size=6 * MiB)
    pre = PopularPreloader(tight, FetchService(tight), lambda: specs, rate=500 * MiB, top=0, predict_top=1)
    assert pre.run_once(predicted_only=True) == []
    assert tight.lookup(lora.key) is None
