"""Redaction, key validation, sizes and settings: the small pieces every layer relies on."""

from __future__ import annotations

import pytest

from comfy_autocloud.config import load_settings
from comfy_autocloud.errors import ManifestError
from comfy_autocloud.keys import check_relpath, check_sha256, make_key, split_key
from comfy_autocloud.redact import redact_headers, redact_text, redact_url
from comfy_autocloud.units import human_size, parse_rate, parse_size


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("https://user:hunter22@example.com/m.safetensors", "hunter22"),
        ("https://cdn.example.com/m.safetensors?token=abcd1234&x=1", "abcd1234"),
        ("https://s3.example.com/b/k?X-Amz-Signature=deadbeef99&X-Amz-Credential=AKIAXYZ", "deadbeef99"),
        ("https://civitai.com/api/download/models/1?api_key=topsecret", "topsecret"),
    ],
)
def test_redact_url_hides_credentials(url: str, secret: str) -> None:
    out = redact_url(url)
    assert secret not in out
    assert out.split("://")[0] == url.split("://")[0]


def test_redact_url_keeps_harmless_query() -> None:
    assert redact_url("https://h/x?download=true") == "https://h/x?download=true"


def test_redact_text_stops_at_sentence_punctuation() -> None:
    out = redact_text("failed (https://x.org/a?token=abc, then http://u:pw@h/x). HF_TOKEN=hf_abcdef", ["hf_abcdef"])
    assert "abc," not in out and "pw@" not in out and "hf_abcdef" not in out
    assert out.endswith("HF_TOKEN=***")
    assert "h/x)." in out


def test_redact_headers() -> None:
    assert redact_headers({"Authorization": "Bearer x", "Range": "bytes=0-1"}) == {
        "Authorization": "***", "Range": "bytes=0-1"}


@pytest.mark.parametrize(
    "bad",
    ["../x", "a/../../x", "/etc/passwd", "C:/x", "a\\b", "a\x00b", "", "a//b", "./a", "~/.ssh/id",
     ".autocloud/index.sqlite", "con.safetensors", "a" * 300],
)
def test_check_relpath_rejects_hostile(bad: str) -> None:
    with pytest.raises(ValueError):
        check_relpath(bad)


def test_keys_round_trip() -> None:
    assert make_key("checkpoints", "SDXL/juggernaut.safetensors") == "checkpoints/SDXL/juggernaut.safetensors"
    assert split_key("loras/a/b.safetensors") == ("loras", "a/b.safetensors")
    with pytest.raises(ValueError):
        split_key("nofolder")
    with pytest.raises(ValueError):
        make_key("a/b", "x")


def test_sha256_normalised() -> None:
    h = "AB" * 32
    assert check_sha256("sha256:" + h) == h.lower()
    with pytest.raises(ValueError):
        check_sha256("abc")


def test_sizes() -> None:
    assert parse_size("200G") == 200 * 2**30
    assert parse_size("1.5TiB") == int(1.5 * 2**40)
    assert parse_size("800MB") == 800 * 2**20
    assert parse_rate("40M/s") == 40 * 2**20
    assert human_size(1536) == "1.5 KiB"
    with pytest.raises(ValueError):
        parse_size("lots")


def test_settings_precedence(tmp_path, monkeypatch) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("max_size: 10G\npolicy: lru\n")
    monkeypatch.setenv("AUTOCLOUD_CONFIG", str(cfg))
    s = load_settings({"cache_dir": str(tmp_path / "c")}, env={"AUTOCLOUD_MAX_SIZE": "20G"})
    assert s.cache_dir == str(tmp_path / "c") and s.origins["cache_dir"] == "command line"
    assert s.max_size == 20 * 2**30 and s.origins["max_size"] == "env AUTOCLOUD_MAX_SIZE"
    assert s.policy == "lru" and s.origins["policy"] == str(cfg)


def test_settings_errors_name_the_setting(tmp_path, monkeypatch) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text("max_sise: 10G\n")
    monkeypatch.setenv("AUTOCLOUD_CONFIG", str(cfg))
    with pytest.raises(ManifestError, match="max_sise"):
        load_settings(env={})
    cfg.write_text("")
    with pytest.raises(ManifestError, match="AUTOCLOUD_MAX_SIZE:max_size"):
        load_settings(env={"AUTOCLOUD_MAX_SIZE": "huge"})


def test_deprecated_prefetch_setting_names_still_work(tmp_path, monkeypatch, capsys) -> None:
    """The background disk prefetch settings were named preload*; the old names (config file and
    AUTOCLOUD_PRELOAD*) still work, after the new ones, and `autocloud config` says they are deprecated."""
    import json

    from cli_helpers import run_cli

    cfg = tmp_path / "config.yaml"
    cfg.write_text("preload: true\npreload_top: 3\nprefetch_interval: 60\npreload_interval: 999\n")
    monkeypatch.setenv("AUTOCLOUD_CONFIG", str(cfg))
    env = {"AUTOCLOUD_PRELOAD_RATE": "10M"}
    s = load_settings(env=env)
    assert s.prefetch_background is True and s.prefetch_top == 3 and s.prefetch_rate == 10 * 2**20
    assert s.prefetch_interval == 60.0 and s.origins["prefetch_interval"] == str(cfg)  # the new name wins
    assert s.origins["prefetch_background"] == f"{cfg}: preload (deprecated: use prefetch_background)"
    assert s.origins["prefetch_rate"] == "env AUTOCLOUD_PRELOAD_RATE (deprecated: use AUTOCLOUD_PREFETCH_RATE)"
    s = load_settings(env={**env, "AUTOCLOUD_PREFETCH_RATE": "20M"})
    assert s.prefetch_rate == 20 * 2**20 and s.origins["prefetch_rate"] == "env AUTOCLOUD_PREFETCH_RATE"
    assert "preload" not in s.values and "preload_rate" not in s.values
    with pytest.raises(ManifestError, match="AUTOCLOUD_PRELOAD_TOP:prefetch_top"):
        load_settings(env={"AUTOCLOUD_PRELOAD_TOP": "many"})

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AUTOCLOUD_CACHE", str(tmp_path / "c"))
    assert run_cli("config", "--json") == 0
    shown = json.loads(capsys.readouterr().out)["settings"]
    assert shown["prefetch_background"] == {"value": True,
                                            "from": f"{cfg}: preload (deprecated: use prefetch_background)"}
    assert "deprecated" in shown["prefetch_rate"]["from"] and "deprecated" not in shown["policy"]["from"]
    assert run_cli("config") == 0
    assert "deprecated" in capsys.readouterr().out
