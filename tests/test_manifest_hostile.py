"""Hostile and broken manifests: every one is a ManifestError naming file:key (or file:line) and why."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from comfy_autocloud.errors import ManifestError
from comfy_autocloud.manifest import (
    MAX_MANIFEST_BYTES,
    load_manifest,
    load_manifests,
    parse_preload_config,
    parse_versions_index,
    parse_warmup_conf,
    workflow_model_refs,
)

HOSTILE = Path(__file__).parent / "data" / "manifests" / "hostile"


def err(fn, *args) -> ManifestError:
    with pytest.raises(ManifestError) as ei:
        fn(*args)
    return ei.value


@pytest.mark.parametrize("name,where,reason", [
    ("dotdot.json", "checkpoints.../../etc/passwd", "'..' component"),
    ("absolute.json", "checkpoints./etc/shadow", "is absolute"),
    ("backslash.json", "loras.sub\\..\\x.safetensors", "backslash"),
    ("drive.json", "vae.C:/Windows/x.safetensors", "is absolute"),
    ("nul.json", "vae.a\\x00b.safetensors", "NUL byte"),  # escaped in the subject, never raw
    ("folder_dotdot.json", "..", "a model folder such as 'checkpoints'"),
    ("ftp.json", "loras.x.safetensors", "unsupported source scheme 'ftp'"),
    ("javascript.json", "loras.x.safetensors", "unsupported source scheme 'javascript'"),
    ("gopher.json", "loras.x.safetensors.urls[1]", "unsupported source scheme 'gopher'"),
    ("bad_sha.json", "loras.x.safetensors.sha256", "64 hex digits"),
    ("dup_keys.json", "loras.x.safetensors", "more than once"),
    ("unknown_key.json", "loras.x.safetensors.sha265", "unknown key 'sha265'; an entry may have: url, urls"),
    ("empty_folder.json", "loras", "folder has no entries"),
    ("folder_not_object.json", "loras", "expected an object mapping filenames to URLs, got a list"),
    ("models.yaml", "1", "YAML manifests are not supported"),
    ("not_utf8.json", "1", "not valid UTF-8 (byte 0xe9)"),
    ("not_utf8.conf", "2", "not valid UTF-8 (byte 0xff)"),
    ("warmup_hostile.conf", "3", "'..' component"),
    ("preload_bad_dtype.json", "models.diffusion_models[0].weight_dtype", "'fp8_e4m3fn_fast' or 'fp8_e5m2'"),
    ("preload_bad_clip_type.json", "models.text_encoders[0].type", "'sdxl' is not a CLIPLoader type"),
    ("preload_typo.json", "models.vaes[0].vae_nmae", "unknown key 'vae_nmae'; expected one of: cache_key"),
    ("workflow_api_traversal.json", "4.inputs.ckpt_name", "'..' component"),
    ("workflow_ui_bad_url.json", "models[0].url", "unsupported source scheme 'javascript'"),
])
def test_hostile_file(name, where, reason):
    e = err(load_manifest, HOSTILE / name)
    assert e.subject == f"{HOSTILE / name}:{where}"
    assert reason in e.reason
    assert "\x00" not in str(e)


def test_secret_in_url_never_reaches_the_error():
    e = err(load_manifest, HOSTILE / "secret_url.json")
    assert "hunter2" not in str(e) and "SECRET-TOKEN-123" not in str(e)
    e = err(load_manifests, [HOSTILE / "conflict_a.json", HOSTILE / "conflict_b.json"])
    assert "SECRET-TOKEN-456" not in str(e) and "token=***" in e.reason


def test_secret_in_a_key_is_redacted_in_the_subject(tmp_path):
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"loras": {"https://x.example.com/a?token=SECRET-789": "https://x.example.com/a"}}))
    e = err(load_manifest, path)
    assert "SECRET-789" not in str(e) and "token=***" in e.subject


def test_huge_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "huge.json"
    with path.open("wb") as fh:
        fh.truncate(MAX_MANIFEST_BYTES + 1)  # sparse: costs no disk
    e = err(load_manifest, path)
    assert e.subject == f"{path}:1" and "16 MiB" in e.reason


@pytest.mark.parametrize("levels", [100, 200_000])
def test_deep_nesting(tmp_path, levels):
    path = tmp_path / "deep.json"
    path.write_text('{"loras": ' + "[" * levels + "]" * levels + "}")
    e = err(load_manifest, path)
    assert "nested" in e.reason and e.subject.startswith(f"{path}:")


def test_invalid_json_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "loras": {\n    "x.safetensors": "https://a.example.com/x",\n  }\n}\n')
    e = err(load_manifest, path)
    assert e.subject == f"{path}:4" and "invalid JSON" in e.reason


@pytest.mark.parametrize("text,where,reason", [
    ('{"loras": {"x.pt": NaN}}', "1", "NaN is not valid JSON"),
    ('{"loras": {"\\ud800.pt": "https://a.example.com/x"}}', "loras.\\ud800.pt", "lone UTF-16 surrogate"),
    ('["https://a.example.com/x"]', "1", "expected a JSON object"),
    ('{"loras": {"x.pt": 5}}', "loras.x.pt", "expected a URL string or an object"),
    ('{"loras": {"x.pt": {"url": "https://a.example.com/x", "urls": ["https://b.example.com/x"]}}}',
     "loras.x.pt", "exactly one of 'url'"),
    ('{"loras": {"x.pt": {"urls": []}}}', "loras.x.pt.urls", "non-empty list"),
    ('{"loras": {"x.pt": {"url": "https://a.example.com/x", "size": -1}}}', "loras.x.pt.size",
     "non-negative"),
    ('{"loras": {"x.pt": {"url": "https://a.example.com/x", "size": true}}}', "loras.x.pt.size", "integer"),
    ('{"loras": {"x.pt": {"url": "https://a.example.com/x", "pin": "yes"}}}', "loras.x.pt.pin",
     "true or false"),
    ('{"loras": {"x.pt": {"url": "https://a.example.com/x", "tags": ["a\\u0007"]}}}', "loras.x.pt.tags",
     "control characters"),
    ('{"loras": {"x.pt": "https://a.example.com/x y"}}', "loras.x.pt", "whitespace"),
    ('{"loras": {"x.pt": ""}}', "loras.x.pt", "source is empty"),
    ('{"lo/ras": {"x.pt": "https://a.example.com/x"}}', "lo/ras", "single name"),
    ('{"loras": {"CON.safetensors": "https://a.example.com/x"}}', "loras.CON.safetensors", "reserved device"),
    ('{"loras": {".autocloud/x.pt": "https://a.example.com/x"}}', "loras..autocloud/x.pt", "reserved name"),
])
def test_hostile_model_list(tmp_path, text, where, reason):
    path = tmp_path / "m.json"
    path.write_text(text, encoding="utf-8")
    e = err(load_manifest, path)
    assert e.subject == f"{path}:{where}"
    assert reason in e.reason


@pytest.mark.parametrize("line,reason", [
    ("/workspace/models/checkpoints/x.safetensors", "absolute"),
    ("C:\\models\\x.safetensors", "absolute"),
    ("checkpoints\\x.safetensors", "backslash"),
    ("~/x.safetensors", "absolute"),
    ("x.safetensors", "expected '<folder>/<filename or glob>'"),
    ("checkpoints/", "expected '<folder>/<filename or glob>'"),
    ("check*/x.safetensors", "glob characters"),
    ("loras/a\x00b.safetensors", "NUL"),
    ("loras/[abc.safetensors", "unclosed"),
    ("loras/sub/../../x.safetensors", "'..' component"),
])
def test_hostile_warmup_lines(tmp_path, line, reason):
    path = tmp_path / "warmup_models.conf"
    path.write_text(f"# header\ncheckpoints/ok.safetensors\n{line}\n", encoding="utf-8")
    e = err(parse_warmup_conf, path)
    assert e.subject == f"{path}:3"
    assert reason in e.reason


@pytest.mark.parametrize("entry,where,reason", [
    ({"clip_names": []}, "clip_names", "at least 1"),
    ({"clip_names": ["a.pt", "b.pt", "c.pt", "d.pt"]}, "clip_names", "at most 3"),
    ({"clip_names": ["a.pt"], "device": "cuda"}, "device", "'default' or 'cpu'"),
    ({"clip_names": ["a.pt", "b.pt"], "type": "wan"}, "type", "not a DualCLIPLoader type"),
    ({"clip_names": ["../a.pt"]}, "clip_names[0]", "'..' component"),
    ({"clip_names": ["a.pt"], "enabled": "yes"}, "enabled", "valid boolean"),
])
def test_hostile_preload_text_encoders(tmp_path, entry, where, reason):
    path = tmp_path / "preload_config.json"
    path.write_text(json.dumps({"version": "1.0", "models": {"text_encoders": [entry]}}))
    e = err(parse_preload_config, path)
    assert e.subject == f"{path}:models.text_encoders[0].{where}"
    assert reason in e.reason


def test_hostile_preload_top_level(tmp_path):
    path = tmp_path / "preload_config.json"
    path.write_text(json.dumps({"version": "1.0", "models": {"loras": []}, "settings": {"verbose": True}}))
    e = err(parse_preload_config, path)
    assert e.subject == f"{path}:models.loras"
    assert "expected one of: checkpoints, text_encoders, diffusion_models, vaes" in e.reason


def test_hostile_versions_index():
    e = err(parse_versions_index, HOSTILE / "bad_md5_versions.json")
    assert e.subject == f"{HOSTILE / 'bad_md5_versions.json'}:base_models.md5" and "32 hex" in e.reason
    e = err(parse_versions_index, HOSTILE / "versions_bad_name.json")
    assert e.subject == f"{HOSTILE / 'versions_bad_name.json'}:../escape"
    assert "single safe file name" in e.reason


@pytest.mark.parametrize("doc,where,reason", [
    ({"a": {"url": "ftp://x.example.com/a.json", "md5": "0" * 32}}, "a.url", "unsupported source scheme"),
    ({"a": {"url": "https://x.example.com/a.json"}}, "a", "missing 'md5'"),
    ({"a": {"url": "https://x.example.com/a.json", "md5": "0" * 32, "sha1": "x"}}, "a.sha1", "unknown key"),
    ({"a": {"url": "https://x.example.com/a.json", "md5": "0" * 32}, "b": "https://x"}, "b",
     "expected an object"),
])
def test_hostile_versions_entries(tmp_path, doc, where, reason):
    path = tmp_path / "model_versions.json"
    path.write_text(json.dumps(doc))
    e = err(parse_versions_index, path)
    assert e.subject == f"{path}:{where}" and reason in e.reason


def test_hostile_workflows():
    e = err(workflow_model_refs, {"nodes": "x"}, "wf")
    assert e.subject == "wf:nodes" and "list of nodes" in e.reason
    e = err(workflow_model_refs, {"1": {"class_type": 5, "inputs": {}}, "2": {"class_type": "X"}}, "wf")
    assert e.subject == "wf:1.class_type"
    e = err(workflow_model_refs, {"foo": "bar"}, "wf")
    assert e.subject == "wf:1" and "not a ComfyUI workflow" in e.reason
    ui = {"nodes": [{"id": 1, "type": "LoraLoader", "widgets_values": ["C:\\loras\\x.safetensors", 1, 1]}]}
    e = err(workflow_model_refs, ui, "wf")
    assert e.subject == "wf:nodes[0].widgets_values[0]" and "backslash" in e.reason
    ui = {"nodes": [], "models": [{"name": "x.safetensors", "url": "https://a.example.com/x"}]}
    e = err(workflow_model_refs, ui, "wf")
    assert e.subject == "wf:models[0].directory"
    ui = {"nodes": [], "models": [{"name": "x.pt", "directory": "loras", "hash": "z", "hash_type": "sha256"}]}
    assert err(workflow_model_refs, ui, "wf").subject == "wf:models[0].hash"


def test_missing_paths_and_empty_directories(tmp_path):
    e = err(load_manifest, tmp_path / "nope.json")
    assert e.subject == f"{tmp_path / 'nope.json'}:1" and "no such file" in e.reason
    e = err(load_manifests, [tmp_path])
    assert "no manifest files" in e.reason
    e = err(load_manifest, tmp_path)
    assert "is a directory" in e.reason
