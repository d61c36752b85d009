"""Settings for the adapter: environment > ComfyUI's `user/autocloud.yaml` > global config > defaults.

Keeping a config file in ComfyUI's user directory lets a template or volume carry its own manifest and
cache settings without touching the environment of the pod.
"""

from __future__ import annotations

from pathlib import Path

from comfy_autocloud.config import Settings, load_settings

CONFIG_NAME = "autocloud.yaml"


def config_path(user_dir: str | Path | None) -> Path | None:
    return Path(user_dir) / CONFIG_NAME if user_dir else None


def load_comfy_settings(user_dir: str | Path | None, env: dict[str, str] | None = None) -> Settings:
    """Resolve settings; manifest paths written relative in autocloud.yaml are relative to that file."""
    path = config_path(user_dir)
    settings = load_settings(env=env, extra_config=path if path is not None and path.is_file() else None)
    if path is not None and settings.origins.get("manifest") == str(path):
        base = path.parent
        settings.values["manifest"] = tuple(
            m if m.lower().startswith(("http://", "https://")) or Path(m).expanduser().is_absolute()
            else str(base / m) for m in settings.values["manifest"])
    return settings
