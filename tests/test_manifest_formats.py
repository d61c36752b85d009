"""Every manifest format parses into the specs the fetch service expects (valid inputs, seed examples)."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from comfy_autocloud.errors import ManifestError
from comfy_autocloud.keys import check_folder
from comfy_autocloud.manifest import (
    LOADER_INPUTS,
    PreloadConfig,
    detect_format,
    load_manifest,
    load_manifests,
    parse_preload_config,
    parse_versions_index,
    parse_warmup_conf,
    stale_lists,
    workflow_model_refs,
)

DATA = Path(__file__).parent / "data" / "manifests"
VALID = DATA / "valid"


def by_key(specs):
    return {s.key: s for s in specs}


def write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return path


# --- model list JSON ------------------------------------------------------------------------------

def test_seed_004_example_is_read_as_is():
    specs = load_manifest(VALID / "model_list.json")
    assert [s.key for s in specs] == [
        "checkpoints/realisticVisionV51.safetensors",
        "checkpoints/juggernautXL.safetensors",
        "loras/detailEnhancer.safetensors",
    ]
    lora = specs[2]
    assert lora.sources == ("https://cdn.example.com/loras/detailEnhancer_v2.safetensors",)
    assert lora.sha256 is None and lora.size is None and not lora.pin
    assert lora.defined_in == f"{VALID / 'model_list.json'}:loras.detailEnhancer.safetensors"


def test_seed_object_form_carries_mirrors_hash_size_pin_tags():
    specs = by_key(load_manifest(VALID / "model_list_objects.json"))
    jug = specs["checkpoints/SDXL/juggernautXL.safetensors"]
    assert jug.sources == ("https://cdn.example.com/models/xl/juggernautXL.safetensors",
                           "hf://RunDiffusion/Juggernaut-XL/juggernautXL.safetensors@main")
    assert jug.sha256 == "33e2c8f7c5b3a1d2e4f60718293a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c"  # lower-cased
    assert (jug.size, jug.pin, jug.tags) == (7105348188, True, ("sdxl", "base"))
    t5 = specs["text_encoders/t5xxl_fp8_e4m3fn.safetensors"]
    # The 'sha256:' prefix is dropped.
    assert t5.sha256 == "7d330da4816157540d6bb7838bf63a0f02f573fc48ca4d8de34bb0cbfd514f09"
    assert specs["upscale_models/4x-UltraSharp.pth"].sources == ("s3://models-bucket/upscale/4x-UltraSharp.pth",)
    assert specs["loras/civitai_style.safetensors"].sources == ("civitai:128713",)


def test_empty_document_is_an_empty_list(tmp_path):
    assert load_manifest(write(tmp_path / "empty.json", "{}")) == []


# --- split lists and merging --------------------------------------------------------------------

def test_split_directory_merges_and_skips_the_versions_index():
    specs = load_manifests([VALID / "split"])
    keys = [s.key for s in specs]
    assert keys == [  # sorted files: base, controlnet, lora; model_versions.json skipped
        "checkpoints/realisticVisionV51.safetensors",
        "checkpoints/juggernautXL.safetensors",
        "vae/sdxl_vae.safetensors",
        "controlnet/controlnet-canny-sdxl-1.0.safetensors",
        "loras/detailEnhancer.safetensors",
        "loras/my_style_lora.safetensors",
    ]
    jug = by_key(specs)["checkpoints/juggernautXL.safetensors"]
    # Same sha256 in base_models.json and controlnet_models.json: the two URLs are mirrors.
    assert jug.sources == ("https://cdn.example.com/models/xl/juggernautXL.safetensors",
                           "https://mirror.example.org/xl/juggernautXL.safetensors")
    assert jug.defined_in.startswith(str(VALID / "split" / "base_models.json"))


def test_split_files_listed_one_by_one_equal_the_directory():
    files = [VALID / "split" / n for n in ("base_models.json", "controlnet_models.json", "lora_models.json")]
    assert load_manifests(files) == load_manifests([VALID / "split"])


def test_identical_duplicates_merge_silently(tmp_path):
    doc = {"loras": {"x.safetensors": "https://a.example.com/x.safetensors"}}
    specs = load_manifests([write(tmp_path / "a.json", doc), write(tmp_path / "b.json", doc)])
    assert len(specs) == 1 and specs[0].sources == ("https://a.example.com/x.safetensors",)


def test_different_sha256_across_files_names_both(tmp_path):
    def doc(sha):
        return {"loras": {"x.safetensors": {"url": "https://a.example.com/x", "sha256": sha}}}

    a, b = write(tmp_path / "a.json", doc("a" * 64)), write(tmp_path / "b.json", doc("b" * 64))
    with pytest.raises(ManifestError) as ei:
        load_manifests([a, b])
    assert ei.value.subject == f"{b}:loras.x.safetensors"
    assert str(a) in ei.value.reason and "sha256" in ei.value.reason


def test_different_size_across_files_is_a_conflict(tmp_path):
    a = write(tmp_path / "a.json", {"vae": {"v.pt": {"url": "https://a.example.com/v", "size": 10}}})
    b = write(tmp_path / "b.json", {"vae": {"v.pt": {"url": "https://a.example.com/v", "size": 11}}})
    with pytest.raises(ManifestError, match=r"size \(10 vs 11 bytes\)") as ei:
        load_manifests([a, b])
    assert str(a) in ei.value.reason and str(b) in ei.value.subject


def test_different_sources_without_hash_are_a_conflict_naming_both_files():
    a, b = DATA / "hostile" / "conflict_a.json", DATA / "hostile" / "conflict_b.json"
    with pytest.raises(ManifestError) as ei:
        load_manifests([a, b])
    assert ei.value.subject == f"{b}:loras.style.safetensors"
    assert f"{a}:loras.style.safetensors" in ei.value.reason
    assert "same sha256" in ei.value.reason


def test_names_only_entries_take_sources_from_another_file():
    specs = by_key(load_manifests([VALID / "warmup_models.conf", VALID / "split" / "lora_models.json"]))
    lora = specs["loras/my_style_lora.safetensors"]
    assert lora.sources == ("https://cdn.example.com/loras/my_style_lora.safetensors",)
    assert lora.tags == ("warmup",)
    assert lora.defined_in == f"{VALID / 'warmup_models.conf'}:9"


# --- versions index -------------------------------------------------------------

def test_versions_index_and_stale_lists(tmp_path):
    index = parse_versions_index(VALID / "model_versions.json")
    assert [(v.name, v.filename) for v in index] == [
        ("base_models", "base_models.json"), ("lora_models", "lora_models.json"),
        ("controlnet_models", "controlnet_models.json")]
    assert index[0].url == "https://cdn.example.com/configs/base_models.json"

    base = tmp_path / "base_models.json"
    base.write_bytes(b'{"checkpoints": {"a.safetensors": "https://cdn.example.com/a"}}')
    (tmp_path / "controlnet_models.json").write_bytes(b"{}")
    fresh = hashlib.md5(base.read_bytes()).hexdigest().upper()  # upper case in the index is fine
    url = "https://cdn.example.com/configs/{}.json"
    doc = {
        "base_models": {"url": url.format("base_models"), "md5": fresh, "version": 3},
        "lora_models": {"url": url.format("lora_models"), "md5": "0" * 32},
        "controlnet_models": {"url": url.format("controlnet_models"), "md5": "1" * 32},
    }
    idx_path = write(tmp_path / "model_versions.json", doc)
    index = parse_versions_index(idx_path)
    assert index[0].md5 == fresh.lower() and index[0].version == "3"
    stale = stale_lists(index, tmp_path)
    assert [v.name for v in stale] == ["lora_models", "controlnet_models"]  # missing, md5 differs
    base.write_bytes(base.read_bytes() + b"\n")
    assert len(stale_lists(index, tmp_path)) == 3


def test_versions_index_is_detected_and_refused_as_a_model_list():
    path = VALID / "model_versions.json"
    assert detect_format(path) == "versions_index"
    with pytest.raises(ManifestError, match="versions index"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="versions index"):
        load_manifests([path])  # named explicitly: an error, not skipped


# --- warmup_models.conf --------------------------------------------------------------

def test_warmup_conf_seed_example():
    entries = parse_warmup_conf(VALID / "warmup_models.conf")
    assert [(e.folder, e.pattern, e.line) for e in entries][:3] == [
        ("checkpoints", "flux1-dev-fp8.safetensors", 5),
        ("checkpoints", "sdxl_juggernaut_v9.safetensors", 6),
        ("loras", "my_style_lora.safetensors", 9),  # trailing '# 风格 LoRA' comment stripped
    ]
    globs = [e.key for e in entries if e.is_glob]
    assert globs == ["checkpoints/sdxl_*.safetensors", "loras/SDXL/detail_??.safetensors"]
    with pytest.raises(ValueError, match="glob"):
        entries[-1].to_spec()
    specs = load_manifest(VALID / "warmup_models.conf")
    assert len(specs) == len(entries) - 2
    assert all(s.tags == ("warmup",) and s.sources == () for s in specs)
    assert specs[0].defined_in == f"{VALID / 'warmup_models.conf'}:5"


def test_warmup_conf_crlf_bom_comments_and_duplicates(tmp_path):
    text = "\ufeff# c\r\n\r\ncheckpoints/a.safetensors\t# tab comment\r\n  loras/b#1.safetensors  \r\n" \
           "checkpoints/a.safetensors\r\n"
    path = tmp_path / "w.conf"
    path.write_bytes(text.encode("utf-8"))
    entries = parse_warmup_conf(path)
    assert [(e.key, e.line) for e in entries] == [
        ("checkpoints/a.safetensors", 3), ("loras/b#1.safetensors", 4)]
    assert detect_format(path) == "warmup_conf"


def test_conf_without_extension_is_sniffed(tmp_path):
    path = tmp_path / "my_models"
    path.write_text("vae/x.safetensors\n")
    assert detect_format(path) == "warmup_conf"
    assert [s.key for s in load_manifest(path)] == ["vae/x.safetensors"]


# --- preload_config.json -------------------------------------------------------------

def test_preload_config_seed_example():
    cfg = parse_preload_config(VALID / "preload_config.json")
    assert isinstance(cfg, PreloadConfig)
    assert cfg.version == "1.0" and cfg.settings.auto_gpu_load and cfg.settings.verbose
    assert cfg.models.text_encoders[0].clip_names == ["clip_l.safetensors", "clip_g.safetensors"]
    assert cfg.models.diffusion_models[0].weight_dtype == "fp8_e4m3fn"
    assert detect_format(VALID / "preload_config.json") == "preload_config"


def test_preload_config_specs_one_per_enabled_file():
    where = VALID / "preload_config.json"
    specs = by_key(load_manifest(where))
    assert list(specs) == [
        "checkpoints/dreamshaper_8.safetensors",  # sd_xl_base_1.0 is disabled
        "text_encoders/clip_l.safetensors",
        "text_encoders/clip_g.safetensors",
        "diffusion_models/flux1-dev.safetensors",
        "vae/sdxl_vae.safetensors",
    ]
    assert specs["text_encoders/clip_g.safetensors"].preload == {
        "kind": "text_encoder", "cache_key": "", "clip_type": "sdxl", "device": "default",
        "clip_names": ["clip_l.safetensors", "clip_g.safetensors"]}
    assert specs["diffusion_models/flux1-dev.safetensors"].preload == {
        "kind": "diffusion_model", "cache_key": "", "weight_dtype": "fp8_e4m3fn"}
    assert specs["vae/sdxl_vae.safetensors"].preload == {"kind": "vae", "cache_key": ""}
    assert specs["checkpoints/dreamshaper_8.safetensors"].defined_in == f"{where}:models.checkpoints[0]"
    assert all(s.tags == ("preload",) for s in specs.values())


def test_preload_clip_type_defaults_and_numeric_version(tmp_path):
    doc = {"version": 1, "models": {"text_encoders": [
        {"clip_names": ["clip_l.safetensors", "clip_g.safetensors", "t5xxl_fp16.safetensors"],
         "device": "cpu"},
        {"clip_names": ["umt5_xxl_fp8_e4m3fn_scaled.safetensors"], "type": "wan"},
        {"clip_names": ["clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors"], "type": "flux"}]}}
    path = write(tmp_path / "preload_config.json", doc)
    cfg = parse_preload_config(path)
    assert cfg.version == "1"
    assert [e.clip_type for e in cfg.models.text_encoders] == ["sd3", "wan", "flux"]
    # clip_l is in two groups: one spec, the first group's options (full groups: parse_preload_config).
    specs = by_key(load_manifest(path))
    assert specs["text_encoders/clip_l.safetensors"].preload["clip_type"] == "sd3"
    assert len(specs) == 5


# --- ComfyUI workflows --------------------------------------------------------------------------

def test_workflow_api_format_names_every_loader_input():
    path = VALID / "workflow_api.json"
    assert detect_format(path) == "workflow_api"
    specs = by_key(load_manifest(path))
    assert set(specs) == {
        "diffusion_models/flux1-dev.safetensors",
        "text_encoders/t5xxl_fp8_e4m3fn.safetensors",
        "text_encoders/clip_l.safetensors",
        "vae/ae.safetensors",
        "loras/flux_realism_lora.safetensors",
        "upscale_models/4x-UltraSharp.pth",
        "configs/v1-inference.yaml",
        "checkpoints/SD15/v1-5-pruned-emaonly.safetensors",
        "text_encoders/clip_g.safetensors",
        "text_encoders/t5xxl_fp16.safetensors",
        "clip_vision/clip_vision_h.safetensors",
        "controlnet/control_v11p_sd15_canny.pth",
        "style_models/flux1-redux-dev.safetensors",
    }  # 'taesd' is built in; node 21's lora_name is a link
    assert all(s.sources == () and s.tags == ("workflow",) for s in specs.values())
    assert specs["text_encoders/clip_l.safetensors"].defined_in == f"{path}:11.inputs.clip_name2"


def test_workflow_api_in_memory_and_prompt_body():
    prompt = {
        "1": {"class_type": "QuadrupleCLIPLoader", "inputs": {
            "clip_name1": "clip_l_hidream.safetensors", "clip_name2": "clip_g_hidream.safetensors",
            "clip_name3": "t5xxl_fp8_e4m3fn_scaled.safetensors",
            "clip_name4": "llama_3.1_8b_instruct_fp8_scaled.safetensors"}},
        "2": {"class_type": "VAELoader", "inputs": {"vae_name": "taehv.safetensors"}},
        "3": {"class_type": "ModelPatchLoader", "inputs": {"name": "uso-flux1-projector-v1.safetensors"}},
        "4": {"class_type": "LoraLoader", "inputs": {"lora_name": None}},
        "5": {"class_type": "HypernetworkLoader", "inputs": {"hypernetwork_name": "hn.pt", "strength": 1.0}},
    }
    keys = [s.key for s in workflow_model_refs({"prompt": prompt, "client_id": "abc"}, "prompt 7")]
    assert keys == ["text_encoders/clip_l_hidream.safetensors", "text_encoders/clip_g_hidream.safetensors",
                    "text_encoders/t5xxl_fp8_e4m3fn_scaled.safetensors",
                    "text_encoders/llama_3.1_8b_instruct_fp8_scaled.safetensors",
                    "vae_approx/taehv.safetensors", "model_patches/uso-flux1-projector-v1.safetensors",
                    "hypernetworks/hn.pt"]
    with pytest.raises(ManifestError) as ei:
        workflow_model_refs({"9": {"class_type": "UNETLoader", "inputs": {"unet_name": 5}}}, "prompt 8")
    assert ei.value.subject == "prompt 8:9.inputs.unet_name" and "string" in ei.value.reason


def test_workflow_ui_format_models_widgets_and_subgraphs():
    path = VALID / "workflow_ui.json"
    assert detect_format(path) == "workflow_ui"
    specs = by_key(load_manifest(path))
    assert set(specs) == {
        "checkpoints/v1-5-pruned-emaonly-fp16.safetensors",  # properties.models + widget, merged
        "loras/add_detail.safetensors",
        "text_encoders/clip_l.safetensors",  # directory 'clip' is ComfyUI's legacy name
        "diffusion_models/flux1-schnell.safetensors",  # dict-shaped widgets_values
        "upscale_models/RealESRGAN_x4plus.pth",  # inside a subgraph definition
    }  # the bypassed VAELoader and the linked ControlNetLoader widget need nothing
    ckpt = specs["checkpoints/v1-5-pruned-emaonly-fp16.safetensors"]
    assert ckpt.sources[0].startswith("https://huggingface.co/Comfy-Org/stable-diffusion-v1-5-archive/")
    lora = specs["loras/add_detail.safetensors"]
    assert lora.sha256 == "7c6bdef2a4b5c6d7e8f90a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f"
    assert lora.sources == ("https://civitai.com/api/download/models/62833",)
    assert lora.defined_in == f"{path}:models[0]"


def test_loader_table_uses_valid_folders():
    for class_type, inputs in LOADER_INPUTS.items():
        assert inputs, class_type
        for _name, folder in inputs:
            assert check_folder(folder) == folder


@pytest.mark.parametrize("name,fmt", [
    ("model_list.json", "model_list"), ("model_list_objects.json", "model_list"),
    ("model_versions.json", "versions_index"), ("warmup_models.conf", "warmup_conf"),
    ("preload_config.json", "preload_config"), ("workflow_ui.json", "workflow_ui"),
    ("workflow_api.json", "workflow_api"),
])
def test_detect_format(name, fmt):
    assert detect_format(VALID / name) == fmt


def test_preload_options_match_comfyui_loader_lists():
    from typing import get_args

    from comfy_autocloud.manifest import preload_config as pc

    assert get_args(pc.DiffusionModelEntry.model_fields["weight_dtype"].annotation) == pc.WEIGHT_DTYPES
    assert get_args(pc.TextEncoderEntry.model_fields["device"].annotation) == pc.DEVICES
    assert {"stable_diffusion", "sdxl", "sd3", "flux"} <= set(pc.CLIP_TYPES)  # the seed's examples


def test_a_model_spec_checks_itself_and_stores_immutable_normalised_fields():
    """The record every format becomes: lists become tuples, the sha256 is normalised, it is frozen,
    equal records are equal and hash alike (dict keys, sets), and `replace` checks what it changes."""
    import dataclasses

    from comfy_autocloud.manifest import ModelSpec, SpecError

    spec = ModelSpec(folder="loras", filename="sd/a.safetensors", sources=["https://h/a", " https://m/a "],
                     sha256="SHA256:" + "AB" * 32, size=5, tags=["x"])
    assert spec.sources == ("https://h/a", "https://m/a") and spec.tags == ("x",)
    assert spec.sha256 == "ab" * 32 and spec.key == "loras/sd/a.safetensors"
    twin = ModelSpec(folder="loras", filename="sd/a.safetensors", sources=("https://h/a", "https://m/a"),
                     sha256="ab" * 32, size=5, tags=("x",))
    assert spec == twin and len({spec, twin}) == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.size = 6  # type: ignore[misc]
    assert dataclasses.replace(spec, pin=True).pin is True
    with pytest.raises(SpecError, match=re.escape("filename '../b' has an empty")):
        dataclasses.replace(spec, filename="../b")
    with pytest.raises(TypeError):
        ModelSpec("loras", "a.safetensors")  # type: ignore[misc]  # keywords only, as every caller writes them


@pytest.mark.parametrize("fields, problems", [
    ({"folder": "a/b", "filename": "/x", "sha256": "z"},
     [("folder", "folder 'a/b' must be a single name such as 'checkpoints'"),
      ("filename", "filename '/x' is absolute; it must be relative to the models folder"),
      ("sha256", "sha256 'z' is not 64 hex digits")]),
    ({"folder": "vae", "filename": "v.pt", "sources": ("ftp://h/v.pt",)},
     [("sources", "unsupported source scheme 'ftp' (known: http://, https://, file://, hf://, s3://, civitai:)")]),
    ({"folder": "vae", "filename": "v.pt", "size": -1, "pin": 1, "tags": "warmup"},
     [("size", "Input should be greater than or equal to 0"), ("pin", "Input should be a valid boolean"),
      ("tags", "Input should be a valid tuple")]),
    ({"folder": "vae", "filename": 7, "sha256": 5, "sources": ("https://h/v", None)},
     [("filename", "Input should be a valid string"), ("sources", "item 1: Input should be a valid string"),
      ("sha256", "Input should be a valid string")]),
])
def test_a_bad_model_spec_names_every_failed_field(fields, problems):
    from comfy_autocloud.manifest import ModelSpec, SpecError

    with pytest.raises(SpecError) as err:
        ModelSpec(**fields)
    assert list(err.value.problems) == problems
    field, reason = problems[0]  # what a manifest parser reports: the field named once
    assert err.value.first == (reason if field in reason else f"{field}: {reason}")


def test_a_bundle_checks_its_members():
    from comfy_autocloud.manifest.spec import Bundle, BundleMember, SpecError

    a = BundleMember(member="s/a.safetensors", key="loras/a.safetensors", sha256="a" * 64)
    bundle = Bundle(name="loras/p.zip", members=[a])
    assert bundle.members == (a,)
    for members, reason in (([], "a bundle needs at least one member"),
                            ([a, a], "zip member 's/a.safetensors' is listed twice"),
                            ([BundleMember(member="b", key="loras/b")],
                             "give the zip's sha256, or a sha256 for every member")):
        with pytest.raises(SpecError, match=re.escape(reason)):
            Bundle(name="loras/p.zip", members=members)
    with pytest.raises(SpecError, match=re.escape("zip member '../a' has an empty")):
        BundleMember(member="../a", key="loras/a")
    with pytest.raises(SpecError, match="item 0: Input should be an instance of BundleMember"):
        Bundle(name="loras/p.zip", sha256="a" * 64, members=[{"member": "a", "key": "loras/a"}])
