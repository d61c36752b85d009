"""Effective settings and where each value came from (flag > environment > config file > default).

`autocloud config` prints this table so nobody has to guess which cache a node is using.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from comfy_autocloud.errors import ManifestError
from comfy_autocloud.units import parse_rate, parse_size

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "autocloud" / "models"


# The names store.eviction registers (config sits below the store; tests/test_eviction.py keeps them equal).
POLICIES = ("default", "lru", "lfuda", "gdsf", "gdlfu", "lrfu-1d", "lrfu-14d", "lrfu-tod", "lrfu-next")


# How a commit reaches the disk (store.DURABILITIES; tests/test_store_durability.py keeps them equal).
DURABILITIES = ("deferred", "durable", "ephemeral")


def _durability(value: str) -> str:
    text = str(value).strip().lower()
    if text not in DURABILITIES:
        raise ValueError(f"unknown durability (known: {', '.join(DURABILITIES)})")
    return text


def _policy(value: str) -> str:
    if value not in POLICIES:
        raise ValueError(f"unknown eviction policy (known: {', '.join(POLICIES)})")
    return value


def _str_list(value: Any) -> tuple[str, ...]:
    """A YAML list, or a comma/newline separated string (environment variables)."""
    if value is None:
        return ()
    items = value if isinstance(value, (list, tuple)) else str(value).replace("\n", ",").split(",")
    out = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"expected text, got {type(item).__name__}")
        if item.strip():
            out.append(item.strip())
    return tuple(out)


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError("expected true/false (1/0, yes/no, on/off)")


def _positive_int(value: Any) -> int:
    n = int(value)
    if n < 1:
        raise ValueError("must be at least 1")
    return n


class Secret:
    """A setting that must never be printed (a token, a URL with a password): `str()` shows a masked form."""

    __slots__ = ("shown", "value")

    def __init__(self, value: str, shown: str = "***") -> None:
        self.value = value
        self.shown = shown

    def __str__(self) -> str:
        return self.shown

    def __repr__(self) -> str:
        return f"Secret({self.shown!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other.value == self.value

    def __hash__(self) -> int:
        return hash(self.value)


def _redis_url(value: str) -> Secret:
    from comfy_autocloud.redact import redact_url

    text = str(value).strip()
    if not text.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("expected redis://host:port[/db], rediss://… or unix:///path")
    return Secret(text, redact_url(text))


def _token(value: str) -> Secret:
    text = str(value).strip()
    if len(text) < 8:
        raise ValueError("the peer token must be at least 8 characters")
    return Secret(text)


NODE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def check_node_id(node_id: str) -> str:
    """Node ids go into Redis keys and lease values: a short name without spaces or colons."""
    if not NODE_ID_RE.match(node_id):
        raise ValueError(f"node id {node_id!r} must be 1-64 of A-Z a-z 0-9 . _ - (starting alphanumeric)")
    return node_id


def _node_id(value: str) -> str:
    return check_node_id(str(value))


def _optional(parse: Any) -> Any:
    return lambda v: None if v in (None, "", "0", 0) else parse(v)


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: Any
    parse: Any
    help: str
    old_name: str | None = None  # a deprecated name (and AUTOCLOUD_<OLD_NAME>) still read, after the new ones

    @property
    def old_env(self) -> str | None:
        return f"AUTOCLOUD_{self.old_name.upper()}" if self.old_name else None


SETTINGS: tuple[Setting, ...] = (
    Setting("cache_dir", "AUTOCLOUD_CACHE", str(DEFAULT_CACHE), lambda v: str(Path(v).expanduser()),
            "where model files live (<cache>/<folder>/<filename>)"),
    Setting("max_size", "AUTOCLOUD_MAX_SIZE", None, lambda v: None if v in (None, "", "0") else parse_size(v),
            "cache size cap; eviction keeps usage below it"),
    Setting("policy", "AUTOCLOUD_POLICY", "default", _policy,
            "eviction policy: default (size/frequency aware), lru, lfuda or gdsf"),
    Setting("connections", "AUTOCLOUD_CONNECTIONS", None, lambda v: None if v in (None, "") else int(v),
            "connections per download (unset: adaptive)"),
    Setting("rate_limit", "AUTOCLOUD_RATE_LIMIT", None, lambda v: None if v in (None, "", "0") else parse_rate(v),
            "process-wide download rate limit in bytes/s"),
    Setting("retries", "AUTOCLOUD_RETRIES", 6, int, "attempts per byte range on 5xx/429/reset/timeout"),
    Setting("durability", "AUTOCLOUD_DURABILITY", "deferred", _durability,
            "how a download reaches the disk: deferred (nothing waits for it; a detached flush follows, and a "
            "file written just before the machine went down is checked against its sha256 before use), durable "
            "(fsync before the file appears) or ephemeral (never flushed: a cache that dies with the machine)"),
    Setting("min_free_disk", "AUTOCLOUD_MIN_FREE_DISK", 256 * 2**20, parse_size,
            "space every download leaves free on the cache disk (small disks, tests: lower it)"),
    Setting("temp_dir", "AUTOCLOUD_TEMP_DIR", None, _optional(lambda v: str(Path(v).expanduser())),
            "partial downloads on this (RAM) disk, e.g. a tmpfs; the cache disk when it lacks room for one"),
    Setting("keep_days", "AUTOCLOUD_KEEP_DAYS", None, lambda v: None if v in (None, "") else float(v),
            "`clean` removes files not used for this many days"),
    # ComfyUI adapter (comfy_autocloud.comfy)
    Setting("manifest", "AUTOCLOUD_MANIFEST", (), _str_list,
            "model lists ComfyUI offers: files, directories or http(s) URLs, comma separated"),
    Setting("manifest_sync_url", "AUTOCLOUD_MANIFEST_SYNC_URL", None, _optional(str),
            "versions index `manifest sync` reads ({list: {url, md5|sha256, version}})"),
    Setting("manifest_dir", "AUTOCLOUD_MANIFEST_DIR", None, _optional(lambda v: str(Path(v).expanduser())),
            "directory `manifest sync` keeps the lists in (point AUTOCLOUD_MANIFEST at it)"),
    Setting("network_list_local_dirs", "AUTOCLOUD_NETWORK_LIST_LOCAL_DIRS", (), _str_list,
            "directories a list fetched over the network may name files in (file:// or /path); by default such "
            "lists may name only network sources"),
    Setting("manifest_reload", "AUTOCLOUD_MANIFEST_RELOAD", 5.0, float,
            "seconds between checks of local manifest files for changes in ComfyUI (0: never reload)"),
    Setting("allowed_hosts", "AUTOCLOUD_ALLOWED_HOSTS", ("huggingface.co", "civitai.com"), _str_list,
            "hosts (and their subdomains) whose URLs in a workflow's models[] are downloaded"),
    Setting("prefetch", "AUTOCLOUD_PREFETCH", True, _bool,
            "fetch every missing model of a queued prompt at once, before its loaders run"),
    Setting("parallel", "AUTOCLOUD_PARALLEL", 4, _positive_int, "model downloads at once in ComfyUI"),
    # background disk prefetch (comfy_autocloud.prefetch); "preload" means the RAM/VRAM preload below
    Setting("prefetch_background", "AUTOCLOUD_PREFETCH_BACKGROUND", False, _bool,
            "keep pinned and most-used models present in the background (background disk prefetch)",
            old_name="preload"),
    Setting("prefetch_rate", "AUTOCLOUD_PREFETCH_RATE", 50 * 2**20, lambda v: parse_rate(v),
            "byte rate the background prefetcher may use; on-demand downloads always go first",
            old_name="preload_rate"),
    Setting("prefetch_interval", "AUTOCLOUD_PREFETCH_INTERVAL", 3600.0, float,
            "seconds between background prefetch passes", old_name="preload_interval"),
    Setting("prefetch_top", "AUTOCLOUD_PREFETCH_TOP", 10, int,
            "how many of the most-used models the background prefetcher keeps on disk", old_name="preload_top"),
    # memory preload: models held in RAM/VRAM by the preload registry
    Setting("preload_config", "AUTOCLOUD_PRELOAD_CONFIG", None, _optional(lambda v: str(Path(v).expanduser())),
            "preload_config.json to load at ComfyUI start-up (default: ComfyUI's user dir, then the pack dir)"),
    Setting("preload_blocking", "AUTOCLOUD_PRELOAD_BLOCKING", False, _bool,
            "preload before ComfyUI's start-up ends (memory snapshots) instead of in the background"),
    Setting("preload_ram_budget", "AUTOCLOUD_PRELOAD_RAM_BUDGET", None,
            lambda v: None if v in (None, "", "0") else parse_size(v),
            "most RAM the preload registry may hold; entries past it are refused with a log line"),
    Setting("preload_fingerprint", "AUTOCLOUD_PRELOAD_FINGERPRINT", False, _bool,
            "hash preloaded weights at load so /autocloud/preload?verify=1 proves patches left them untouched"),
    Setting("preload_warmup", "AUTOCLOUD_PRELOAD_WARMUP", True, _bool,
            "with auto_gpu_load (and /autocloud/preload/to_gpu): run each preloaded model once on a tiny input, so "
            "the first prompt pays no first-call costs"),
    Setting("predict", "AUTOCLOUD_PREDICT", False, _bool,
            "the background prefetcher also fetches the models the access history predicts next "
            "(context model over the session)"),
    Setting("predict_top", "AUTOCLOUD_PREDICT_TOP", 2, int,
            "how many predicted models the background prefetcher fetches after each load"),
    # fleet: nodes share files through Redis and each other's peer servers
    Setting("redis_url", "AUTOCLOUD_REDIS_URL", None, _optional(_redis_url),
            "Redis of the fleet; unset: this node works alone"),
    Setting("peer_token", "AUTOCLOUD_PEER_TOKEN", None, _optional(_token),
            "shared secret every node's peer server requires (bearer token)"),
    Setting("node_id", "AUTOCLOUD_NODE_ID", None, _optional(_node_id),
            "this node's name in the fleet (default: host name)"),
    Setting("peer_serve", "AUTOCLOUD_PEER_SERVE", False, _bool,
            "ComfyUI itself serves this node's verified files to the fleet (instead of a serve-peer sidecar)"),
    Setting("peer_host", "AUTOCLOUD_PEER_HOST", "0.0.0.0", str, "address `serve-peer` listens on"),
    Setting("peer_port", "AUTOCLOUD_PEER_PORT", 8765, int, "port `serve-peer` listens on"),
    Setting("peer_url", "AUTOCLOUD_PEER_URL", None, _optional(str),
            "URL other nodes reach this node's peer server at (default: http://<host name>:<port>)"),
    Setting("peer_requests_per_s", "AUTOCLOUD_PEER_REQUESTS_PER_SECOND", 200.0, float,
            "requests a second one peer may make to this node's peer server"),
    Setting("peer_rate_limit", "AUTOCLOUD_PEER_RATE_LIMIT", None, _optional(parse_rate),
            "bytes/s one peer may take from this node's peer server"),
    Setting("peer_metrics_public", "AUTOCLOUD_PEER_METRICS_PUBLIC", False, _bool,
            "the peer server's /metrics (counters only) without the token, for Prometheus scraping"),
    Setting("fleet_downloads_per_minute", "AUTOCLOUD_FLEET_DOWNLOADS_PER_MINUTE", 10.0, _optional(float),
            "origin downloads a minute per node (GCRA in Redis; 0: no limit)"),
    Setting("fleet_download_burst", "AUTOCLOUD_FLEET_DOWNLOAD_BURST", 10, int,
            "origin downloads a node may start at once before the per-minute rate applies"),
    Setting("fleet_origin_rate", "AUTOCLOUD_FLEET_ORIGIN_RATE", None, _optional(parse_rate),
            "origin bytes/s for the whole fleet together (GCRA in Redis)"),
    Setting("fleet_lease_ttl", "AUTOCLOUD_FLEET_LEASE_TTL", 30.0, float,
            "seconds a crashed origin-fetching node blocks others before its lease expires"),
    Setting("fleet_heartbeat_ttl", "AUTOCLOUD_FLEET_HEARTBEAT_TTL", 15.0, float,
            "seconds after its last heartbeat a node's files stop being offered"),
    Setting("fleet_max_wait", "AUTOCLOUD_FLEET_MAX_WAIT", 900.0, float,
            "longest wait for another node's download before fetching from the origin alone"),
)


@dataclass
class Settings:
    values: dict[str, Any] = field(default_factory=dict)
    origins: dict[str, str] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Any:
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def cache_path(self) -> Path:
        return Path(self.values["cache_dir"])


def config_file_path() -> Path:
    explicit = os.environ.get("AUTOCLOUD_CONFIG")
    if explicit:
        return Path(explicit)
    base = Path(os.environ.get("XDG_CONFIG_HOME", str(Path.home() / ".config")))
    return base / "autocloud" / "config.yaml"


def _read_config_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml  # only when there is a file to read: start-up time of every command

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(str(path), f"cannot read config: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(str(path), "config must be a mapping of setting: value")
    known = {s.name for s in SETTINGS} | {s.old_name for s in SETTINGS if s.old_name}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ManifestError(f"{path}:{unknown[0]}", f"unknown setting (known: {', '.join(sorted(known))})")
    return data


def load_settings(overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None,
                  extra_config: Path | None = None) -> Settings:
    """Resolve every setting; `overrides` are command-line flags (None means 'not given').

    `extra_config` (ComfyUI's `user/autocloud.yaml`) sits between the environment and the global file.
    """
    env = dict(os.environ) if env is None else env
    overrides = overrides or {}
    cfg_path = config_file_path()
    file_values = _read_config_file(cfg_path)
    extra_values = _read_config_file(extra_config) if extra_config is not None else {}
    settings = Settings()
    for s in SETTINGS:
        old, old_env = s.old_name, s.old_env
        written, note = s.name, ""  # the name the value was given under; what `config` adds to its origin
        if overrides.get(s.name) is not None:
            raw, origin = overrides[s.name], "command line"
        elif env.get(s.env) not in (None, ""):
            raw, origin = env[s.env], f"env {s.env}"
        elif old_env and env.get(old_env) not in (None, ""):
            raw, origin, note = env[old_env], f"env {old_env}", f" (deprecated: use {s.env})"
        elif s.name in extra_values:
            raw, origin = extra_values[s.name], f"{extra_config}"
        elif old and old in extra_values:
            raw, origin, written = extra_values[old], f"{extra_config}", old
        elif s.name in file_values:
            raw, origin = file_values[s.name], f"{cfg_path}"
        elif old and old in file_values:
            raw, origin, written = file_values[old], f"{cfg_path}", old
        else:
            raw, origin = s.default, "default"
        if written != s.name:
            note = f": {written} (deprecated: use {s.name})"
        try:
            value = s.parse(raw) if raw is not None else None
        except (ValueError, TypeError) as exc:
            raise ManifestError(f"{origin}:{written}", f"invalid value {raw!r}: {exc}") from exc
        settings.values[s.name] = value
        settings.origins[s.name] = origin + note
    return settings


def default_settings() -> Settings:
    """Every setting at its default, whatever the environment and config file say (the offline demo)."""
    settings = Settings()
    for s in SETTINGS:
        settings.values[s.name] = s.parse(s.default) if s.default is not None else None
        settings.origins[s.name] = "default"
    return settings
