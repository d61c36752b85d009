"""hf:// through the real huggingface_hub client, pointed (HF_ENDPOINT) at the fake Hub on loopback."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_helpers import run_cli as cli

pytest.importorskip("huggingface_hub", reason="hf:// needs huggingface_hub (pip install '.[hf]')")

from comfy_autocloud.errors import SourceError
from comfy_autocloud.fetch import FetchService
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.sources import resolve
from comfy_autocloud.sources.hf import hf_ref_from_url, parse_hf
from comfy_autocloud.store import Store
from comfy_autocloud.transfer import RetryPolicy
from fake_hub import HUB_TOKEN, OTHER_TOKEN, FakeHub
from servers import safetensors_of

BIG = safetensors_of(hashlib.sha256(b"seed").digest(), 32 * 40_000)          # 1.28 MB: an "LFS" file
SMALL = b'{"_class_name": "UNet2DConditionModel"}\n'      # a git-stored file


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    h = FakeHub().start()
    h.add_commit("acme/tiny-sd", {"unet/model.safetensors": BIG, "model_index.json": SMALL})
    h.add_commit("acme/gated-flux", {"flux.safetensors": BIG[:5000]}, gated=True)
    h.repos[("model", "acme/gated-flux")].granted.add(HUB_TOKEN)
    h.add_commit("acme/lfs-data", {"train/part-0.bin": BIG[:4096]}, repo_type="dataset")
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture
def env(hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> FakeHub:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return hub


def no_secret(*texts: str) -> None:
    for text in texts:
        for secret in (HUB_TOKEN, OTHER_TOKEN, "cdnsig0123"):
            assert secret not in text


# ---------------------------------------------------------------------------------------------- parsing

def test_parse_forms() -> None:
    ref = parse_hf("hf://acme/tiny-sd/unet/model.safetensors@v1.0")
    assert (ref.repo_id, ref.path, ref.revision, ref.repo_type) == ("acme/tiny-sd", "unet/model.safetensors", "v1.0",
                                                                     "model")
    ref = parse_hf("hf://datasets/acme/lfs-data@refs%2Fpr%2F3/train/part-0.bin")
    assert (ref.repo_id, ref.path, ref.revision, ref.repo_type) == ("acme/lfs-data", "train/part-0.bin", "refs/pr/3",
                                                                     "dataset")
    assert parse_hf("hf://a/b/c.bin").revision is None
    for bad, why in [("hf://acme/x.bin", "owner, repo and a file path"), ("hf://acme/r/../x", "'..'"),
                     ("hf://ac me/r/x", "not a valid"), ("hf://a/b@v1/x@v2", "twice"), ("hf://a/b/x?y=1", "query")]:
        with pytest.raises(SourceError, match=why):
            parse_hf(bad)


def test_hub_urls_route_to_hf(env: FakeHub) -> None:
    ref = hf_ref_from_url(f"{env.endpoint}/acme/tiny-sd/resolve/main/unet/model.safetensors")
    assert ref is not None and ref.path == "unet/model.safetensors" and ref.revision == "main"
    ref = hf_ref_from_url("https://huggingface.co/datasets/acme/lfs-data/blob/refs%2Fpr%2F1/train/part-0.bin")
    assert ref is not None and ref.repo_type == "dataset" and ref.revision == "refs/pr/1"
    assert hf_ref_from_url("https://example.com/acme/tiny-sd/resolve/main/x.bin") is None
    assert hf_ref_from_url("https://huggingface.co/acme/tiny-sd") is None
    r = resolve(f"{env.endpoint}/acme/tiny-sd/resolve/main/unet/model.safetensors")
    assert r.expected_sha256 == hashlib.sha256(BIG).hexdigest()


# ---------------------------------------------------------------------------------------------- resolving

def test_lfs_file_metadata(env: FakeHub, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    r = resolve("hf://acme/tiny-sd/unet/model.safetensors")
    commit = env.repos[("model", "acme/tiny-sd")].branches["main"]
    assert r.kind == "http"
    assert r.url == f"{env.endpoint}/acme/tiny-sd/resolve/{commit}/unet/model.safetensors"  # pinned to the commit
    assert r.expected_sha256 == hashlib.sha256(BIG).hexdigest()  # X-Linked-Etag
    assert r.expected_size == len(BIG)  # X-Linked-Size
    assert dict(r.headers) == {"Authorization": f"Bearer {HUB_TOKEN}"}
    assert r.filename == "model.safetensors"
    assert r.display.startswith("hf://acme/tiny-sd/unet/model.safetensors (commit ")
    no_secret(repr(r), r.display, caplog.text)


def test_git_file_has_no_sha256_but_size(env: FakeHub) -> None:
    r = resolve("hf://acme/tiny-sd/model_index.json@main")
    assert r.expected_sha256 is None  # the ETag of a git-stored file is a git sha1, not a sha256
    assert r.expected_size == len(SMALL)


def test_dataset_repo(env: FakeHub) -> None:
    r = resolve("hf://datasets/acme/lfs-data/train/part-0.bin")
    assert "/datasets/acme/lfs-data/resolve/" in r.url
    assert r.expected_sha256 == hashlib.sha256(BIG[:4096]).hexdigest()


def test_token_from_the_hub_token_store(env: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import huggingface_hub.constants as c

    token_file = tmp_path / "stored-token"
    token_file.write_text(HUB_TOKEN)
    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(token_file))
    r = resolve("hf://acme/gated-flux/flux.safetensors")
    assert dict(r.headers) == {"Authorization": f"Bearer {HUB_TOKEN}"}
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "none"))
    with pytest.raises(SourceError, match="gated"):
        resolve("hf://acme/gated-flux/flux.safetensors")


@pytest.mark.parametrize("source, token, reason", [
    ("hf://acme/missing/x.safetensors", HUB_TOKEN, "repository acme/missing not found"),
    ("hf://acme/missing/x.safetensors", None, "set HF_TOKEN if it is private"),
    ("hf://acme/tiny-sd/nope.safetensors", HUB_TOKEN, "file 'nope.safetensors' not found in acme/tiny-sd"),
    ("hf://acme/tiny-sd/unet/model.safetensors@v9", HUB_TOKEN, "revision 'v9' not found in acme/tiny-sd"),
    ("hf://acme/gated-flux/flux.safetensors", None, "gated repo acme/gated-flux.*set HF_TOKEN"),
    ("hf://acme/gated-flux/flux.safetensors", OTHER_TOKEN, "gated repo acme/gated-flux.*token in use has no access"),
    ("hf://acme/tiny-sd/model_index.json", "hf_bogus_token_value_1234", "HTTP 401: access refused"),
])
def test_errors_name_the_ref_and_reason(env: FakeHub, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
                                        source: str, token: str | None, reason: str) -> None:
    caplog.set_level(logging.DEBUG)
    if token is None:
        monkeypatch.delenv("HF_TOKEN")
    else:
        monkeypatch.setenv("HF_TOKEN", token)
    with pytest.raises(SourceError, match=reason) as info:
        resolve(source)
    assert info.value.subject.startswith(source.split("@")[0])
    no_secret(str(info.value), caplog.text)
    assert "hf_bogus_token_value_1234" not in str(info.value) + caplog.text


def test_429_on_metadata_is_honoured(env: FakeHub) -> None:
    env.rate_limit_once.add("acme/tiny-sd/model_index.json")
    t0 = time.monotonic()
    r = resolve("hf://acme/tiny-sd/model_index.json")
    assert time.monotonic() - t0 >= 0.9  # Retry-After: 1
    assert r.expected_size == len(SMALL)


def test_unreachable_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    from servers import free_port

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setattr("comfy_autocloud.sources._net.RESOLVE_RETRY", RetryPolicy(attempts=2, backoff_base=0.01))
    with pytest.raises(SourceError, match="did not answer") as info:
        resolve("hf://acme/tiny-sd/model_index.json")
    no_secret(str(info.value))


# ---------------------------------------------------------------------------------------------- fetching

def test_fetch_lfs_file_through_the_engine(env: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    env.cdn_rate_limit_once.add(hashlib.sha256(BIG).hexdigest())  # the CDN says 429 once: the engine waits
    before = len(env.seen)
    svc = FetchService(Store(tmp_path / "cache"))
    res = svc.fetch(ModelSpec(folder="unet", filename="tiny.safetensors",
                              sources=("hf://acme/tiny-sd/unet/model.safetensors",)))
    assert res.sha256 == hashlib.sha256(BIG).hexdigest() and res.size == len(BIG)
    assert res.path.read_bytes() == BIG
    assert res.source.startswith("hf://acme/tiny-sd/unet/model.safetensors")
    seen = env.seen[before:]
    cdn = [s for s in seen if s.host == "127.0.0.2"]
    hub_side = [s for s in seen if s.host == "127.0.0.1" and "/resolve/" in s.path]
    assert cdn and all("Authorization" not in s.headers for s in cdn)  # dropped on the redirect to another host
    assert any(s.headers.get("Authorization") == f"Bearer {HUB_TOKEN}" for s in hub_side)
    assert any(s.method == "GET" and s.headers.get("Range") for s in cdn)  # ranged requests to the CDN
    assert sum(1 for s in cdn if s.method == "GET") >= 2  # the 429, then the retry
    no_secret(caplog.text, json.dumps(res.as_json()))


def test_branch_moving_mid_way_cannot_mix_versions(env: FakeHub, tmp_path: Path) -> None:
    env.add_commit("acme/moving", {"w.bin": BIG[:300_000]})
    r = resolve("hf://acme/moving/w.bin")
    env.add_commit("acme/moving", {"w.bin": BIG[300_000:600_000]})  # main moves after resolving
    from comfy_autocloud.transfer import TransferOptions, download

    out = download(r.url, tmp_path / "w.part", TransferOptions(headers=r.headers))
    assert out.sha256 == r.expected_sha256 == hashlib.sha256(BIG[:300_000]).hexdigest()


def test_manifest_add_records_metadata_hash(env: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "models.json"
    rc = cli("--cache-dir", str(tmp_path / "cache"), "manifest", "add", "hf://acme/tiny-sd/unet/model.safetensors",
             "--folder", "unet", "--manifest", str(manifest), "--json")
    out = capsys.readouterr()
    assert rc == 0, out.err
    row = json.loads(out.out.splitlines()[-1])
    assert row["action"] == "added" and row["hash_from"] == "metadata"
    doc = json.loads(manifest.read_text())
    assert doc == {"unet": {"model.safetensors": {"url": "hf://acme/tiny-sd/unet/model.safetensors",
                                                  "sha256": hashlib.sha256(BIG).hexdigest(), "size": len(BIG)}}}
    assert not (tmp_path / "cache" / "unet" / "model.safetensors").exists()  # the hash was published: no download
    no_secret(out.out, out.err, manifest.read_text())


def test_manifest_add_downloads_when_no_hash_is_published(env: FakeHub, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "models.json"
    rc = cli("--cache-dir", str(tmp_path / "cache"), "manifest", "add", "hf://acme/tiny-sd/model_index.json",
             "--folder", "configs", "--name", "tiny-sd.json", "--manifest", str(manifest))
    out = capsys.readouterr()
    assert rc == 0, out.err
    entry = json.loads(manifest.read_text())["configs"]["tiny-sd.json"]
    assert entry["sha256"] == hashlib.sha256(SMALL).hexdigest() and entry["size"] == len(SMALL)
    assert (tmp_path / "cache" / "configs" / "tiny-sd.json").read_bytes() == SMALL  # verified copy in the cache
    assert "(download)" in out.out
    no_secret(out.out, out.err)


def test_cli_error_for_gated_repo_has_no_token(env: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HF_TOKEN", OTHER_TOKEN)
    rc = cli("--cache-dir", str(tmp_path / "cache"), "-vv", "fetch", "hf://acme/gated-flux/flux.safetensors",
             "--folder", "unet")
    out = capsys.readouterr()
    assert rc == 1
    assert "gated repo acme/gated-flux" in out.err + out.out
    no_secret(out.out, out.err)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*.safetensors"))
    assert os.environ["HF_TOKEN"] == OTHER_TOKEN
