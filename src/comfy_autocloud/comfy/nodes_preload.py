"""ComfyUI nodes for the memory preload, category ``AutoCloud/preload``, and its start-up.

Cached loaders take the stock loaders' inputs and return the stock loaders' objects, from the preload
registry: a preloaded model comes back as a clone in milliseconds, one still preloading is waited for,
a miss is loaded with ComfyUI's own loader and kept. Selectors pick among configured entries by name.
ComfyUI is imported only inside INPUT_TYPES and the loaders, so this module imports anywhere.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path
from typing import Any

from comfy_autocloud.comfy.preload_backend import ComfyBackend, ResolveMissing
from comfy_autocloud.manifest.preload_config import CLIP_TYPES, DEVICES, WEIGHT_DTYPES
from comfy_autocloud.preload import load_requests
from comfy_autocloud.preload.held_models import HeldState, PreloadRegistry, current, set_current

log = logging.getLogger("comfy_autocloud.preload")

CATEGORY = "AutoCloud/preload"
NONE = "None"
NOTHING = "(nothing preloaded)"
PACK_DIR = Path(__file__).resolve().parents[3]


# ---------------------------------------------------------------------- start-up
def make_registry(settings: dict[str, Any], resolve_missing: ResolveMissing | None = None) -> PreloadRegistry:
    from comfy_autocloud.comfy.execution_gate import GATE

    reg = PreloadRegistry(ComfyBackend(resolve_missing), ram_budget=settings.get("preload_ram_budget"),
                          fingerprints=bool(settings.get("preload_fingerprint")), gate=GATE)
    reg.warm_up = bool(settings.get("preload_warmup", True))
    return reg


def start(settings: dict[str, Any], user_dir: str | None, resolve_missing: ResolveMissing | None = None
          ) -> PreloadRegistry:
    """Create the process registry and start preloading preload_config.json (blocking if configured).

    `resolve_missing` (the adapter's) fetches configured files that are not on disk yet."""
    from comfy_autocloud.comfy import execution_gate

    gated = execution_gate.install()  # before the preload thread: it must never overlap a prompt
    log.debug("autocloud preload: gated %s", ", ".join(gated) or "nothing")
    reg = make_registry(settings, resolve_missing)
    set_current(reg)
    path = load_requests.find_config(settings.get("preload_config"), user_dir, PACK_DIR)
    if path is None:
        log.info("autocloud preload: no %s (user dir, pack dir or AUTOCLOUD_PRELOAD_CONFIG); cached loaders "
                 "load on first use", load_requests.CONFIG_NAME)
        return reg
    plan = load_requests.load_plan(path)
    reg.config_path = str(path)
    reg.auto_gpu_load = plan.settings.auto_gpu_load
    for err in plan.errors:
        reg.report_error(err)
    if plan.settings.verbose:
        log.setLevel(logging.INFO)
    reg.queue(plan.requests)
    log.info("autocloud preload: %d models from %s (%s)", len(plan.requests), path,
             "blocking" if settings.get("preload_blocking") else "in the background")

    def warm_executor() -> dict[str, Any]:
        from comfy_autocloud.comfy.executor_warmup import warm_executor

        return warm_executor(reg.gate).as_dict()

    def run() -> None:
        reg.startup(plan.settings.auto_gpu_load, then=warm_executor if reg.warm_up else None)

    if settings.get("preload_blocking"):
        run()
    else:
        threading.Thread(target=run, name="autocloud-preload", daemon=True).start()
    return reg


def registry() -> PreloadRegistry:
    """The process registry; one is made on first use if the adapter's start-up did not run."""
    reg = current()
    if reg is None:
        reg = make_registry({})
        set_current(reg)
    return reg


# ---------------------------------------------------------------------- helpers
def _files(folder: str, kind: str | None = None) -> list[str]:
    import folder_paths  # ComfyUI

    return _with_held(list(folder_paths.get_filename_list(folder)), kind)


def _with_held(names: list[str], kind: str | None) -> list[str]:
    """`names` plus the files of ready entries no longer on disk: ComfyUI validates a prompt's combo values
    against this list, and a held model whose file was deleted is still served from memory."""
    reg = current()
    if kind is None or reg is None:
        return names
    listed = set(names)
    extra = [f for e in reg.entries(kind) if e.state == HeldState.READY for f in e.request.files if f not in listed]
    return names + list(dict.fromkeys(extra))


def _vae_names() -> list[str]:
    try:
        import nodes  # ComfyUI: includes the approximate decoders (taesd, ...) when present

        return _with_held(list(nodes.VAELoader.vae_list()), "vae")
    except Exception:
        return _files("vae", "vae")


def _names(kind: str) -> list[str]:
    reg = current()
    names = reg.names(kind) if reg is not None else []
    return names or [NOTHING]


def _select(name: str) -> Any:
    if name == NOTHING:
        raise ValueError("nothing of this kind is configured in preload_config.json; use a cached loader instead")
    return registry().get_by_name(name)


_TOOLTIP_CACHED = "From memory when preloaded, else loaded like the stock loader and kept for next time."


class CachedCheckpointLoader:
    """🚀 CheckpointLoaderSimple from the preload registry."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load_checkpoint"
    DESCRIPTION = "Loads a checkpoint from the memory cache (preloaded at start-up), or from disk and caches it."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"ckpt_name": (_files("checkpoints", "checkpoint"), {"tooltip": _TOOLTIP_CACHED})}}

    def load_checkpoint(self, ckpt_name: str) -> tuple[Any, ...]:
        return tuple(registry().get(load_requests.checkpoint_request(ckpt_name)))


class _PreloadedSelector:
    """One entry of preload_config.json by name; subclasses say which kind (`KIND`) and what it outputs."""

    KIND = ""
    CATEGORY = CATEGORY
    FUNCTION = "select"

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"preloaded": (_names(cls.KIND), {"tooltip": "cache_key or name of the entry"})}}

    def select(self, preloaded: str) -> tuple[Any, ...]:
        held = _select(preloaded)
        return tuple(held) if len(self.RETURN_TYPES) > 1 else (held,)


class PreloadedCheckpointSelector(_PreloadedSelector):
    """🎯 A checkpoint entry of preload_config.json by name."""

    KIND = "checkpoint"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    DESCRIPTION = "Selects one of the checkpoints preloaded from preload_config.json."


class CachedTextEncoderLoader:
    """📝 CLIPLoader / DualCLIPLoader / TripleCLIPLoader from the preload registry."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("CLIP",)
    FUNCTION = "load_clip"
    DESCRIPTION = "Loads 1, 2 or 3 text encoders (like CLIPLoader / DualCLIPLoader / TripleCLIPLoader) from memory."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        files = _files("text_encoders", "text_encoder")
        return {"required": {
            "clip_name1": (files, {"tooltip": _TOOLTIP_CACHED}),
            "clip_name2": ([NONE, *files], {"tooltip": "second file (DualCLIPLoader); None for one file"}),
            "clip_name3": ([NONE, *files], {"tooltip": "third file (TripleCLIPLoader: SD3); None otherwise"}),
            "type": (list(CLIP_TYPES), {"tooltip": "encoder type, as CLIPLoader/DualCLIPLoader's 'type'"}),
            "device": (list(DEVICES), {"tooltip": "cpu keeps the encoder on the CPU"}),
        }}

    def load_clip(self, clip_name1: str, clip_name2: str = NONE, clip_name3: str = NONE,
                  type: str = "stable_diffusion", device: str = "default") -> tuple[Any]:
        names = [n for n in (clip_name1, clip_name2, clip_name3) if n and n != NONE]
        return (registry().get(load_requests.text_encoder_request(names, type, device)),)


class PreloadedTextEncoderSelector(_PreloadedSelector):
    """📝 A text_encoders entry of preload_config.json by name."""

    KIND = "text_encoder"
    RETURN_TYPES = ("CLIP",)
    DESCRIPTION = "Selects one of the text encoders preloaded from preload_config.json."


class CachedDiffusionModelLoader:
    """🎨 UNETLoader from the preload registry."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load_unet"
    DESCRIPTION = "Loads a diffusion model (UNet/DiT, like UNETLoader) from memory, or from disk and caches it."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "unet_name": (_files("diffusion_models", "diffusion_model"), {"tooltip": _TOOLTIP_CACHED}),
            "weight_dtype": (list(WEIGHT_DTYPES), {"tooltip": "as UNETLoader's weight_dtype; part of the cache key"}),
        }}

    def load_unet(self, unet_name: str, weight_dtype: str = "default") -> tuple[Any]:
        return (registry().get(load_requests.diffusion_request(unet_name, weight_dtype)),)


class PreloadedDiffusionModelSelector(_PreloadedSelector):
    """🎨 A diffusion_models entry of preload_config.json by name."""

    KIND = "diffusion_model"
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = "Selects one of the diffusion models preloaded from preload_config.json."


class CachedVAELoader:
    """🖼️ VAELoader from the preload registry."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("VAE",)
    FUNCTION = "load_vae"
    DESCRIPTION = "Loads a VAE from memory, or from disk and caches it."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"vae_name": (_vae_names(), {"tooltip": _TOOLTIP_CACHED})}}

    def load_vae(self, vae_name: str) -> tuple[Any]:
        return (registry().get(load_requests.vae_request(vae_name)),)


class PreloadedVAESelector(_PreloadedSelector):
    """🖼️ A vaes entry of preload_config.json by name."""

    KIND = "vae"
    RETURN_TYPES = ("VAE",)
    DESCRIPTION = "Selects one of the VAEs preloaded from preload_config.json."


KIND_CHOICES = ["all", "checkpoint", "text_encoder", "diffusion_model", "vae"]


def describe(reg: PreloadRegistry, kind: str = "all") -> str:
    """The registry as text: one line per entry (state, size, load time, hits), then config errors."""
    st = reg.status()
    lines = [f"AutoCloud memory preload: {st['counts']['ready']} ready, {st['counts']['loading']} loading, "
             f"{st['counts']['queued']} queued, {st['counts']['failed']} failed; "
             f"{st['bytes_held'] / 2**20:.1f} MiB held"
             + (f" of {st['ram_budget'] / 2**20:.0f} MiB budget" if st["ram_budget"] else "")]
    for e in st["entries"]:
        if kind != "all" and e["kind"] != kind:
            continue
        line = f"- [{e['state']}] {e['name']} ({e['kind']}"
        if e["state"] == "ready":
            line += f", {e['bytes'] / 2**20:.1f} MiB, loaded in {e['load_seconds']:.2f}s, {e['hits']} hits, " \
                    f"on {e['device']}"
            if e.get("warmed"):
                line += f", warmed up ({'+'.join(e['warmed'])}) in {e['warm_seconds']:.2f}s"
        line += ")"
        if e["error"]:
            line += f": {e['error']}"
        if e.get("note"):
            line += f" ! {e['note']}"
        lines.append(line)
    lines += [f"! {err}" for err in st["config_errors"]]
    return "\n".join(lines)


class CacheModelInfo:
    """📋 Every preloaded model, as text on the node and as a STRING output."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("info",)
    FUNCTION = "info"
    OUTPUT_NODE = True
    DESCRIPTION = "Shows every model in the memory cache: state, size, load time, hits, errors."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {"kind": (KIND_CHOICES, {"tooltip": "which kind of models to list"})}}

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")  # the registry changes between runs: never reuse a cached answer

    def info(self, kind: str = "all") -> dict[str, Any]:
        text = describe(registry(), kind)
        return {"ui": {"text": [text]}, "result": (text,)}


class CheckCacheStatus:
    """🔍 Whether one model (by file name or entry name) is in memory."""

    CATEGORY = CATEGORY
    RETURN_TYPES = ("BOOLEAN", "STRING")
    RETURN_NAMES = ("cached", "status")
    FUNCTION = "check"
    OUTPUT_NODE = True
    DESCRIPTION = "Checks whether a model is preloaded (ready in memory), loading, queued or failed, and why."

    @classmethod
    def INPUT_TYPES(cls) -> dict[str, Any]:
        return {"required": {
            "kind": (KIND_CHOICES, {"tooltip": "restrict the search to one kind"}),
            "name": ("STRING", {"default": "", "tooltip": "a file name (e.g. model.safetensors) or cache_key"}),
        }}

    @classmethod
    def IS_CHANGED(cls, **kwargs: Any) -> float:
        return float("nan")

    def check(self, kind: str = "all", name: str = "") -> dict[str, Any]:
        name = name.strip()
        found = [e for e in registry().entries(None if kind == "all" else kind)
                 if name and (e.name == name or e.key == name or name in e.request.files
                              or any(os.path.basename(f) == name for f in e.request.files))]
        if not found:
            text, cached = f"{name or '(no name)'}: not in the memory cache (a cached loader loads and keeps it)", False
        else:
            cached = any(e.state == HeldState.READY for e in found)
            text = "\n".join(f"{e.name}: {e.state.value}" + (f" ({e.error})" if e.error else "")
                             + (f", {e.nbytes / 2**20:.1f} MiB, {e.hits} hits" if e.state == HeldState.READY else "")
                             + (f"; {e.note}" if e.note else "")
                             for e in found)
        return {"ui": {"text": [text]}, "result": (cached, text)}


NODE_CLASS_MAPPINGS = {
    "AutoCloudCachedCheckpointLoader": CachedCheckpointLoader,
    "AutoCloudPreloadedCheckpointSelector": PreloadedCheckpointSelector,
    "AutoCloudCachedTextEncoderLoader": CachedTextEncoderLoader,
    "AutoCloudPreloadedTextEncoderSelector": PreloadedTextEncoderSelector,
    "AutoCloudCachedDiffusionModelLoader": CachedDiffusionModelLoader,
    "AutoCloudPreloadedDiffusionModelSelector": PreloadedDiffusionModelSelector,
    "AutoCloudCachedVAELoader": CachedVAELoader,
    "AutoCloudPreloadedVAESelector": PreloadedVAESelector,
    "AutoCloudCacheModelInfo": CacheModelInfo,
    "AutoCloudCheckCacheStatus": CheckCacheStatus,
}

NODE_DISPLAY_NAME_MAPPINGS = {
    "AutoCloudCachedCheckpointLoader": "🚀 Cached Checkpoint Loader (缓存检查点加载器)",
    "AutoCloudPreloadedCheckpointSelector": "🎯 Preloaded Checkpoint Selector (预加载模型选择器)",
    "AutoCloudCachedTextEncoderLoader": "📝 Cached Text Encoder Loader (缓存文本编码器加载器)",
    "AutoCloudPreloadedTextEncoderSelector": "📝 Preloaded Text Encoder Selector (预加载文本编码器选择器)",
    "AutoCloudCachedDiffusionModelLoader": "🎨 Cached Diffusion Model Loader (缓存扩散模型加载器)",
    "AutoCloudPreloadedDiffusionModelSelector": "🎨 Preloaded Diffusion Model Selector (预加载扩散模型选择器)",
    "AutoCloudCachedVAELoader": "🖼️ Cached VAE Loader (缓存 VAE 加载器)",
    "AutoCloudPreloadedVAESelector": "🖼️ Preloaded VAE Selector (预加载 VAE 选择器)",
    "AutoCloudCacheModelInfo": "📋 Cache Model Info (缓存模型信息)",
    "AutoCloudCheckCacheStatus": "🔍 Check Cache Status (检查缓存状态)",
}
