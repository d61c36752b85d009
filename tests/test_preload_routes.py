"""The preload routes and `autocloud status --comfy-url`, without ComfyUI and without torch: a registry
whose backend loads plain Python objects, served by the pack's real aiohttp handlers on a background-thread server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from click.testing import CliRunner

from comfy_autocloud.aiothread import AppThread
from comfy_autocloud.cli.group import cli
from comfy_autocloud.comfy.routes import preload_route_defs
from comfy_autocloud.preload.held_models import LoadRequest, PreloadRegistry, set_current
from comfy_autocloud.preload.load_requests import checkpoint_request, vae_request


class ObjectBackend:
    """Objects are dicts read from small JSON files; a clone is a copy (enough for routes and status)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def resolve(self, req: LoadRequest) -> list[Path]:
        paths = [self.root / f for f in req.files]
        missing = [p.name for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{', '.join(missing)} not found")
        return paths

    def load(self, req: LoadRequest, paths: list[Path]) -> Any:
        return json.loads(paths[0].read_text())

    def clone(self, req: LoadRequest, value: Any) -> Any:
        return dict(value)

    def tensors(self, value: Any) -> dict[str, Any]:
        return {}

    def to_device(self, value: Any, device: str) -> str:
        return "cpu"


def route_app() -> web.Application:
    app = web.Application()
    app.add_routes(preload_route_defs())
    return app


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, PreloadRegistry]]:
    (tmp_path / "a.safetensors").write_text(json.dumps({"w": 1}))
    reg = PreloadRegistry(ObjectBackend(tmp_path))
    reg.queue([checkpoint_request("a.safetensors", "ckpt-a"), vae_request("gone.safetensors")])
    reg.report_error("preload_config.json:models.vaes[3].vae_name: missing")
    set_current(reg)
    try:
        with AppThread(route_app, name="preload-routes") as srv:
            yield f"http://127.0.0.1:{srv.port}", reg
    finally:
        set_current(None)


def test_load_all_then_status_and_cli(served: tuple[str, PreloadRegistry], tmp_path: Path) -> None:
    import urllib.request

    url, _reg = served
    req = urllib.request.Request(url + "/autocloud/preload/load_all", data=b'{"device": "cpu"}',
                                 method="POST", headers={"Content-Type": "application/json"})
    body = json.loads(urllib.request.urlopen(req, timeout=10).read())
    assert body["counts"] == {"queued": 0, "loading": 0, "ready": 1, "failed": 1}
    gone = next(e for e in body["entries"] if e["name"] == "vae:gone.safetensors")
    assert gone["state"] == "failed" and "gone.safetensors not found" in gone["error"]
    st = json.loads(urllib.request.urlopen(url + "/autocloud/preload", timeout=10).read())
    assert st["loads"] == 1 and st["config_errors"] == ["preload_config.json:models.vaes[3].vae_name: missing"]

    env = {"AUTOCLOUD_CACHE": str(tmp_path / "cache"), "AUTOCLOUD_CONFIG": str(tmp_path / "none.yaml")}
    human = CliRunner().invoke(cli, ["status", "--comfy-url", url], env=env)
    assert human.exit_code == 0, human.output
    assert "memory preload" in human.output and "ckpt-a" in human.output and "ready" in human.output
    as_json = CliRunner().invoke(cli, ["status", "--json"], env={**env, "AUTOCLOUD_COMFY_URL": url})
    assert as_json.exit_code == 0, as_json.output
    doc = json.loads(as_json.output)
    assert {e["name"]: e["state"] for e in doc["preload"]["entries"]} == {"ckpt-a": "ready",
                                                                        "vae:gone.safetensors": "failed"}


def test_to_gpu_route_and_no_registry(served: tuple[str, PreloadRegistry]) -> None:
    import urllib.error
    import urllib.request

    url, reg = served
    reg.preload()
    req = urllib.request.Request(url + "/autocloud/preload/to_gpu", data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    body = json.loads(urllib.request.urlopen(req, timeout=10).read())
    assert body["devices"] == {"ckpt-a": "cpu"}
    set_current(None)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(url + "/autocloud/preload", timeout=10)
    assert err.value.code == 400 and "not running" in json.loads(err.value.read())["error"]


def test_cli_status_with_comfy_down(tmp_path: Path) -> None:
    env = {"AUTOCLOUD_CACHE": str(tmp_path / "cache"), "AUTOCLOUD_CONFIG": str(tmp_path / "none.yaml")}
    out = CliRunner().invoke(cli, ["status", "--json", "--comfy-url", "http://127.0.0.1:9"], env=env)
    assert out.exit_code == 0, out.output
    assert "no preload status" in json.loads(out.output)["preload"]["error"]
