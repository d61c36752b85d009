"""civitai: sources against the fake Civitai API on loopback (CIVITAI_API_BASE points at it)."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_helpers import run_cli as cli
from comfy_autocloud.errors import SourceError
from comfy_autocloud.fetch import FetchService
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.sources import resolve
from comfy_autocloud.sources.civitai import is_civitai_url, parse_civitai
from comfy_autocloud.store import Store
from fake_civitai import CIVITAI_TOKEN, FakeCivitai, FakeFile
from servers import safetensors_of

CKPT = safetensors_of(hashlib.sha256(b"ckpt").digest(), 32 * 20_000)   # 640 kB
PRUNED = safetensors_of(hashlib.sha256(b"ckpt").digest(), 200_000)
VAE = safetensors_of(hashlib.sha256(b"vae").digest(), 32 * 3_000)
LORA = safetensors_of(hashlib.sha256(b"lora").digest(), 32 * 5_000)


@pytest.fixture(scope="module")
def civ() -> Iterator[FakeCivitai]:
    c = FakeCivitai().start()
    c.add_version(456, 123, [
        FakeFile("dreamy_v2.safetensors", CKPT, primary=True),
        FakeFile("dreamy_v2_pruned.safetensors", PRUNED, metadata={"format": "SafeTensor", "size": "pruned",
                                                                    "fp": "fp16"}),
        FakeFile("dreamy_vae.safetensors", VAE, type="VAE", metadata={"format": "SafeTensor"}),
    ])
    c.versions[456].files[0].metadata = {"format": "SafeTensor", "size": "full", "fp": "fp32"}
    c.add_version(455, 123, [FakeFile("dreamy_v1.safetensors", CKPT[:1000], primary=True)])
    c.add_version(777, 700, [FakeFile("members_only.safetensors", LORA, primary=True)], login_required=True)
    try:
        yield c
    finally:
        c.stop()


@pytest.fixture
def env(civ: FakeCivitai, monkeypatch: pytest.MonkeyPatch) -> FakeCivitai:
    monkeypatch.setenv("CIVITAI_API_BASE", civ.base)
    monkeypatch.delenv("CIVITAI_TOKEN", raising=False)
    return civ


def no_secret(*texts: str) -> None:
    for text in texts:
        assert CIVITAI_TOKEN not in text
        assert "r2sig" not in text  # the storage host's signed URL


def test_parse_forms() -> None:
    assert parse_civitai("civitai:456").version_id == 456
    ref = parse_civitai("civitai:456/dreamy%20vae.safetensors")
    assert (ref.version_id, ref.filename) == (456, "dreamy vae.safetensors")
    ref = parse_civitai("https://civitai.com/models/123/dreamy?modelVersionId=456")
    assert (ref.model_id, ref.version_id) == (123, 456)
    assert parse_civitai("https://civitai.com/models/123").version_id is None
    ref = parse_civitai("https://civitai.com/api/download/models/456?type=Model&format=SafeTensor&fp=fp16")
    assert ref.version_id == 456 and dict(ref.filters) == {"type": "Model", "format": "SafeTensor", "fp": "fp16"}
    assert is_civitai_url("https://civitai.com/api/download/models/62833")
    assert is_civitai_url("https://www.civitai.com/models/1?modelVersionId=2")
    assert not is_civitai_url("https://civitai.com/user/someone")
    assert not is_civitai_url("https://example.com/models/123")
    for bad in ("civitai:", "civitai:abc", "civitai:12/a/b", "https://civitai.com/models/x1"):
        with pytest.raises(SourceError):
            parse_civitai(bad)


def test_primary_file(env: FakeCivitai, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIVITAI_TOKEN", CIVITAI_TOKEN)
    r = resolve("civitai:456")
    assert r.kind == "http" and r.url == f"{env.base}/api/download/models/456"
    assert r.expected_sha256 == hashlib.sha256(CKPT).hexdigest()  # upper-case in the API, lower here
    assert r.expected_size is None  # sizeKB is rounded: never taken as the exact size
    assert r.filename == "dreamy_v2.safetensors" and r.canonical == "civitai:456"
    assert dict(r.headers) == {"Authorization": f"Bearer {CIVITAI_TOKEN}"}
    assert r.display == "civitai:456 (dreamy_v2.safetensors)"
    no_secret(repr(r), r.display)


@pytest.mark.parametrize("source, name, canonical", [
    ("https://civitai.com/models/123?modelVersionId=455", "dreamy_v1.safetensors", "civitai:455"),
    ("https://civitai.com/models/123", "dreamy_v2.safetensors", "civitai:456"),  # newest version, pinned
    ("civitai:456/dreamy_vae.safetensors", "dreamy_vae.safetensors", "civitai:456/dreamy_vae.safetensors"),
    ("https://civitai.com/api/download/models/456?type=Model&format=SafeTensor&size=pruned&fp=fp16",
     "dreamy_v2_pruned.safetensors", "civitai:456/dreamy_v2_pruned.safetensors"),
])
def test_file_selection(env: FakeCivitai, source: str, name: str, canonical: str) -> None:
    r = resolve(source)
    assert r.filename == name and r.canonical == canonical


@pytest.mark.parametrize("source, reason", [
    ("civitai:999", "civitai:999: model version 999 not found"),
    ("https://civitai.com/models/555", "model 555 not found"),
    ("civitai:456/nope.safetensors", "no file named 'nope.safetensors'.*dreamy_vae.safetensors"),
    ("https://civitai.com/api/download/models/456?type=Model", "2 files of version 456 match type=Model"),
    ("civitai:777", "civitai:777: model version 777 requires a Civitai login.*set CIVITAI_TOKEN"),
])
def test_errors_name_the_version(env: FakeCivitai, source: str, reason: str) -> None:
    with pytest.raises(SourceError, match=reason):
        resolve(source)


def test_refused_token_is_not_shown(env: FakeCivitai, monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CIVITAI_TOKEN", "civitai_wrong_key_abcdef123")
    with pytest.raises(SourceError, match="CIVITAI_TOKEN was refused") as info:
        resolve("civitai:777")
    assert "civitai_wrong_key_abcdef123" not in str(info.value) + caplog.text


def test_429_on_the_api_is_honoured(env: FakeCivitai) -> None:
    env.rate_limit_once.add("/api/v1/model-versions/455")
    t0 = time.monotonic()
    r = resolve("civitai:455")
    assert time.monotonic() - t0 >= 0.9 and r.filename == "dreamy_v1.safetensors"


def test_gated_fetch_with_token(env: FakeCivitai, monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("CIVITAI_TOKEN", CIVITAI_TOKEN)
    before = len(env.seen)
    res = FetchService(Store(tmp_path / "cache")).fetch(
        ModelSpec(folder="loras", filename="members.safetensors", sources=("civitai:777",)))
    assert res.path.read_bytes() == LORA and res.sha256 == hashlib.sha256(LORA).hexdigest()
    storage = [s for s in env.seen[before:] if s.host == "127.0.0.2"]
    api = [s for s in env.seen[before:] if s.host == "127.0.0.1"]
    assert storage and all("Authorization" not in s.headers and "token=" not in s.path for s in storage)
    assert all(s.headers.get("Authorization") == f"Bearer {CIVITAI_TOKEN}" for s in api)
    assert all("token=" not in s.path for s in env.seen[before:])  # the token never travels in a URL
    no_secret(caplog.text, json.dumps(res.as_json()))


def test_fetch_model_url_through_the_engine(env: FakeCivitai, tmp_path: Path) -> None:
    svc = FetchService(Store(tmp_path / "cache"))
    res = svc.fetch(ModelSpec(folder="checkpoints", filename="dreamy.safetensors",
                              sources=("https://civitai.com/models/123?modelVersionId=456",)))
    assert res.path.read_bytes() == CKPT and res.source == "civitai:456 (dreamy_v2.safetensors)"


def test_manifest_add_pins_the_version(env: FakeCivitai, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CIVITAI_TOKEN", CIVITAI_TOKEN)
    manifest = tmp_path / "m.json"
    rc = cli("--cache-dir", str(tmp_path / "cache"), "manifest", "add", "https://civitai.com/models/123",
             "civitai:777", "--folder", "checkpoints", "--manifest", str(manifest))
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc = json.loads(manifest.read_text())
    # the page URL floats with new versions: the entry names the version that was resolved; the
    # sha256 was published, the size came from the download server (sizeKB is rounded)
    assert doc["checkpoints"]["dreamy_v2.safetensors"] == {"url": "civitai:456",
                                                           "sha256": hashlib.sha256(CKPT).hexdigest(),
                                                           "size": len(CKPT)}
    assert doc["checkpoints"]["members_only.safetensors"]["sha256"] == hashlib.sha256(LORA).hexdigest()
    assert "(metadata)" in out.out
    no_secret(out.out, out.err, manifest.read_text())


def test_token_pasted_into_a_url_is_used_but_never_recorded(env: FakeCivitai, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.json"
    rc = cli("--cache-dir", str(tmp_path / "cache"), "manifest", "add",
             f"https://civitai.com/api/download/models/777?token={CIVITAI_TOKEN}", "-f", "loras", "-m", str(manifest))
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert json.loads(manifest.read_text())["loras"]["members_only.safetensors"]["url"] == "civitai:777"
    no_secret(out.out, out.err, manifest.read_text())
    rc = cli("--cache-dir", str(tmp_path / "cache"), "manifest", "add", "https://example.com/x.bin?token=hunter2xyz",
             "-f", "loras", "-m", str(manifest))
    out = capsys.readouterr()
    assert rc == 1 and "carries credentials" in out.err and "hunter2xyz" not in out.out + out.err
    assert "x.bin" not in manifest.read_text()


def test_cli_fetch_names_a_civitai_file_after_the_version_file(env: FakeCivitai, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("--cache-dir", str(tmp_path / "cache"), "fetch", "civitai:456", "--folder", "checkpoints",
               "--json") == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["key"] == "checkpoints/dreamy_v2.safetensors"
    assert (tmp_path / "cache" / "checkpoints" / "dreamy_v2.safetensors").read_bytes() == CKPT
