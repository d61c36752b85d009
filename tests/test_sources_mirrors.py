"""Several sources for one file (mirrors) and `manifest add`'s writer: agreement on the hash, no overwrites."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_helpers import run_cli as cli

pytest.importorskip("huggingface_hub", reason="the mirror tests use an hf:// mirror")

from comfy_autocloud.errors import AutoCloudError, ManifestError
from comfy_autocloud.fetch import FetchService
from comfy_autocloud.manifest import load_manifest
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.manifest.write import add_entries
from comfy_autocloud.store import Store
from fake_civitai import CIVITAI_TOKEN, FakeCivitai, FakeFile
from fake_hub import HUB_TOKEN, FakeHub
from servers import safetensors_of

DATA = safetensors_of(hashlib.sha256(b"mirror").digest(), 32 * 10_000)  # 320 kB
OTHER = safetensors_of(hashlib.sha256(b"other").digest(), 32 * 10_000)
SHA = hashlib.sha256(DATA).hexdigest()
OTHER_SHA = hashlib.sha256(OTHER).hexdigest()


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[FakeHub, FakeCivitai]]:
    hub = FakeHub().start()
    civ = FakeCivitai().start()
    hub.add_commit("acme/mirror", {"m.safetensors": DATA})
    civ.add_version(10, 1, [FakeFile("m.safetensors", DATA, primary=True)])
    civ.add_version(20, 2, [FakeFile("m.safetensors", OTHER, primary=True)])  # a different file, same name
    try:
        yield hub, civ
    finally:
        hub.stop()
        civ.stop()


@pytest.fixture
def env(servers: tuple[FakeHub, FakeCivitai], monkeypatch: pytest.MonkeyPatch) -> tuple[FakeHub, FakeCivitai]:
    hub, civ = servers
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("HF_TOKEN", HUB_TOKEN)
    monkeypatch.setenv("CIVITAI_API_BASE", civ.base)
    monkeypatch.setenv("CIVITAI_TOKEN", CIVITAI_TOKEN)
    return servers


def no_secret(*texts: str) -> None:
    for text in texts:
        assert HUB_TOKEN not in text and CIVITAI_TOKEN not in text


# ---------------------------------------------------------------------------------------------- fetching

def test_mirrors_are_tried_in_order(env: tuple[FakeHub, FakeCivitai], tmp_path: Path) -> None:
    spec = ModelSpec(folder="checkpoints", filename="m.safetensors", sha256=SHA,
                     sources=("civitai:999", "hf://acme/missing/m.safetensors", "hf://acme/mirror/m.safetensors"))
    res = FetchService(Store(tmp_path / "cache")).fetch(spec)
    assert res.sha256 == SHA and res.source.startswith("hf://acme/mirror/m.safetensors")


def test_a_mirror_publishing_another_hash_is_rejected(env: tuple[FakeHub, FakeCivitai], tmp_path: Path) -> None:
    """civitai:20 publishes (and serves) a different file than the manifest's sha256 names."""
    store = Store(tmp_path / "cache")
    spec = ModelSpec(folder="checkpoints", filename="m.safetensors", sha256=SHA, sources=("civitai:20",))
    with pytest.raises(AutoCloudError) as info:
        FetchService(store).fetch(spec)
    text = f"{info.value.subject}: {info.value.reason}"
    assert SHA in text and OTHER_SHA in text  # both hashes named
    assert "civitai:20" in text
    assert store.lookup(spec.key) is None and not (tmp_path / "cache" / "checkpoints" / "m.safetensors").exists()
    no_secret(text)


# ---------------------------------------------------------------------------------------------- manifest add

def test_add_with_agreeing_mirrors(env: tuple[FakeHub, FakeCivitai], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.json"
    rc = cli("--cache-dir", str(tmp_path / "cache"), "manifest", "add", "hf://acme/mirror/m.safetensors",
             "--mirror", "https://civitai.com/api/download/models/10", "-f", "checkpoints", "-m", str(manifest))
    out = capsys.readouterr()
    assert rc == 0, out.err
    entry = json.loads(manifest.read_text())["checkpoints"]["m.safetensors"]
    assert entry == {"urls": ["hf://acme/mirror/m.safetensors", "civitai:10"], "sha256": SHA, "size": len(DATA)}
    (spec,) = load_manifest(manifest)
    assert spec.sources == ("hf://acme/mirror/m.safetensors", "civitai:10")
    no_secret(out.out, out.err)


def test_add_with_disagreeing_mirrors_writes_nothing(env: tuple[FakeHub, FakeCivitai], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.json"
    rc = cli("--cache-dir", str(tmp_path / "cache"), "manifest", "add", "hf://acme/mirror/m.safetensors",
             "--mirror", "civitai:20", "-f", "checkpoints", "-m", str(manifest))
    out = capsys.readouterr()
    assert rc == 1
    assert "disagree on the sha256" in out.err and SHA in out.err and OTHER_SHA in out.err
    assert not manifest.exists()
    no_secret(out.out, out.err)


def test_add_refuses_to_overwrite_a_conflicting_entry(env: tuple[FakeHub, FakeCivitai], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"checkpoints": {"m.safetensors": {"url": "https://example.com/m.safetensors",
                                                                      "sha256": OTHER_SHA, "pin": True}}}))
    before = manifest.read_text()
    rc = cli("--cache-dir", str(tmp_path / "cache"), "manifest", "add", "civitai:10", "-f", "checkpoints",
             "-m", str(manifest))
    out = capsys.readouterr()
    assert rc == 1 and "refusing to overwrite" in out.err
    assert manifest.read_text() == before
    # the same file under the same hash: the new source joins as a mirror, other keys stay
    manifest.write_text(json.dumps({"checkpoints": {"m.safetensors": {"url": "https://example.com/m.safetensors",
                                                                      "sha256": SHA, "pin": True}}}))
    assert cli("--cache-dir", str(tmp_path / "cache"), "manifest", "add", "civitai:10", "-f", "checkpoints",
               "-m", str(manifest)) == 0
    entry = json.loads(manifest.read_text())["checkpoints"]["m.safetensors"]
    assert entry == {"urls": ["https://example.com/m.safetensors", "civitai:10"], "sha256": SHA, "pin": True,
                     "size": len(DATA)}


# ---------------------------------------------------------------------------------------------- writer

def _spec(name: str, *sources: str, sha: str | None = None, size: int | None = None) -> ModelSpec:
    return ModelSpec(folder="loras", filename=name, sources=sources, sha256=sha, size=size)


def test_writer_creates_merges_and_is_idempotent(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "list.json"
    out = add_entries(path, [_spec("a.safetensors", "https://x/a"), _spec("b.safetensors", "s3://b/b", sha=SHA)])
    assert [o.action for o in out] == ["added", "added"]
    text = path.read_text()
    assert text.endswith("}\n") and json.loads(text) == {"loras": {
        "a.safetensors": "https://x/a", "b.safetensors": {"url": "s3://b/b", "sha256": SHA}}}
    assert [o.action for o in add_entries(path, [_spec("b.safetensors", "s3://b/b", sha=SHA)])] == ["unchanged"]
    assert path.read_text() == text
    # a hash for an entry that had none, from the same source: filled in
    out = add_entries(path, [_spec("a.safetensors", "https://x/a", sha=OTHER_SHA, size=5)])
    assert out[0].action == "merged"
    assert json.loads(path.read_text())["loras"]["a.safetensors"] == {"url": "https://x/a", "sha256": OTHER_SHA,
                                                                      "size": 5}
    assert [p.name for p in path.parent.iterdir()] == ["list.json"]  # no temp or lock files left behind


@pytest.mark.parametrize("new, why", [
    (_spec("b.safetensors", "s3://b/b", sha=OTHER_SHA), "already listed with sha256"),
    (_spec("b.safetensors", "s3://b/b", sha=SHA, size=9), None),
    (_spec("c.safetensors", "https://elsewhere/c"), "cannot be shown to serve the same file"),
])
def test_writer_conflicts_change_nothing(tmp_path: Path, new: ModelSpec, why: str | None) -> None:
    path = tmp_path / "list.json"
    add_entries(path, [_spec("b.safetensors", "s3://b/b", sha=SHA, size=10), _spec("c.safetensors", "https://x/c")])
    before = path.read_text()
    if why is None:  # a size that contradicts the recorded one
        why = "already listed with size 10"
    with pytest.raises(ManifestError, match=why):
        add_entries(path, [_spec("z.safetensors", "https://x/z"), new])  # all or nothing: z is not added either
    assert path.read_text() == before


def test_writer_refuses_broken_or_foreign_files(tmp_path: Path) -> None:
    broken = tmp_path / "broken.json"
    broken.write_text('{"loras": {"a.safetensors": "https://x/a",')
    with pytest.raises(ManifestError, match="invalid JSON"):
        add_entries(broken, [_spec("b.safetensors", "https://x/b")])
    assert broken.read_text() == '{"loras": {"a.safetensors": "https://x/a",'
    listy = tmp_path / "list.json"
    listy.write_text("[1, 2]")
    with pytest.raises(ManifestError, match="not a model list"):
        add_entries(listy, [_spec("b.safetensors", "https://x/b")])
    os.chmod(listy, 0o600)
    listy.write_text("{}")
    add_entries(listy, [_spec("b.safetensors", "https://x/b")])
    assert os.stat(listy).st_mode & 0o777 == 0o600  # the file's mode survives the rename


def test_a_mirror_publishing_another_hash_is_skipped_before_download(env: tuple[FakeHub, FakeCivitai],
                                                                     tmp_path: Path) -> None:
    """A wrong mirror listed first costs no download: the next mirror serves the file."""
    spec = ModelSpec(folder="checkpoints", filename="m.safetensors", sha256=SHA,
                     sources=("civitai:20", "hf://acme/mirror/m.safetensors"))
    res = FetchService(Store(tmp_path / "cache")).fetch(spec)
    assert res.sha256 == SHA and res.source.startswith("hf://acme/mirror/m.safetensors")
    assert res.bytes_downloaded == len(DATA)
