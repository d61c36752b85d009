"""`autocloud manifest check`: table, --json and errors, through a local click group."""

from __future__ import annotations

import json
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from comfy_autocloud.cli import output
from comfy_autocloud.cli.context import AppContext
from comfy_autocloud.cli.manifest_cmd import manifest_cmd
from comfy_autocloud.config import load_settings
from comfy_autocloud.errors import ManifestError

DATA = Path(__file__).parent / "data" / "manifests"


@pytest.fixture
def run(monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOCLOUD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(output.console, "width", 300)  # no folding: assertions see whole cells
    group = click.Group()
    group.add_command(manifest_cmd)

    def invoke(*args: str):
        return CliRunner().invoke(group, ["manifest", "check", *args], obj=AppContext(load_settings()))

    return invoke


def test_check_table_and_summary(run, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"loras": {"s.safetensors": {
        "url": "https://cdn.example.com/s.safetensors?token=TOPSECRET", "size": 151_000_000, "pin": True}}}))
    res = run(str(DATA / "valid" / "split"), str(DATA / "valid" / "warmup_models.conf"), str(secret))
    assert res.exit_code == 0, res.output
    out = res.output
    assert "checkpoints/juggernautXL.safetensors" in out
    assert "https://mirror.example.org/xl/juggernautXL.safetensors" in out
    assert "33e2c8f7c5b3…" in out
    assert "144.0 MiB" in out and "yes" in out
    assert "TOPSECRET" not in out and "token=***" in out
    assert f"{DATA / 'valid' / 'warmup_models.conf'}:5" in out
    assert "13 entries from 5 file(s): 1 with sha256, 6 without a source, 2 warmup glob pattern(s)" in out


def test_check_json_lines(run):
    res = run("--json", str(DATA / "valid" / "model_list_objects.json"))
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert [r["key"] for r in rows] == [
        "checkpoints/SDXL/juggernautXL.safetensors", "text_encoders/t5xxl_fp8_e4m3fn.safetensors",
        "upscale_models/4x-UltraSharp.pth", "loras/civitai_style.safetensors"]
    assert rows[0]["sources"][1] == "hf://RunDiffusion/Juggernaut-XL/juggernautXL.safetensors@main"
    assert rows[0]["size"] == 7105348188 and rows[0]["pin"] is True and rows[0]["tags"] == ["sdxl", "base"]
    assert set(rows[0]) == {"key", "folder", "filename", "sources", "sha256", "size", "pin", "tags",
                            "preload", "defined_in"}


def test_check_json_preload(run):
    res = run("--json", str(DATA / "valid" / "preload_config.json"))
    rows = [json.loads(line) for line in res.output.splitlines()]
    assert rows[3]["preload"] == {"kind": "diffusion_model", "cache_key": "", "weight_dtype": "fp8_e4m3fn"}


def test_check_bad_input_raises_manifest_error(run):
    res = run(str(DATA / "hostile" / "conflict_a.json"), str(DATA / "hostile" / "conflict_b.json"))
    assert res.exit_code == 1
    assert isinstance(res.exception, ManifestError)
    assert res.exception.subject.endswith("conflict_b.json:loras.style.safetensors")
    assert "SECRET-TOKEN-456" not in str(res.exception)


def test_check_needs_a_path(run):
    res = run()
    assert res.exit_code == 2 and "Missing argument" in res.output
