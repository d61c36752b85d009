"""The cache commands through click, on a real store in tmp_path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from comfy_autocloud.cli.context import AppContext
from comfy_autocloud.cli.store_cmds import (
    clean_cmd,
    evict_cmd,
    list_cmd,
    pin_cmd,
    simulate_eviction_cmd,
    status_cmd,
    unpin_cmd,
    verify_cmd,
)
from comfy_autocloud.config import load_settings
from comfy_autocloud.store import Store, write_trace
from servers import safetensors_of
from traces import zipf_trace

MiB = 2**20


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    root = tmp_path / "cache"
    s = Store(root)
    for key, size in (("checkpoints/big.safetensors", 3 * MiB), ("loras/a.safetensors", MiB),
                      ("loras/b.safetensors", MiB // 2)):
        data = safetensors_of(hashlib.sha256(key.encode()).digest(), size)
        part = s.partial_path(key)
        part.write_bytes(data)
        s.commit(key, part, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                 source="https://x/" + key)
    s.close()
    return root


def run(cache: Path, *args: str, max_size: str | None = "8M"):
    group = click.Group("autocloud")
    for cmd in (status_cmd, list_cmd, clean_cmd, verify_cmd, pin_cmd, unpin_cmd, evict_cmd,
                simulate_eviction_cmd):
        group.add_command(cmd)
    env = {"AUTOCLOUD_CONFIG": str(cache.parent / "none.yaml")}
    app = AppContext(load_settings({"cache_dir": str(cache), "max_size": max_size}, env=env))
    try:
        return CliRunner().invoke(group, list(args), obj=app, catch_exceptions=True)
    finally:
        if "store" in app._cache:
            app._cache["store"].close()


def lines(result) -> list[dict]:
    return [json.loads(line) for line in result.output.splitlines() if line.strip()]


def test_command_names() -> None:
    names = [c.name for c in (status_cmd, list_cmd, clean_cmd, verify_cmd, pin_cmd, unpin_cmd, evict_cmd,
                              simulate_eviction_cmd)]
    assert names == ["status", "list", "clean", "verify", "pin", "unpin", "evict", "simulate-eviction"]


def test_status(cache: Path) -> None:
    r = run(cache, "status", "--json")
    assert r.exit_code == 0, r.output
    (d,) = lines(r)
    assert d["cache_dir"] == str(cache) and d["entries"] == 3 and d["cap"] == 8 * MiB
    assert d["bytes"] == 3 * MiB + MiB + MiB // 2 and d["pinned"] == 0 and d["policy"] == "default"
    assert d["top"][0]["key"] == "checkpoints/big.safetensors"
    human = run(cache, "status")
    assert human.exit_code == 0
    assert "4.5 MiB / 8.0 MiB (56%)" in human.output and "3 (0 pinned, 0 in use)" in human.output
    assert "checkpoints/big.safetensors" in human.output
    assert "(no cap)" in run(cache, "status", max_size=None).output


def test_list_pin_unpin_evict(cache: Path) -> None:
    r = run(cache, "list", "--json", "--sort", "size")
    assert [d["key"] for d in lines(r)] == ["checkpoints/big.safetensors", "loras/a.safetensors",
                                            "loras/b.safetensors"]
    assert "loras/a.safetensors" in run(cache, "list", "--folder", "loras").output
    r = run(cache, "pin", "loras/a.safetensors", "loras/nope.safetensors", "--json")
    assert r.exit_code == 1
    assert [(d["key"], d["ok"]) for d in lines(r)] == [("loras/a.safetensors", True),
                                                       ("loras/nope.safetensors", False)]
    r = run(cache, "evict", "loras/a.safetensors")
    assert r.exit_code == 1 and "pinned" in r.output
    assert run(cache, "unpin", "loras/a.safetensors").exit_code == 0
    r = run(cache, "evict", "loras/a.safetensors", "--json")
    assert r.exit_code == 0 and lines(r) == [{"key": "loras/a.safetensors", "action": "evicted", "ok": True}]
    assert not (cache / "loras" / "a.safetensors").exists()
    assert run(cache, "pin", "../etc/passwd").exit_code == 1


def test_clean(cache: Path) -> None:
    r = run(cache, "clean", "--max-size", "2M", "--dry-run", "--json")
    assert r.exit_code == 0
    (d,) = lines(r)
    assert d["dry_run"] and d["files"] >= 1 and len(list((cache / "loras").iterdir())) == 2
    r = run(cache, "clean", "--max-size", "2M")
    assert r.exit_code == 0 and "freed" in r.output
    assert run(cache, "clean", "--keep-days", "1").output.strip() == "nothing to remove"
    bad = run(cache, "clean", "--max-size", "lots")
    assert bad.exit_code == 2 and "not a size" in bad.output


def test_verify_exit_codes(cache: Path) -> None:
    assert run(cache, "verify").exit_code == 0
    (cache / "loras" / "b.safetensors").write_bytes(b"corrupt")
    r = run(cache, "verify", "--no-fix", "--json")
    assert r.exit_code == 1
    (d,) = lines(r)
    assert not d["ok"] and d["findings"][0]["kind"] == "size_mismatch"
    r = run(cache, "verify")
    assert r.exit_code == 0 and "size_mismatch" in r.output
    assert run(cache, "verify", "--rehash").exit_code == 0


def test_simulate_eviction(cache: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace.csv"
    write_trace(trace, zipf_trace(seed=2, requests=800))
    r = run(cache, "simulate-eviction", "--trace", str(trace), "--capacity", "200G", "--policy", "lru",
            "--policy", "default", "--json")
    assert r.exit_code == 0, r.output
    out = lines(r)
    assert [d["policy"] for d in out] == ["lru", "default"]
    for d in out:
        assert {"policy", "byte_hit_ratio", "object_hit_ratio", "evictions"} <= set(d)
        assert 0 < d["byte_hit_ratio"] < 1
    (single,) = lines(run(cache, "simulate-eviction", "--trace", str(trace), "--capacity", "10G", "--json"))
    assert single["policy"] == "default" and single["capacity"] == 10 * 2**30
    human = run(cache, "simulate-eviction", "--trace", str(trace), "--capacity", "200G")
    assert "byte hit ratio" in human.output
    assert run(cache, "simulate-eviction", "--trace", str(trace), "--capacity", "1G",
               "--policy", "fifo").exit_code == 2
    trace.write_text("timestamp,key,size\n1,a,oops\n")
    bad = run(cache, "simulate-eviction", "--trace", str(trace), "--capacity", "1G")
    assert bad.exit_code == 1 and "trace.csv:2" in str(bad.exception)
