"""`autocloud doctor` and the panel's Health section: is this node set up so ComfyUI sees its models?

Each check answers one question a new user gets wrong (ComfyUI not found, a volume folder ComfyUI never
reads, a cache that cannot be written, a manifest that does not parse, an unreachable Redis, a proxy)
with `ok`, `info`, `warn` or `fail` and a sentence that names the path, key or URL (secrets masked).
No ComfyUI import: the ComfyUI process describes its folders itself (`comfy.hooks.layout`), the CLI
reads them from a checkout (`layout_from_checkout`), with ComfyUI's rules for extra_model_paths.yaml.
"""

from __future__ import annotations

import difflib
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from comfy_autocloud.config import Settings
from comfy_autocloud.errors import AutoCloudError
from comfy_autocloud.manifest.workflow import LEGACY_FOLDERS
from comfy_autocloud.redact import redact_url
from comfy_autocloud.units import human_size

TESTED_COMFYUI = "0.3.64"
TESTED_FRONTEND = "1.27.10"
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".pt2", ".pkl", ".gguf", ".onnx")
SCAN_LIMIT = 20000  # directory entries looked at per model root (a huge volume must not stall the check)
TOKENS = (("HF_TOKEN", "Hugging Face"), ("HUGGING_FACE_HUB_TOKEN", "Hugging Face"), ("CIVITAI_TOKEN", "Civitai"),
          ("AWS_ACCESS_KEY_ID", "S3"), ("AUTOCLOUD_PEER_TOKEN", "fleet peers"))
_SKIP = ("custom_nodes", "configs")


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | info | warn | fail
    detail: str


@dataclass
class Layout:
    """The model folders ComfyUI reads: folder name -> directories in search order."""

    comfy_path: str | None
    version: str | None
    frontend: str | None
    folders: dict[str, list[str]] = field(default_factory=dict)
    roots: list[str] = field(default_factory=list)  # models dir and extra_model_paths base paths: scanned
    problems: list[Check] = field(default_factory=list)  # found while reading the layout
    where: str = ""  # "this ComfyUI process" or the checkout read


def _canonical(name: str) -> str:
    return LEGACY_FOLDERS.get(name, name)


def _add(folders: dict[str, list[str]], name: str, path: str, first: bool) -> None:
    """folder_paths.add_model_folder_path's rule (legacy names mapped, is_default goes first)."""
    paths = folders.setdefault(_canonical(name), [])
    if path in paths:
        paths.remove(path)
    paths.insert(0, path) if first else paths.append(path)


_FOLDER_LINE = re.compile(r'folder_names_and_paths\["(\w+)"\]\s*=\s*\(\[(.*?)\]')
_JOIN = re.compile(r'os\.path\.join\(models_dir,\s*"([^"]+)"\)')


def layout_from_checkout(comfy: Path, cache_root: Path | None, extra_configs: Iterable[Path] = ()) -> Layout:
    """What a ComfyUI started from `comfy` (with this pack installed) will read, without importing it."""
    comfy = Path(comfy)
    text = (comfy / "folder_paths.py").read_text(encoding="utf-8")
    models_dir = comfy / "models"
    lay = Layout(str(comfy), _version(comfy), _frontend_required(comfy), where=f"read from {comfy}")
    for name, inner in _FOLDER_LINE.findall(text):
        if name in _SKIP:
            continue
        for sub in _JOIN.findall(inner):
            _add(lay.folders, name, str(models_dir / sub), first=False)
    lay.roots.append(str(models_dir))
    configs = [comfy / "extra_model_paths.yaml", *extra_configs]
    for cfg in configs:
        if cfg.is_file():
            _apply_extra_config(lay, cfg)
    if cache_root is not None:
        for name in list(lay.folders):
            for sub in (*[k for k, v in LEGACY_FOLDERS.items() if v == name], name):
                _add(lay.folders, name, str(Path(cache_root) / sub), first=True)
    return lay


def _version(comfy: Path) -> str | None:
    m = re.search(r'__version__\s*=\s*"([^"]+)"', _read(comfy / "comfyui_version.py"))
    return m.group(1) if m else None


def _frontend_required(comfy: Path) -> str | None:
    m = re.search(r"^comfyui-frontend-package==(\S+)", _read(comfy / "requirements.txt"), re.MULTILINE)
    return m.group(1) if m else None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return ""


def _apply_extra_config(lay: Layout, cfg: Path) -> None:
    """utils/extra_config.load_extra_path_config's rules, recording what it would not read."""
    try:
        data = yaml.safe_load(cfg.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        lay.problems.append(Check("extra_model_paths", "fail", f"{cfg}: not readable YAML ({exc})"))
        return
    if not isinstance(data, dict):
        lay.problems.append(Check("extra_model_paths", "fail", f"{cfg}: expected a mapping of named sections"))
        return
    for section, conf in data.items():
        if not isinstance(conf, dict):
            continue
        conf = dict(conf)
        base = conf.pop("base_path", None)
        if base:
            base = os.path.expandvars(os.path.expanduser(str(base)))
            if not os.path.isabs(base):
                base = os.path.abspath(os.path.join(cfg.parent, base))
            lay.roots.append(os.path.normpath(base))
        first = bool(conf.pop("is_default", False))
        for name, value in conf.items():
            for line in str(value).split("\n"):
                if not line:
                    continue
                full = os.path.join(base, line) if base else (
                    line if os.path.isabs(line) else os.path.abspath(os.path.join(cfg.parent, line)))
                full = os.path.normpath(full)
                _add(lay.folders, str(name), full, first)
                if not os.path.isdir(full):
                    lay.problems.append(Check("extra_model_paths", "warn",
                                              f"{cfg} [{section}] {name}: {full} does not exist"))


# ------------------------------------------------------------------ checks
def check_comfyui(lay: Layout | None) -> Check:
    if lay is None or lay.comfy_path is None:
        return Check("ComfyUI", "fail", "not found: pass --comfyui DIR or set COMFYUI_PATH to the folder with main.py")
    where = f"{lay.version or 'unknown version'} at {lay.comfy_path}, frontend {lay.frontend or 'unknown'}"
    if lay.version != TESTED_COMFYUI or (lay.frontend and lay.frontend != TESTED_FRONTEND):
        return Check("ComfyUI", "info", f"{where} (tested with {TESTED_COMFYUI}, frontend {TESTED_FRONTEND})")
    return Check("ComfyUI", "ok", where)


def check_folders(lay: Layout, cache_root: Path) -> Check:
    cache = str(cache_root)
    first = [n for n, paths in lay.folders.items() if paths and paths[0].startswith(cache)]
    if not first:
        return Check("model folders", "warn", f"{len(lay.folders)} folders ({lay.where}), none starts with "
                                              f"AutoCloud's cache {cache}: is the pack installed in custom_nodes?")
    return Check("model folders", "ok", f"{len(lay.folders)} folders ({lay.where}); AutoCloud's cache is searched "
                                        f"first in {len(first)} of them")


def _model_files(root: Path) -> dict[Path, int]:
    """Model files under `root` counted per directory (bounded walk)."""
    counts: dict[Path, int] = {}
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        seen += len(dirnames) + len(filenames)
        n = sum(f.lower().endswith(MODEL_EXTENSIONS) for f in filenames)
        if n:
            counts[Path(dirpath)] = n
        if seen > SCAN_LIMIT:
            break
    return counts


def check_unseen(lay: Layout) -> list[Check]:
    """Model files in a models root that no folder ComfyUI reads covers (wrong name, missing key)."""
    read = [Path(p) for paths in lay.folders.values() for p in paths]
    names = sorted(lay.folders)
    out: list[Check] = []
    for root in dict.fromkeys(lay.roots):
        rootp = Path(root)
        if not rootp.is_dir():
            continue
        unseen: dict[Path, int] = {}
        for d, n in _model_files(rootp).items():
            if not any(d == r or r in d.parents for r in read):
                top = rootp / d.relative_to(rootp).parts[0] if d != rootp else d
                unseen[top] = unseen.get(top, 0) + n
        for top, n in sorted(unseen.items()):
            name = _canonical(top.name)
            if top == rootp:
                hint = "move them into a folder such as checkpoints/ or loras/"
            elif name in lay.folders:
                hint = (f"add `{top.name}: {top.name}/` to the section of extra_model_paths.yaml whose base_path "
                        f"is {rootp}")
            else:
                close = difflib.get_close_matches(name.lower(), names, n=1, cutoff=0.6)
                hint = (f"ComfyUI has no folder named {top.name!r}"
                        + (f"; did you mean {close[0]!r}?" if close else f" (known: {', '.join(names)})"))
            out.append(Check("models ComfyUI will not see", "fail", f"{n} model files in {top}: {hint}"))
    return out


def check_cache(cache_root: Path) -> Check:
    try:
        cache_root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_root, prefix=".doctor-"):
            pass
    except OSError as exc:
        return Check("cache", "fail", f"{cache_root} is not writable ({exc.strerror or exc})")
    return Check("cache", "ok", f"{cache_root} is writable")


def check_space(cache_root: Path, cap: int | None, cached: int) -> Check:
    try:
        du = shutil.disk_usage(cache_root)
    except OSError as exc:
        return Check("disk space", "fail", f"{cache_root}: {exc.strerror or exc}")
    free = f"{human_size(du.free)} free of {human_size(du.total)}"
    if cap is None:
        return Check("disk space", "info", f"{free}; no cap (AUTOCLOUD_MAX_SIZE): the cache may fill the disk")
    if du.free + cached < cap:
        return Check("disk space", "warn", f"cap {human_size(cap)} but only {free} (+{human_size(cached)} cached): "
                                           f"the disk fills before the cap evicts; lower AUTOCLOUD_MAX_SIZE")
    return Check("disk space", "ok", f"{free}; cap {human_size(cap)}, {human_size(cached)} cached")


def check_manifests(entries: Iterable[str], loaded: int | None = None, error: str | None = None) -> Check:
    """Parse each AUTOCLOUD_MANIFEST entry (URLs: probed, not downloaded); or report what the adapter loaded."""
    entries = list(entries)
    if not entries:
        return Check("manifest", "warn", "AUTOCLOUD_MANIFEST is not set: only files already on disk are offered")
    if loaded is not None:
        if error:
            return Check("manifest", "fail", error)
        return Check("manifest", "ok", f"{loaded} entries from {', '.join(map(redact_url, entries))}")
    from comfy_autocloud.manifest import load_manifests
    from comfy_autocloud.transfer import RetryPolicy, TransferOptions, probe

    total = 0
    for entry in entries:
        if entry.lower().startswith(("http://", "https://")):
            try:
                probe(entry, TransferOptions(retry=RetryPolicy(attempts=1), connect_timeout=5.0, read_timeout=10.0))
            except AutoCloudError as exc:
                return Check("manifest", "fail", str(exc))
            continue
        try:
            total += len(load_manifests([Path(entry).expanduser()]))
        except (AutoCloudError, OSError) as exc:
            return Check("manifest", "fail", str(exc))
    return Check("manifest", "ok", f"{total} entries parsed from {', '.join(map(redact_url, entries))}")


def check_fleet(settings: Settings) -> list[Check]:
    secret = settings.values.get("redis_url")
    if secret is None:
        return [Check("fleet", "info", "not configured (AUTOCLOUD_REDIS_URL unset): this node works alone")]
    from comfy_autocloud.fleet.conn import RedisGate
    from comfy_autocloud.fleet.registry import Registry

    gate = RedisGate(secret.value, timeout=2.0)
    try:
        nodes = Registry(gate, "doctor").nodes()
    except AutoCloudError as exc:
        return [Check("fleet", "fail", str(exc))]
    finally:
        gate.close()
    out = [Check("fleet", "ok", f"Redis {gate.display} reachable, {len(nodes)} nodes registered")]
    for node, rec in sorted(nodes.items()):
        url = rec.get("url", "")
        try:
            parts = urlsplit(url)
            socket.create_connection((parts.hostname or "", parts.port or 80), timeout=2.0).close()
        except (OSError, ValueError) as exc:
            out.append(Check("peer", "warn", f"{node} at {redact_url(url)} does not accept connections ({exc})"))
    return out


def check_tokens(env: Mapping[str, str]) -> Check:
    shown = [f"{name} set ({len(env[name])} characters, {what})" for name, what in TOKENS if env.get(name)]
    return Check("tokens", "info", "; ".join(shown) if shown else "none set (HF_TOKEN, CIVITAI_TOKEN, AWS_*): "
                                                                   "only public models download")


def check_proxy(env: Mapping[str, str]) -> Check:
    from comfy_autocloud.transfer.proxy import describe

    d = describe(env)
    bad = [v for v in (d["http"], d["https"]) if v and v.startswith("error:")]
    if bad:
        return Check("proxy", "fail", "; ".join(b[len("error: "):] for b in bad))
    if not d["http"] and not d["https"]:
        return Check("proxy", "info", "none: downloads connect directly")
    parts = [f"{s}: {d[s] or 'direct'}" for s in ("http", "https")]
    if d["no_proxy"]:
        parts.append(f"direct for NO_PROXY={d['no_proxy']}")
    return Check("proxy", "info", "; ".join(parts))


def run_checks(settings: Settings, layout: Layout | None, *, cached_bytes: int = 0,
               manifest_loaded: int | None = None, manifest_error: str | None = None,
               env: Mapping[str, str] | None = None) -> list[Check]:
    env = os.environ if env is None else env
    cache_root = Path(settings.cache_path)
    checks = [check_comfyui(layout)]
    if layout is not None and layout.comfy_path is not None:
        checks.append(check_folders(layout, cache_root))
        checks += layout.problems
        checks += check_unseen(layout)
    checks += [check_cache(cache_root), check_space(cache_root, settings.max_size, cached_bytes),
               check_manifests(settings.values.get("manifest", ()), manifest_loaded, manifest_error),
               Check("allowed hosts", "info", "workflow and panel URLs may come from: " + (
                   ", ".join(settings.values.get("allowed_hosts", ())) or "nowhere (AUTOCLOUD_ALLOWED_HOSTS empty)")),
               *check_fleet(settings), check_tokens(env), check_proxy(env)]
    return checks


def report(checks: list[Check], layout: Layout | None) -> dict[str, Any]:
    """The JSON of `autocloud doctor --json` and GET /autocloud/doctor."""
    return {"ok": not any(c.status == "fail" for c in checks), "checks": [asdict(c) for c in checks],
            "folders": layout.folders if layout is not None else {}}
