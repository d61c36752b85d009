"""`autocloud manifest sync`: versioned lists from a real nginx origin, all-or-nothing, and live reload."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from comfy_autocloud.cli.main import main
from comfy_autocloud.comfy.runtime import Adapter
from comfy_autocloud.config import load_settings
from comfy_autocloud.errors import AutoCloudError, IntegrityError, ManifestError, TransferError
from comfy_autocloud.fetch import FetchService
from comfy_autocloud.fetch.sync import INDEX_NAME, JOURNAL_NAME, locked_view, sync_manifests
from comfy_autocloud.manifest.versions import parse_versions_index
from comfy_autocloud.store import Store
from comfy_autocloud.transfer import RetryPolicy, TransferOptions
from servers import NginxOrigin, nginx_running

pytestmark = pytest.mark.skipif(not NginxOrigin.available(), reason="nginx is not installed (./dev test installs it)")


@pytest.fixture
def origin(tmp_path: Path) -> Iterator[NginxOrigin]:
    with nginx_running(tmp_path / "www", tmp_path / "nginx") as o:
        yield o


def _publish(origin: NginxOrigin, name: str, doc: Any, *, hash_kind: str = "md5", version: Any = 1,
             raw: bytes | None = None, claim: bytes | None = None) -> dict[str, Any]:
    """Put a list on the origin; the index entry for it (hash of `claim` when given: a lying index)."""
    data = raw if raw is not None else json.dumps(doc).encode()
    path = origin.data_dir / "lists" / f"{name}-v{version}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    digest = getattr(hashlib, hash_kind)(claim if claim is not None else data).hexdigest()
    return {"url": origin.url(f"lists/{path.name}"), hash_kind: digest, "version": version}


def _index(origin: NginxOrigin, entries: dict[str, Any], name: str = "model_versions.json") -> str:
    (origin.data_dir / name).write_text(json.dumps(entries))
    return origin.url(name)


def _service(tmp_path: Path) -> FetchService:
    opts = TransferOptions(retry=RetryPolicy(attempts=1))
    return FetchService(Store(tmp_path / "cache"), options=opts)


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()}


BASE = {"checkpoints": {"a.safetensors": "https://cdn.example.com/a.safetensors"}}
LORA = {"loras": {"l1.safetensors": "https://cdn.example.com/l1.safetensors"}}


def test_sync_installs_updates_and_removes(origin: NginxOrigin, tmp_path: Path) -> None:
    d = tmp_path / "lists"
    svc = _service(tmp_path)
    url = _index(origin, {"base_models": _publish(origin, "base", BASE),
                          "lora_models": _publish(origin, "lora", LORA, hash_kind="sha256")})
    report = sync_manifests(url, d, svc)
    assert {c.name: c.action for c in report.changes} == {"base_models": "added", "lora_models": "added"}
    assert report.entries == 2
    assert json.loads((d / "base_models.json").read_text()) == BASE
    assert [v.name for v in parse_versions_index(d / INDEX_NAME)] == ["base_models", "lora_models"]
    assert not list(d.glob(".sync-*"))

    again = sync_manifests(url, d, svc)  # nothing changed: no list is downloaded again
    assert not again.changed
    served = [e for e in origin.entries() if "/lists/" in e.uri and e.method == "GET"]
    assert len(served) == 2

    base2 = {"checkpoints": {"b.safetensors": "https://cdn.example.com/b.safetensors"}}
    url = _index(origin, {"base_models": _publish(origin, "base", base2, version="2")})
    report = sync_manifests(url, d, svc)
    changes = {c.name: (c.action, c.old_version, c.new_version) for c in report.changes}
    assert changes == {"base_models": ("updated", "1", "2"), "lora_models": ("removed", "1", None)}
    assert json.loads((d / "base_models.json").read_text()) == base2
    assert not (d / "lora_models.json").exists()


@pytest.mark.parametrize("case", ["index 404", "index not json", "index not an index", "list 404",
                                  "hash mismatch", "invalid list", "contradicting lists", "sha256 mismatch"])
def test_failed_sync_keeps_the_last_good_lists(origin: NginxOrigin, tmp_path: Path, case: str) -> None:
    d = tmp_path / "lists"
    svc = _service(tmp_path)
    good = _index(origin, {"base_models": _publish(origin, "base", BASE),
                           "lora_models": _publish(origin, "lora", LORA)})
    sync_manifests(good, d, svc)
    before = _snapshot(d)

    new_base = {"checkpoints": {"c.safetensors": "https://cdn.example.com/c.safetensors"}}
    entries = {"base_models": _publish(origin, "base", new_base, version=2),
               "lora_models": _publish(origin, "lora", LORA)}
    expected: type[AutoCloudError] = ManifestError
    url = None
    if case == "index 404":
        url, expected = origin.url("missing_index.json"), TransferError
    elif case == "index not json":
        (origin.data_dir / "broken.json").write_text('{"base_models": {"url": ')
        url = origin.url("broken.json")
    elif case == "index not an index":
        url = _index(origin, {"base_models": {"url": origin.url("x.json")}}, "noindex.json")
    elif case == "list 404":
        entries["lora_models"] = {"url": origin.url("lists/gone.json"), "md5": "0" * 32}
        expected = TransferError
    elif case == "hash mismatch":
        entries["base_models"] = _publish(origin, "base", new_base, version=3, claim=b"other bytes")
    elif case == "sha256 mismatch":
        entries["base_models"] = _publish(origin, "base", new_base, version=3, hash_kind="sha256",
                                          claim=b"other bytes")
        expected = IntegrityError
    elif case == "invalid list":
        entries["base_models"] = _publish(origin, "base", None, version=4,
                                          raw=b'{"checkpoints": {"../../etc/passwd": "https://x/y"}}')
    elif case == "contradicting lists":
        sha_a, sha_b = "a" * 64, "b" * 64
        entries["base_models"] = _publish(origin, "base", {"loras": {"l1.safetensors": {
            "url": "https://cdn.example.com/l1.safetensors", "sha256": sha_a}}}, version=5)
        entries["lora_models"] = _publish(origin, "lora", {"loras": {"l1.safetensors": {
            "url": "https://cdn.example.com/l1.safetensors", "sha256": sha_b}}}, version=5)
    url = url or _index(origin, entries, f"index-{case.replace(' ', '_')}.json")
    with pytest.raises(expected) as err:
        sync_manifests(url, d, svc)
    assert "last good" in err.value.reason, err.value
    assert _snapshot(d) == before, f"{case}: the directory changed"
    assert not list(d.glob(".sync-*"))


def test_interrupted_sync_is_rolled_forward(tmp_path: Path) -> None:
    """A sync killed between its renames left a journal: the next reader finishes it, all or nothing."""
    d = tmp_path / "lists"
    d.mkdir()
    (d / "base_models.json").write_text(json.dumps(BASE))
    stage = d / ".sync-killed"
    stage.mkdir()
    new_base = {"checkpoints": {"n.safetensors": "https://cdn.example.com/n.safetensors"}}
    (stage / "base_models.json").write_text(json.dumps(new_base))
    (stage / "lora_models.json").write_text(json.dumps(LORA))
    (d / JOURNAL_NAME).write_text(json.dumps({"stage": stage.name, "install": ["base_models.json",
                                                                               "lora_models.json"],
                                              "remove": []}))
    (d / ".sync-older").mkdir()  # a sync killed before its journal: only its stage is left
    with locked_view(d):
        assert json.loads((d / "base_models.json").read_text()) == new_base
        assert (d / "lora_models.json").exists()
    assert not (d / JOURNAL_NAME).exists() and not list(d.glob(".sync-*"))


def test_cli_sync_json_and_error_exit(origin: NginxOrigin, tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                      ) -> None:
    d = tmp_path / "lists"
    url = _index(origin, {"base_models": _publish(origin, "base", BASE)})
    rc = main(["--cache-dir", str(tmp_path / "cache"), "manifest", "sync", url, "--dir", str(d), "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["changed"] and out["lists"][0]["action"] == "added" and out["entries"] == 1
    rc = main(["--cache-dir", str(tmp_path / "cache"), "manifest", "sync", origin.url("nope.json"), "--dir", str(d)])
    err = capsys.readouterr().err
    assert rc == 1 and "versions index" in err and "404" in err and "last good" in err
    assert json.loads((d / "base_models.json").read_text()) == BASE


def _adapter(tmp_path: Path, d: Path, reload: float) -> Adapter:
    env = {"AUTOCLOUD_CACHE": str(tmp_path / "cache"), "AUTOCLOUD_MANIFEST": str(d),
           "AUTOCLOUD_MANIFEST_RELOAD": str(reload)}
    return Adapter.create(load_settings(env=env))


def test_running_adapter_picks_up_a_sync(origin: NginxOrigin, tmp_path: Path) -> None:
    d = tmp_path / "lists"
    svc = _service(tmp_path)
    sync_manifests(_index(origin, {"base_models": _publish(origin, "base", BASE),
                                   "lora_models": _publish(origin, "lora", LORA)}), d, svc)
    adapter = _adapter(tmp_path, d, 0)
    changed: list[str] = []
    adapter.on_commit(changed.append)
    try:
        adapter.spec_for_request({"url": "https://huggingface.co/o/r/resolve/main/api.safetensors", "folder": "vae"})
        assert adapter.catalog.lookup("checkpoints", "a.safetensors") is not None
        assert not adapter.check_manifests()  # nothing changed on disk
        base2 = {"checkpoints": {"b.safetensors": "https://cdn.example.com/b.safetensors"}}
        sync_manifests(_index(origin, {"base_models": _publish(origin, "base", base2, version=2)}), d, svc)
        assert adapter.check_manifests()
        assert adapter.catalog.lookup("checkpoints", "a.safetensors") is None  # removed from the list
        assert adapter.catalog.lookup("checkpoints", "b.safetensors") is not None
        assert adapter.catalog.lookup("loras", "l1.safetensors") is None  # its list left the index
        assert {"checkpoints/", "loras/"} <= set(changed)  # ComfyUI's file-list caches are dropped
        assert adapter.catalog.lookup("vae", "api.safetensors") is not None  # API-added entries stay

        # A broken edit by hand: the previous catalog keeps serving, the error is shown.
        (d / "base_models.json").write_text("{broken")
        assert adapter.check_manifests()
        assert adapter.manifest_error and adapter.catalog.lookup("checkpoints", "b.safetensors") is not None
    finally:
        adapter.close()


def test_adapter_watcher_reloads_by_itself(origin: NginxOrigin, tmp_path: Path) -> None:
    d = tmp_path / "lists"
    svc = _service(tmp_path)
    sync_manifests(_index(origin, {"base_models": _publish(origin, "base", BASE)}), d, svc)
    adapter = _adapter(tmp_path, d, 0.05)
    try:
        assert adapter._watcher is not None
        sync_manifests(_index(origin, {"base_models": _publish(origin, "base", BASE),
                                       "lora_models": _publish(origin, "lora", LORA)}), d, svc)
        deadline = time.monotonic() + 5
        while adapter.catalog.lookup("loras", "l1.safetensors") is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert adapter.catalog.lookup("loras", "l1.safetensors") is not None
    finally:
        adapter.close()
