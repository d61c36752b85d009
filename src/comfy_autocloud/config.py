"""Effective settings and where each value came from (flag > environment > config file > default).

`autocloud config` prints this table so nobody has to guess which cache a node is using.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from comfy_autocloud.errors import ManifestError
from comfy_autocloud.units import parse_rate, parse_size

DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", str(Path.home() / ".cache"))) / "autocloud" / "models"


POLICIES = ("default", "lru", "lfuda", "gdsf")


def _policy(value: str) -> str:
    if value not in POLICIES:
        raise ValueError(f"unknown eviction policy (known: {', '.join(POLICIES)})")
    return value


@dataclass(frozen=True)
class Setting:
    name: str
    env: str
    default: Any
    parse: Any
    help: str


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
    Setting("keep_days", "AUTOCLOUD_KEEP_DAYS", None, lambda v: None if v in (None, "") else float(v),
            "`clean` removes files not used for this many days"),
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
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ManifestError(str(path), f"cannot read config: {exc}") from exc
    if not isinstance(data, dict):
        raise ManifestError(str(path), "config must be a mapping of setting: value")
    known = {s.name for s in SETTINGS}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ManifestError(f"{path}:{unknown[0]}", f"unknown setting (known: {', '.join(sorted(known))})")
    return data


def load_settings(overrides: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> Settings:
    """Resolve every setting; `overrides` are command-line flags (None means 'not given')."""
    env = dict(os.environ) if env is None else env
    overrides = overrides or {}
    cfg_path = config_file_path()
    file_values = _read_config_file(cfg_path)
    settings = Settings()
    for s in SETTINGS:
        if overrides.get(s.name) is not None:
            raw, origin = overrides[s.name], "command line"
        elif env.get(s.env) not in (None, ""):
            raw, origin = env[s.env], f"env {s.env}"
        elif s.name in file_values:
            raw, origin = file_values[s.name], f"{cfg_path}"
        else:
            raw, origin = s.default, "default"
        try:
            value = s.parse(raw) if raw is not None else None
        except (ValueError, TypeError) as exc:
            raise ManifestError(f"{origin}:{s.name}", f"invalid value {raw!r}: {exc}") from exc
        settings.values[s.name] = value
        settings.origins[s.name] = origin
    return settings
