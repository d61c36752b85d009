"""s3:// against a real S3 implementation: moto's server mode on loopback, driven through boto3."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_helpers import run_cli as cli

pytest.importorskip("boto3", reason="s3:// needs boto3 (pip install '.[s3]')")
pytest.importorskip("moto.server", reason="the S3 tests need moto's server mode (pip install 'moto[server]')")

import boto3

from comfy_autocloud.errors import Cancelled, SourceError, TransferError
from comfy_autocloud.fetch import FetchService
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.progress import CancelToken, ProgressEvent
from comfy_autocloud.sources import resolve
from comfy_autocloud.sources.s3 import list_prefix, parse_s3, presign_seconds, sha256_from_head
from comfy_autocloud.store import Store
from comfy_autocloud.transfer import TransferOptions, download
from servers import free_port, safetensors_of

KEY_ID = "AKIAMOTOTESTKEY00001"
SECRET = "moto/Secret+AccessKey+NeverPrintMe0000001"
MiB = 1 << 20
BIG = safetensors_of(hashlib.sha256(b"s3").digest(), 32 * (8 * MiB // 32))   # 8 MiB


@pytest.fixture(scope="module")
def moto() -> Iterator[str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip("moto server did not start")
            time.sleep(0.05)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture
def s3(moto: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """A boto3 client on the moto server, with the process environment set the way users set it."""
    for var in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3", "AWS_REGION"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    client = boto3.client("s3", endpoint_url=moto, region_name="us-east-1")
    with urllib.request.urlopen(urllib.request.Request(f"{moto}/moto-api/reset", method="POST")):
        pass
    client.create_bucket(Bucket="models")
    return client


def put(client: Any, key: str, data: bytes, *, checksum: bool = False, meta_sha: bool = False) -> str:
    sha = hashlib.sha256(data).hexdigest()
    kwargs: dict[str, Any] = {}
    if checksum:
        kwargs["ChecksumAlgorithm"] = "SHA256"
    if meta_sha:
        kwargs["Metadata"] = {"sha256": sha}
    client.put_object(Bucket="models", Key=key, Body=data, **kwargs)
    return sha


def no_secret(*texts: str) -> None:
    for text in texts:
        assert SECRET not in text and KEY_ID not in text
        assert "X-Amz-Signature=" not in text or "X-Amz-Signature=***" in text


# ---------------------------------------------------------------------------------------------- units

def test_parse_and_expiry() -> None:
    assert parse_s3("s3://models/a/b%20c.bin").key == "a/b c.bin"
    assert parse_s3("s3://models", prefix=True).key == ""
    for bad, why in [("s3://models/", "naming one object"), ("s3://models/dir/", "naming one object"),
                     ("s3://bad..name/x", "not valid"), ("s3://b/x?versionId=1", "no query")]:
        with pytest.raises(SourceError, match=why):
            parse_s3(bad)
    assert presign_seconds(None) == 3600
    assert presign_seconds(20 << 30) == 3600 + 20 * 1024  # an hour plus a second per MiB
    assert presign_seconds(1 << 50) == 7 * 24 * 3600


def test_sha256_from_head_shapes() -> None:
    digest = hashlib.sha256(b"x").digest()
    b64 = base64.b64encode(digest).decode()
    assert sha256_from_head({"ChecksumSHA256": b64, "ETag": '"abc"'}) == digest.hex()
    assert sha256_from_head({"ChecksumSHA256": b64 + "-3", "ETag": '"abc-3"'}) is None  # composite (multipart)
    assert sha256_from_head({"ChecksumSHA256": b64, "ETag": '"abc-2"'}) is None
    assert sha256_from_head({"Metadata": {"sha256": digest.hex().upper()}}) == digest.hex()
    assert sha256_from_head({"Metadata": {"sha256": "nope"}}) is None


# ---------------------------------------------------------------------------------------------- resolve

def test_resolve_reads_size_and_sha256(s3: Any, caplog: pytest.LogCaptureFixture) -> None:
    sha_c = put(s3, "ckpt/with-checksum.bin", BIG[:5000], checksum=True)
    sha_m = put(s3, "ckpt/with-meta.bin", BIG[:6000], meta_sha=True)
    put(s3, "ckpt/plain.bin", BIG[:7000])
    caplog.set_level(logging.DEBUG)
    caplog.clear()  # from here on: only what resolving logs (the puts above log their own auth)
    r = resolve("s3://models/ckpt/with-checksum.bin")
    assert (r.expected_sha256, r.expected_size, r.display, r.filename) == (sha_c, 5000, "s3://models/ckpt/with-checksum.bin",
                                                                          "with-checksum.bin")
    assert r.url.startswith(os.environ["AWS_ENDPOINT_URL"] + "/models/ckpt/with-checksum.bin?")
    assert "X-Amz-Signature=" in r.url and "X-Amz-Expires=3600" in r.url and not r.headers
    assert resolve("s3://models/ckpt/with-meta.bin").expected_sha256 == sha_m
    assert resolve("s3://models/ckpt/plain.bin").expected_sha256 is None
    signature = r.url.split("X-Amz-Signature=")[1]
    assert signature not in repr(r) + r.display + caplog.text
    no_secret(caplog.text)


def test_missing_key_and_bucket(s3: Any) -> None:
    with pytest.raises(SourceError, match=r"no object 'nope\.bin' in bucket 'models'") as info:
        resolve("s3://models/nope.bin")
    assert info.value.subject == "s3://models/nope.bin"
    with pytest.raises(SourceError, match="bucket 'no-such-bucket' does not exist"):
        resolve("s3://no-such-bucket/x.bin")


def test_bad_and_missing_credentials(s3: Any, moto: str, monkeypatch: pytest.MonkeyPatch,
                                     caplog: pytest.LogCaptureFixture) -> None:
    put(s3, "x.bin", b"x" * 100)
    caplog.set_level(logging.DEBUG)

    def auth(count: str) -> None:  # moto's switch for checking signatures against its IAM users
        req = urllib.request.Request(f"{moto}/moto-api/reset-auth", data=count.encode(), method="POST",
                                     headers={"Content-Type": "text/plain"})  # a form body would be eaten by Flask
        with urllib.request.urlopen(req):
            pass

    auth("0")
    try:
        with pytest.raises(SourceError, match="access denied") as info:
            resolve("s3://models/x.bin")
    finally:
        auth("inf")
    assert info.value.subject == "s3://models/x.bin"
    no_secret(str(info.value), caplog.text)
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    with pytest.raises(SourceError, match="no AWS credentials found"):
        resolve("s3://models/x.bin")


# ---------------------------------------------------------------------------------------------- fetch

def test_fetch_cancel_then_resume(s3: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Ranged download of a presigned URL, cancelled mid-way; a new fetch presigns again and resumes."""
    sha = put(s3, "ckpt/big.safetensors", BIG, checksum=True)
    caplog.set_level(logging.DEBUG)
    spec = ModelSpec(folder="checkpoints", filename="big.safetensors", sources=("s3://models/ckpt/big.safetensors",))
    store = Store(tmp_path / "cache")
    cancel = CancelToken()

    def stop_half_way(ev: ProgressEvent) -> None:
        if ev.phase == "download" and ev.bytes_done >= 3 * MiB:
            cancel.cancel()

    slow = FetchService(store, options=TransferOptions(connections=4, rate_limit=8 * MiB))
    with pytest.raises(Cancelled):
        slow.fetch(spec, progress=stop_half_way, cancel=cancel)
    assert store.lookup(spec.key) is None and not (tmp_path / "cache" / "checkpoints" / "big.safetensors").exists()
    res = FetchService(store).fetch(spec)
    assert res.sha256 == sha and res.path.read_bytes() == BIG
    assert res.bytes_downloaded <= len(BIG) - 2 * MiB  # the ranges done before the cancel were kept
    assert res.source == "s3://models/ckpt/big.safetensors"
    no_secret(caplog.text, json.dumps(res.as_json()))


def test_presigned_url_never_leaks_from_engine_errors(s3: Any, tmp_path: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    put(s3, "gone.bin", b"g" * 1000)
    r = resolve("s3://models/gone.bin")
    s3.delete_object(Bucket="models", Key="gone.bin")  # vanishes between resolve and download
    caplog.set_level(logging.DEBUG)
    with pytest.raises(TransferError) as info:
        download(r.url, tmp_path / "gone.part", TransferOptions())
    signature = r.url.split("X-Amz-Signature=")[1].split("&")[0]
    assert info.value.status == 404
    assert signature not in str(info.value) + caplog.text
    no_secret(str(info.value), caplog.text)


def test_mirror_after_a_missing_key(s3: Any, tmp_path: Path) -> None:
    sha = put(s3, "mirror/b.bin", BIG[:100_000], meta_sha=True)
    spec = ModelSpec(folder="vae", filename="b.bin", sources=("s3://models/mirror/a.bin", "s3://models/mirror/b.bin"))
    res = FetchService(Store(tmp_path / "cache")).fetch(spec)
    assert res.sha256 == sha and res.source == "s3://models/mirror/b.bin"


# ---------------------------------------------------------------------------------------------- listing

def test_list_prefix_paginates(s3: Any) -> None:
    shas = {f"loras/style-{i}.safetensors": put(s3, f"loras/style-{i}.safetensors", bytes([i]) * (100 + i),
                                                checksum=i % 2 == 0) for i in range(5)}
    put(s3, "loras/", b"")  # a folder marker
    put(s3, "other/x.bin", b"x")
    ref, objects = list_prefix("s3://models/loras", page_size=2)
    assert ref.key == "loras/"
    assert sorted(o.relpath for o in objects) == [f"style-{i}.safetensors" for i in range(5)]
    for o in objects:
        assert o.size == 100 + int(o.relpath[6])
        assert o.sha256 == (shas[o.key] if int(o.relpath[6]) % 2 == 0 else None)


def test_from_s3_cli(s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sha = put(s3, "lib/sd15/dreamy.safetensors", safetensors_of(b"d", 2000), checksum=True)
    put(s3, "lib/sd15/readme.txt", b"hello")
    put(s3, "lib/bad\\name.safetensors", b"b" * 10)
    put(s3, "lib/with space.safetensors", safetensors_of(b"s", 96), meta_sha=True)
    rc = cli("manifest", "from-s3", "s3://models/lib/", "--folder", "checkpoints", "--glob", "*.safetensors")
    out = capsys.readouterr()
    assert rc == 0, out.err
    doc = json.loads(out.out)
    assert doc == {"checkpoints": {
        "sd15/dreamy.safetensors": {"url": "s3://models/lib/sd15/dreamy.safetensors", "sha256": sha, "size": 2000},
        "with space.safetensors": {"url": "s3://models/lib/with%20space.safetensors",
                                   "sha256": hashlib.sha256(safetensors_of(b"s", 96)).hexdigest(), "size": 96}}}
    assert "skipped" in out.err and "backslash" in out.err
    manifest = tmp_path / "lib.json"
    assert cli("manifest", "from-s3", "s3://models/lib", "-f", "checkpoints", "-o", str(manifest)) == 0
    assert cli("manifest", "from-s3", "s3://models/lib", "-f", "checkpoints", "-o", str(manifest)) == 0  # idempotent
    out = capsys.readouterr()
    assert "0 added" in out.out and "3 unchanged" in out.out
    assert cli("--cache-dir", str(tmp_path / "cache"), "fetch", "--manifest", str(manifest)) == 0
    assert (tmp_path / "cache" / "checkpoints" / "sd15" / "readme.txt").read_bytes() == b"hello"
    assert (tmp_path / "cache" / "checkpoints" / "with space.safetensors").read_bytes() == safetensors_of(b"s", 96)
    no_secret(*capsys.readouterr())


def test_manifest_add_s3(s3: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    sha = put(s3, "vae/tiny.safetensors", safetensors_of(b"v", 3000), checksum=True)
    put(s3, "vae/unhashed.safetensors", safetensors_of(b"u", 3000))
    manifest = tmp_path / "m.json"
    rc = cli("--cache-dir", str(tmp_path / "cache"), "manifest", "add", "s3://models/vae/tiny.safetensors",
             "s3://models/vae/unhashed.safetensors", "-f", "vae", "-m", str(manifest), "--json")
    out = capsys.readouterr()
    assert rc == 0, out.err
    rows = [json.loads(line) for line in out.out.splitlines()]
    assert [r["hash_from"] for r in rows] == ["metadata", "download"]
    doc = json.loads(manifest.read_text())["vae"]
    assert doc["tiny.safetensors"] == {"url": "s3://models/vae/tiny.safetensors", "sha256": sha, "size": 3000}
    assert doc["unhashed.safetensors"]["sha256"] == hashlib.sha256(safetensors_of(b"u", 3000)).hexdigest()
    no_secret(out.out, out.err)


def test_missing_extra_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(SourceError, match=r"pip install 'comfyui-autocloud\[s3\]'"):
        resolve("s3://models/x.bin")

