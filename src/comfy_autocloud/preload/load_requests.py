"""preload_config.json -> LoadRequests, tolerant of one broken entry.

The strict parser (`manifest.preload_config`) rejects a whole file for one typo; at ComfyUI start-up
that would leave every model cold. Here a file that fails strict parsing is validated entry by entry
with the same pydantic models, each bad entry is reported with its key path and the others still load.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_autocloud.errors import ManifestError
from comfy_autocloud.manifest.common import load_json
from comfy_autocloud.manifest.preload_config import (
    SECTION_FOLDERS,
    CheckpointEntry,
    DiffusionModelEntry,
    PreloadConfig,
    PreloadSettings,
    TextEncoderEntry,
    VaeEntry,
    parse_preload_config,
    preload_from_data,
)
from comfy_autocloud.preload.held_models import LoadRequest

CONFIG_NAME = "preload_config.json"
KIND_FOLDER = {"checkpoint": "checkpoints", "text_encoder": "text_encoders", "diffusion_model": "diffusion_models",
               "vae": "vae"}


@dataclass
class PreloadPlan:
    requests: list[LoadRequest] = field(default_factory=list)
    settings: PreloadSettings = field(default_factory=PreloadSettings)
    errors: list[str] = field(default_factory=list)
    path: Path | None = None


def find_config(explicit: str | None, user_dir: str | os.PathLike[str] | None,
                pack_dir: str | os.PathLike[str] | None) -> Path | None:
    """AUTOCLOUD_PRELOAD_CONFIG, else ComfyUI's user directory, else the pack directory."""
    if explicit:
        return Path(explicit).expanduser()
    for base in (user_dir, pack_dir):
        if base and (Path(base) / CONFIG_NAME).is_file():
            return Path(base) / CONFIG_NAME
    return None


def checkpoint_request(name: str, cache_key: str = "", where: str = "") -> LoadRequest:
    return LoadRequest.make("checkpoint", [name], {}, cache_key, where)


def text_encoder_request(names: list[str], clip_type: str, device: str = "default", cache_key: str = "",
                         where: str = "") -> LoadRequest:
    return LoadRequest.make("text_encoder", names, {"type": clip_type, "device": device}, cache_key, where)


def diffusion_request(name: str, weight_dtype: str = "default", cache_key: str = "", where: str = "") -> LoadRequest:
    return LoadRequest.make("diffusion_model", [name], {"weight_dtype": weight_dtype}, cache_key, where)


def vae_request(name: str, cache_key: str = "", where: str = "") -> LoadRequest:
    return LoadRequest.make("vae", [name], {}, cache_key, where)


def request_for(entry: Any, where: str) -> LoadRequest:
    if isinstance(entry, CheckpointEntry):
        return checkpoint_request(entry.name, entry.cache_key, where)
    if isinstance(entry, TextEncoderEntry):
        return text_encoder_request(list(entry.clip_names), entry.clip_type, entry.device, entry.cache_key, where)
    if isinstance(entry, DiffusionModelEntry):
        return diffusion_request(entry.model_name, entry.weight_dtype, entry.cache_key, where)
    if isinstance(entry, VaeEntry):
        return vae_request(entry.vae_name, entry.cache_key, where)
    raise TypeError(f"{where}: not a preload entry: {type(entry).__name__}")


def plan_from_config(config: PreloadConfig, where: str) -> PreloadPlan:
    plan = PreloadPlan(settings=config.settings)
    for section in SECTION_FOLDERS:
        for i, entry in enumerate(getattr(config.models, section)):
            if entry.enabled:
                plan.requests.append(request_for(entry, f"{where}:models.{section}[{i}]"))
    return plan


def load_plan(path: Path) -> PreloadPlan:
    """Requests of every enabled, valid entry of `path`; invalid entries end up in `errors`."""
    try:
        plan = plan_from_config(parse_preload_config(path), str(path))
        plan.path = path
        return plan
    except ManifestError as exc:
        strict_error = exc
    try:
        data = load_json(path)
    except ManifestError as exc:
        return PreloadPlan(errors=[str(exc)], path=path)
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        return PreloadPlan(errors=[str(strict_error)], path=path)
    plan = PreloadPlan(path=path)
    try:
        plan.settings = preload_from_data({k: v for k, v in data.items() if k != "models"}, str(path)).settings
    except ManifestError as exc:
        plan.errors.append(str(exc))
    for section, items in data["models"].items():
        base = f"{path}:models.{section}"
        if section not in SECTION_FOLDERS:
            plan.errors.append(f"{base}: unknown section; expected one of: {', '.join(SECTION_FOLDERS)}")
            continue
        if not isinstance(items, list):
            plan.errors.append(f"{base}: expected a list of entries")
            continue
        for i, item in enumerate(items):
            where = f"{base}[{i}]"
            try:
                one = preload_from_data({"models": {section: [item]}}, where)
            except ManifestError as exc:
                inner = exc.subject.split(f"models.{section}[0]", 1)[-1].lstrip(".")
                plan.errors.append(f"{where}{'.' + inner if inner else ''}: {exc.reason}")
                continue
            entry = getattr(one.models, section)[0]
            if entry.enabled:
                plan.requests.append(request_for(entry, where))
    return plan
