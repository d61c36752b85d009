"""`preload_config.json` (the memory-preload config): which models ComfyUI loads into memory at start-up.

The values are validated against the options of ComfyUI's own loaders (UNETLoader weight_dtype,
CLIPLoader / DualCLIPLoader type, device) so a typo fails at start-up with the key that is wrong,
not minutes later inside a loader.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from comfy_autocloud.keys import check_relpath
from comfy_autocloud.manifest.common import at, build_spec, fail, load_json
from comfy_autocloud.manifest.spec import ModelSpec

# ComfyUI nodes.py UNETLoader "weight_dtype" options.
WEIGHT_DTYPES = ("default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2")
# ComfyUI nodes.py CLIPLoader "type" options (one text encoder file).
CLIP_TYPES_SINGLE = (
    "stable_diffusion", "stable_cascade", "sd3", "stable_audio", "mochi", "ltxv", "pixart", "cosmos",
    "lumina2", "wan", "hidream", "chroma", "ace", "omnigen2", "qwen_image", "hunyuan_image", "flux2",
    "ovis", "longcat_image", "cogvideox", "lens", "pixeldit", "ideogram4", "boogu", "krea2", "joyimage",
    "mage", "minimax",
)
# ComfyUI nodes.py DualCLIPLoader "type" options (two files).
CLIP_TYPES_DUAL = (
    "sdxl", "sd3", "flux", "hunyuan_video", "hidream", "hunyuan_image", "hunyuan_video_15", "kandinsky5",
    "kandinsky5_image", "ltxv", "newbie", "ace",
)
CLIP_TYPES = tuple(dict.fromkeys(CLIP_TYPES_SINGLE + CLIP_TYPES_DUAL))
DEVICES = ("default", "cpu")
# TripleCLIPLoader has no type (it detects sd3); a default per count keeps `type` optional.
_DEFAULT_CLIP_TYPE = {1: "stable_diffusion", 2: "sdxl", 3: "sd3"}

SECTION_FOLDERS = {  # section -> (model folder in the cache, kind in ModelSpec.preload)
    "checkpoints": ("checkpoints", "checkpoint"),
    "text_encoders": ("text_encoders", "text_encoder"),
    "diffusion_models": ("diffusion_models", "diffusion_model"),
    "vaes": ("vae", "vae"),
}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


ModelName = Annotated[str, AfterValidator(lambda v: check_relpath(v, "model file name"))]


class _Entry(_Strict):
    cache_key: str = ""
    enabled: bool = True
    description: str = ""


class CheckpointEntry(_Entry):
    name: ModelName


class TextEncoderEntry(_Entry):
    clip_names: list[ModelName] = Field(min_length=1, max_length=3)
    type: str | None = None  # validated after clip_names: the allowed types depend on how many files
    device: Literal["default", "cpu"] = "default"

    @field_validator("type")
    @classmethod
    def _type(cls, v: str | None, info: ValidationInfo) -> str | None:
        names = info.data.get("clip_names")
        if v is None or names is None:
            return v
        n = len(names)
        allowed = CLIP_TYPES_SINGLE if n == 1 else CLIP_TYPES_DUAL if n == 2 else CLIP_TYPES
        if v not in allowed:
            loader = {1: "CLIPLoader", 2: "DualCLIPLoader"}.get(n, "ComfyUI CLIP loader")
            raise ValueError(f"{v!r} is not a {loader} type for {n} clip_names; "
                             f"expected one of: {', '.join(allowed)}")
        return v

    @property
    def clip_type(self) -> str:
        return self.type or _DEFAULT_CLIP_TYPE[len(self.clip_names)]


class DiffusionModelEntry(_Entry):
    model_name: ModelName
    weight_dtype: Literal["default", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"] = "default"


class VaeEntry(_Entry):
    vae_name: ModelName


class PreloadModels(_Strict):
    checkpoints: list[CheckpointEntry] = []
    text_encoders: list[TextEncoderEntry] = []
    diffusion_models: list[DiffusionModelEntry] = []
    vaes: list[VaeEntry] = []


class PreloadSettings(_Strict):
    auto_gpu_load: bool = False
    verbose: bool = False


class PreloadConfig(_Strict):
    version: str = "1.0"
    description: str = ""
    models: PreloadModels = PreloadModels()
    settings: PreloadSettings = PreloadSettings()

    @field_validator("version", mode="before")
    @classmethod
    def _version(cls, v: Any) -> Any:
        return str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v


def is_preload_config(data: Any) -> bool:
    """Content sniffing: a 'models' object whose values are lists of entries (the preload config's layout)."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), dict):
        return False
    models = data["models"]
    return all(isinstance(v, list) for v in models.values()) and (
        bool(set(models) & set(SECTION_FOLDERS)) or "settings" in data or "version" in data)


def parse_preload_config(path: Path) -> PreloadConfig:
    return preload_from_data(load_json(path), str(path))


def preload_from_data(data: Any, where: str) -> PreloadConfig:
    try:
        return PreloadConfig.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        # A misspelt key also makes the real one "missing": name the misspelling, it is the cause.
        err = next((e for e in errors if e.get("type") == "extra_forbidden"), errors[0])
        loc = tuple(err.get("loc", ()))
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        if err.get("type") == "extra_forbidden":
            expected = ", ".join(_fields_at(loc[:-1]))
            fail(at(where, path), f"unknown key {loc[-1]!r}; expected one of: {expected}")
        fail(at(where, path), str(err.get("msg", "invalid value")).removeprefix("Value error, "))


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """The field names of the model found by following `loc` from PreloadConfig (for 'did you mean')."""
    cls: Any = PreloadConfig
    for part in loc:
        if isinstance(part, int):
            continue
        ann = cls.model_fields[part].annotation
        cls = get_args(ann)[0] if get_origin(ann) is list else ann
    return list(cls.model_fields)


def preload_specs(config: PreloadConfig, where: str) -> list[ModelSpec]:
    """One spec per file of every enabled entry, carrying the loader options in `preload`."""
    specs: list[ModelSpec] = []
    for section, (folder, kind) in SECTION_FOLDERS.items():
        for i, entry in enumerate(getattr(config.models, section)):
            if not entry.enabled:
                continue
            sub = at(where, f"models.{section}[{i}]")
            opts: dict[str, Any] = {"kind": kind, "cache_key": entry.cache_key}
            if isinstance(entry, CheckpointEntry):
                names = [entry.name]
            elif isinstance(entry, TextEncoderEntry):
                names = list(entry.clip_names)
                opts.update(clip_type=entry.clip_type, device=entry.device, clip_names=names)
            elif isinstance(entry, DiffusionModelEntry):
                names = [entry.model_name]
                opts["weight_dtype"] = entry.weight_dtype
            else:
                names = [entry.vae_name]
            for name in names:
                specs.append(build_spec(sub, folder=folder, filename=name, preload=copy.deepcopy(opts),
                                        tags=("preload",)))
    return specs

