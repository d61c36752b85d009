"""ModelSpec: the one record every input format (model lists, warmup lists, preload config, workflows) becomes."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from comfy_autocloud.keys import check_folder, check_relpath, check_sha256, check_source, make_key


# Schemes the source layer understands; anything else is rejected while parsing, naming the entry.
def _check_key(value: str) -> str:
    folder, _, filename = value.partition("/")
    return make_key(folder, filename)


# Field types shared by every model here: a normalised sha256, and a 'folder/filename' cache key.
Sha256 = Annotated[str, AfterValidator(check_sha256)]
Key = Annotated[str, AfterValidator(_check_key)]


class BundleMember(BaseModel):
    """One model inside a zip bundle: where it is in the zip and where it lands in the cache."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    member: str  # path inside the zip
    key: Key  # folder/filename in the cache
    sha256: Sha256 | None = None
    size: int | None = Field(default=None, ge=0)

    @field_validator("member")
    @classmethod
    def _member(cls, v: str) -> str:
        return check_relpath(v, "zip member")


class Bundle(BaseModel):
    """A zip bundle: several models in one zip download (e.g. five LoRAs of one style).

    `name` ('loras/style-pack.zip') names the download for locking and progress; the zip itself is not
    kept. Members are verified by their own sha256, else by the zip's, so one of the two must be given.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: Key
    sha256: Sha256 | None = None
    size: int | None = Field(default=None, ge=0)
    members: tuple[BundleMember, ...]

    @model_validator(mode="after")
    def _check(self) -> Bundle:
        if not self.members:
            raise ValueError("a bundle needs at least one member")
        for what, values in (("zip member", [m.member for m in self.members]),
                             ("target", [m.key for m in self.members])):
            dup = {v for v in values if values.count(v) > 1}
            if dup:
                raise ValueError(f"{what} {sorted(dup)[0]!r} is listed twice")
        if self.sha256 is None and any(m.sha256 is None for m in self.members):
            raise ValueError("give the zip's sha256, or a sha256 for every member, so the members can be verified")
        return self


class ModelSpec(BaseModel):
    """A model file the cache should be able to produce at `<cache>/<folder>/<filename>`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    folder: str
    filename: str
    sources: tuple[str, ...] = ()
    sha256: Sha256 | None = None
    size: int | None = Field(default=None, ge=0)
    pin: bool = False
    preload: dict[str, Any] | None = None  # memory-preload loader options (kind, clip type, dtype...)
    tags: tuple[str, ...] = ()
    defined_in: str = ""  # 'file:line' or 'file:key' where this entry came from, for error messages
    bundle: Bundle | None = None  # set when this file arrives inside a zip (sources are the zip's)

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

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.filename}"
