"""ModelSpec: the one record every input format (seed JSON, warmup, preload config, workflows) becomes."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from comfy_autocloud.keys import check_folder, check_relpath, check_sha256

# Schemes the source layer understands; anything else is rejected while parsing, naming the entry.
KNOWN_SCHEMES = ("http://", "https://", "file://", "hf://", "s3://", "civitai:")


def check_source(src: str) -> str:
    if not isinstance(src, str) or not src.strip():
        raise ValueError("source is empty")
    s = src.strip()
    if any(c in s for c in ("\x00", "\n", "\r", "\t", " ")):
        raise ValueError("source contains whitespace or control characters")
    if not s.lower().startswith(KNOWN_SCHEMES):
        scheme = s.split(":", 1)[0] if ":" in s else s
        raise ValueError(f"unsupported source scheme {scheme!r} (known: {', '.join(KNOWN_SCHEMES)})")
    return s


class ModelSpec(BaseModel):
    """A model file the cache should be able to produce at `<cache>/<folder>/<filename>`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    folder: str
    filename: str
    sources: tuple[str, ...] = ()
    sha256: str | None = None
    size: int | None = Field(default=None, ge=0)
    pin: bool = False
    preload: dict[str, Any] | None = None  # seed 000 loader options (kind, clip type, dtype...)
    tags: tuple[str, ...] = ()
    defined_in: str = ""  # 'file:line' or 'file:key' where this entry came from, for error messages

    @field_validator("folder")
    @classmethod
    def _folder(cls, v: str) -> str:
        return check_folder(v)

    @field_validator("filename")
    @classmethod
    def _filename(cls, v: str) -> str:
        return check_relpath(v, "filename")

    @field_validator("sources")
    @classmethod
    def _sources(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_source(s) for s in v)

    @field_validator("sha256")
    @classmethod
    def _sha(cls, v: str | None) -> str | None:
        return None if v is None else check_sha256(v)

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.filename}"
