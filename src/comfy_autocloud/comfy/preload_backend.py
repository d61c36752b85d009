"""The preload registry's backend inside ComfyUI: the same calls the stock loader nodes make.

Imports ComfyUI lazily (inside the methods), so the pack imports anywhere. Objects are made exactly as
CheckpointLoaderSimple / CLIPLoader / DualCLIPLoader / TripleCLIPLoader / UNETLoader / VAELoader make
them (ComfyUI v0.3.x `nodes.py`), so a cached loader's output equals the stock loader's.
`folder_paths.get_full_path_or_raise` goes through the adapter's hook: a configured model that is
missing on disk is fetched (through the FetchService) before it is loaded.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from comfy_autocloud.preload.held_models import LoadRequest, in_preload
from comfy_autocloud.preload.load_requests import KIND_FOLDER

# (folder, file name) -> the file, fetched if a manifest lists it; None when nothing knows it (the adapter's
# `resolve_missing`).
ResolveMissing = Callable[[str, str], "Path | None"]

# VAELoader names that are not files in models/vae (approximate decoders and the pixel-space VAE).
SPECIAL_VAES = ("pixel_space", "taesd", "taesdxl", "taesd3", "taef1")
# Warm-up latent side: 4x4 latent pixels (32 px for an SD-class VAE), the smallest a UNet's downsampling takes
WARM_LATENT = 4


class ComfyBackend:
    """`Backend` for ComfyUI MODEL (ModelPatcher), CLIP and VAE objects.

    `resolve_missing` fetches a file that is not on disk while preloading at start-up (no prompt runs, so
    no node progress bar); without it such a file is an error.
    """

    def __init__(self, resolve_missing: ResolveMissing | None = None) -> None:
        self.resolve_missing = resolve_missing

    def resolve(self, req: LoadRequest) -> list[Path]:
        import folder_paths  # ComfyUI

        if req.kind == "vae" and req.files[0] in SPECIAL_VAES:
            return []
        folder = KIND_FOLDER[req.kind]
        if not in_preload():  # in a prompt: the adapter's hook fetches a missing file with node progress
            return [Path(folder_paths.get_full_path_or_raise(folder, name)) for name in req.files]
        return [_resolve_quietly(folder_paths, folder, name, self.resolve_missing) for name in req.files]

    def load(self, req: LoadRequest, paths: list[Path]) -> Any:
        import comfy.sd  # ComfyUI
        import comfy.utils
        import folder_paths
        import torch

        embeddings = folder_paths.get_folder_paths("embeddings")
        if req.kind == "checkpoint":
            out = comfy.sd.load_checkpoint_guess_config(str(paths[0]), output_vae=True, output_clip=True,
                                                        embedding_directory=embeddings)
            return tuple(out[:3])
        if req.kind == "text_encoder":
            options: dict[str, Any] = {}
            if req.option("device") == "cpu":
                options["load_device"] = options["offload_device"] = torch.device("cpu")
            kwargs: dict[str, Any] = {}
            if len(paths) < 3:  # TripleCLIPLoader passes no type and lets load_clip detect SD3
                name = req.option("type", "stable_diffusion")
                clip_type = getattr(comfy.sd.CLIPType, name.upper(), None)
                if clip_type is None:
                    raise ValueError(f"{req.name}: this ComfyUI has no text encoder type {name!r}")
                kwargs["clip_type"] = clip_type
            return comfy.sd.load_clip(ckpt_paths=[str(p) for p in paths], embedding_directory=embeddings,
                                      model_options=options, **kwargs)
        if req.kind == "diffusion_model":
            dtype = req.option("weight_dtype")
            options = {}
            if dtype in ("fp8_e4m3fn", "fp8_e4m3fn_fast"):
                options["dtype"] = torch.float8_e4m3fn
                if dtype == "fp8_e4m3fn_fast":
                    options["fp8_optimizations"] = True
            elif dtype == "fp8_e5m2":
                options["dtype"] = torch.float8_e5m2
            return comfy.sd.load_diffusion_model(str(paths[0]), model_options=options)
        if req.files[0] in SPECIAL_VAES:
            import nodes  # ComfyUI: its VAELoader knows where the approximate decoders live

            return nodes.VAELoader().load_vae(req.files[0])[0]
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(paths[0])))
        check = getattr(vae, "throw_exception_if_invalid", None)
        if callable(check):
            check()
        return vae

    def clone(self, req: LoadRequest, value: Any) -> Any:
        """MODEL and CLIP: ComfyUI clones (own patch lists, shared weights). VAE: no node patches it."""
        if req.kind == "checkpoint":
            model, clip, vae = value
            return (_clone(model), _clone(clip), vae)
        if req.kind == "vae":
            return value
        return _clone(value)

    def tensors(self, value: Any) -> dict[str, Any]:
        parts = value if isinstance(value, tuple) else (value,)
        out: dict[str, Any] = {}
        for i, part in enumerate(parts):
            module = _module_of(part)
            if module is not None:
                out.update({f"{i}.{k}": v for k, v in module.state_dict(keep_vars=False).items()})
        return out

    def to_device(self, value: Any, device: str) -> str:
        import comfy.model_management as mm  # ComfyUI

        target = mm.get_torch_device()
        if device == "cpu" or target.type == "cpu":
            return "cpu"
        parts = value if isinstance(value, tuple) else (value,)
        patchers = [p for p in (_patcher_of(x) for x in parts) if p is not None]
        mm.load_models_gpu(patchers, force_full_load=True)
        return str(target)


    def warm_up(self, req: LoadRequest, value: Any) -> list[str]:
        """Run each part once on a tiny input, the way the stock nodes do (CLIPTextEncode, KSampler, VAEDecode).

        A fresh ComfyUI pays its first-call costs inside the first prompt: `load_models_gpu` of the MODEL and
        VAE (the CLIP is loaded when it is made), the first text encode, sampler set-up, the first VAE decode
        (kernel set-up, pages of torch's libraries read from disk, allocator growth). Done here, at start-up,
        they are paid before any prompt. Nothing is kept: clones are used and dropped, outputs discarded, no RNG
        is touched. Returns what was warmed."""
        import comfy.sample  # ComfyUI
        import torch

        parts = value if isinstance(value, tuple) else (value,)
        if req.kind == "checkpoint":
            model, clip, vae = parts
        else:
            model = parts[0] if req.kind == "diffusion_model" else None
            clip = parts[0] if req.kind == "text_encoder" else None
            vae = parts[0] if req.kind == "vae" else None
        done: list[str] = []
        cond = None
        with torch.inference_mode():
            if clip is not None:
                c = clip.clone()
                cond = c.encode_from_tokens_scheduled(c.tokenize(""))
                done.append("clip")
            if model is not None:
                m = model.clone()
                fmt = m.get_model_object("latent_format")
                shape = [1, fmt.latent_channels] + [1] * (fmt.latent_dimensions - 2) + [WARM_LATENT, WARM_LATENT]
                latent = torch.zeros(shape)
                if cond is not None:  # the checkpoint's own text encoder gives conditioning that fits the model
                    comfy.sample.sample(m, torch.zeros_like(latent), 1, 1.0, "euler", "normal", cond, cond, latent,
                                        disable_pbar=True, seed=0)
                    done.append("sample")
                else:  # no conditioning that fits an arbitrary diffusion model: load it to its device only
                    import comfy.model_management as mm

                    mm.load_models_gpu([m], force_full_load=True)
                    done.append("model")
            if vae is not None and hasattr(vae, "decode"):
                dims = int(getattr(vae, "latent_dim", 2))
                shape = [1, int(getattr(vae, "latent_channels", 4))] + [1] * (dims - 2) + [WARM_LATENT, WARM_LATENT]
                vae.decode(torch.zeros(shape))
                done.append("vae")
        return done


def _resolve_quietly(fp: Any, folder: str, name: str, resolve_missing: ResolveMissing | None) -> Path:
    """At start-up no prompt runs, so no node progress bar: fetch a missing file through the adapter directly."""
    get = getattr(fp.get_full_path, "__wrapped__", fp.get_full_path)
    found = get(folder, name)
    if found is not None:
        return Path(found)
    path = resolve_missing(folder, name) if resolve_missing is not None else None
    if path is None:
        raise FileNotFoundError(f"{folder}/{name}: not on disk and not in any AutoCloud manifest")
    return path


def _clone(obj: Any) -> Any:
    return obj.clone() if obj is not None and hasattr(obj, "clone") else obj


def _patcher_of(obj: Any) -> Any:
    if obj is None:
        return None
    if hasattr(obj, "model") and hasattr(obj, "patches"):  # ModelPatcher
        return obj
    return getattr(obj, "patcher", None)  # CLIP, VAE


def _module_of(obj: Any) -> Any:
    if obj is None:
        return None
    if hasattr(obj, "model") and hasattr(obj, "patches"):
        return obj.model
    for attr in ("cond_stage_model", "first_stage_model"):
        if getattr(obj, attr, None) is not None:
            return getattr(obj, attr)
    return None
