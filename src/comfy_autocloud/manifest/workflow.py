"""ComfyUI workflows as model lists: what a workflow needs, before ComfyUI fails to find it.

UI format (the editor's save file) may carry download hints (`models[]`, `properties.models`) and
names in the loaders' widget values; API format (what /prompt receives) has names only. Loader node
and input names below are ComfyUI's own (nodes.py and comfy_extras/*.py).
"""

from __future__ import annotations

from typing import Any

from comfy_autocloud.manifest.common import at, build_spec, check_sha256_at, check_source_at, check_tree, fail
from comfy_autocloud.manifest.merge import merge_specs
from comfy_autocloud.manifest.spec import ModelSpec

# class_type -> ((input name, model folder), ...) in widget order (the UI's widgets_values order).
LOADER_INPUTS: dict[str, tuple[tuple[str, str], ...]] = {
    "CheckpointLoaderSimple": (("ckpt_name", "checkpoints"),),
    "CheckpointLoader": (("config_name", "configs"), ("ckpt_name", "checkpoints")),
    "unCLIPCheckpointLoader": (("ckpt_name", "checkpoints"),),
    "ImageOnlyCheckpointLoader": (("ckpt_name", "checkpoints"),),
    "ImageOnlyCheckpointLoaderDevice": (("ckpt_name", "checkpoints"),),
    "LoraLoader": (("lora_name", "loras"),),
    "LoraLoaderModelOnly": (("lora_name", "loras"),),
    "VAELoader": (("vae_name", "vae"),),
    "UNETLoader": (("unet_name", "diffusion_models"),),
    "CLIPLoader": (("clip_name", "text_encoders"),),
    "DualCLIPLoader": (("clip_name1", "text_encoders"), ("clip_name2", "text_encoders")),
    "TripleCLIPLoader": tuple((f"clip_name{i}", "text_encoders") for i in range(1, 4)),
    "QuadrupleCLIPLoader": tuple((f"clip_name{i}", "text_encoders") for i in range(1, 5)),
    "ControlNetLoader": (("control_net_name", "controlnet"),),
    "DiffControlNetLoader": (("control_net_name", "controlnet"),),
    "UpscaleModelLoader": (("model_name", "upscale_models"),),
    "CLIPVisionLoader": (("clip_name", "clip_vision"),),
    "StyleModelLoader": (("style_model_name", "style_models"),),
    "GLIGENLoader": (("gligen_name", "gligen"),),
    "HypernetworkLoader": (("hypernetwork_name", "hypernetworks"),),
    "PhotoMakerLoader": (("photomaker_model_name", "photomaker"),),
    "ModelPatchLoader": (("name", "model_patches"),),
    "AudioEncoderLoader": (("audio_encoder_name", "audio_encoders"),),
}
# folder_paths.map_legacy: old folder names ComfyUI still accepts.
LEGACY_FOLDERS = {"unet": "diffusion_models", "clip": "text_encoders"}
# VAELoader choices that are not files in models/vae (built from vae_approx parts, or no VAE at all).
VAE_BUILTINS = frozenset({"taesd", "taesdxl", "taesd3", "taef1", "taef2", "pixel_space"})
VIDEO_TAES = ("taehv", "lighttaew2_2", "lighttaew2_1", "lighttaehy1_5", "taeltx_2", "taeh3")  # in vae_approx
_SKIPPED_MODES = (2, 4)  # UI node mode: 2 = muted ("never"), 4 = bypassed; neither loads anything
_NO_FILE = ("", "None")


def is_ui_workflow(data: Any) -> bool:
    return isinstance(data, dict) and any(isinstance(data.get(k), list) for k in ("nodes", "models"))


def _api_nodes(data: Any) -> dict[str, Any] | None:
    """The node dict of an API-format prompt (also inside a /prompt request body), else None."""
    if isinstance(data, dict) and isinstance(data.get("prompt"), dict) and "class_type" not in data["prompt"]:
        data = data["prompt"]
    if isinstance(data, dict) and any(isinstance(v, dict) and "class_type" in v for v in data.values()):
        return data
    return None


def is_api_workflow(data: Any) -> bool:
    return _api_nodes(data) is not None


def workflow_model_refs(workflow: dict[str, Any], where: str) -> list[ModelSpec]:
    """Every model file a workflow (UI or API format, already parsed) refers to, merged by key."""
    check_tree(workflow, where)
    nodes = _api_nodes(workflow)
    if nodes is not None:
        return merge_specs(_api_refs(nodes, where))
    if is_ui_workflow(workflow) or (isinstance(workflow, dict) and "nodes" in workflow):
        return merge_specs(_ui_refs(workflow, where))
    fail(at(where, ""), "not a ComfyUI workflow: expected a UI workflow with 'nodes' or an API prompt "
                        "of {id: {'class_type': ..., 'inputs': {...}}}")


def _loader_spec(class_type: str, input_name: str, folder: str, value: Any, sub: str) -> ModelSpec | None:
    if value is None or isinstance(value, list):  # optional and unset, or a link [node_id, slot]
        return None
    if not isinstance(value, str):
        fail(sub, f"{class_type}.{input_name} must be a file name string, got {type(value).__name__}")
    if value in _NO_FILE:
        return None
    if class_type == "VAELoader":
        if value in VAE_BUILTINS:
            return None
        if value.rsplit(".", 1)[0] in VIDEO_TAES:
            folder = "vae_approx"
    return build_spec(sub, folder=folder, filename=value, tags=("workflow",))


def _api_refs(nodes: dict[str, Any], where: str) -> list[ModelSpec]:
    specs: list[ModelSpec] = []
    for node_id, node in nodes.items():
        if not isinstance(node, dict):
            fail(at(where, str(node_id)), "expected a node object with 'class_type' and 'inputs'")
        class_type = node.get("class_type")
        if not isinstance(class_type, str):
            fail(at(where, f"{node_id}.class_type"), "expected the node's class name as a string")
        inputs = node.get("inputs", {})
        if not isinstance(inputs, dict):
            fail(at(where, f"{node_id}.inputs"), "expected an object of input values")
        for input_name, folder in LOADER_INPUTS.get(class_type, ()):
            spec = _loader_spec(class_type, input_name, folder, inputs.get(input_name),
                                at(where, f"{node_id}.inputs.{input_name}"))
            if spec is not None:
                specs.append(spec)
    return specs


def _ui_nodes(data: dict[str, Any], where: str) -> list[tuple[dict[str, Any], str]]:
    """Top-level nodes and the nodes of every subgraph definition, each with its error path."""
    groups: list[tuple[Any, str]] = [(data.get("nodes", []), "nodes")]
    defs = data.get("definitions")
    if isinstance(defs, dict) and isinstance(defs.get("subgraphs"), list):
        groups += [(g.get("nodes", []), f"definitions.subgraphs[{i}].nodes")
                   for i, g in enumerate(defs["subgraphs"]) if isinstance(g, dict)]
    out: list[tuple[dict[str, Any], str]] = []
    for nodes, path in groups:
        if not isinstance(nodes, list):
            fail(at(where, path), "expected a list of nodes")
        for i, node in enumerate(nodes):
            if not isinstance(node, dict):
                fail(at(where, f"{path}[{i}]"), "expected a node object")
            out.append((node, f"{path}[{i}]"))
    return out


def _ui_refs(data: dict[str, Any], where: str) -> list[ModelSpec]:
    specs = _ui_models(data.get("models"), where, "models")
    for node, path in _ui_nodes(data, where):
        props = node.get("properties")
        if isinstance(props, dict) and "models" in props:
            specs += _ui_models(props["models"], where, f"{path}.properties.models")
        class_type = node.get("type")
        if node.get("mode") in _SKIPPED_MODES or class_type not in LOADER_INPUTS:
            continue
        linked = {(i.get("widget") or {}).get("name") or i.get("name")
                  for i in node.get("inputs") or () if isinstance(i, dict) and i.get("link") is not None}
        values = node.get("widgets_values")
        for index, (input_name, folder) in enumerate(LOADER_INPUTS[class_type]):
            if input_name in linked:
                continue
            if isinstance(values, dict):
                value, sub = values.get(input_name), f"{path}.widgets_values.{input_name}"
            elif isinstance(values, list) and index < len(values):
                value, sub = values[index], f"{path}.widgets_values[{index}]"
            else:
                continue
            spec = _loader_spec(class_type, input_name, folder, value, at(where, sub))
            if spec is not None:
                specs.append(spec)
    return specs


def _ui_models(models: Any, where: str, path: str) -> list[ModelSpec]:
    """`models: [{name, url, directory, hash?, hash_type?}]`, the editor's download hints."""
    if models is None:
        return []
    if not isinstance(models, list):
        fail(at(where, path), "expected a list of {name, url, directory} objects")
    specs: list[ModelSpec] = []
    for i, m in enumerate(models):
        sub = at(where, f"{path}[{i}]")
        if not isinstance(m, dict):
            fail(sub, "expected an object {name, url, directory}")
        for field in ("name", "directory"):
            if not isinstance(m.get(field), str) or not m[field]:
                fail(f"{sub}.{field}", "missing or not a string; every model needs 'name' and 'directory'")
        folder = LEGACY_FOLDERS.get(m["directory"], m["directory"])
        fields: dict[str, Any] = {"folder": folder, "filename": m["name"], "tags": ("workflow",)}
        if m.get("url"):
            fields["sources"] = (check_source_at(m["url"], f"{sub}.url"),)
        hash_type = m.get("hash_type")
        if m.get("hash") and isinstance(hash_type, str) and hash_type.lower() == "sha256":
            fields["sha256"] = check_sha256_at(m["hash"], f"{sub}.hash")
        specs.append(build_spec(sub, **fields))
    return specs
