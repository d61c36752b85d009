"""ModelSpec: the one record every input format (model lists, warmup lists, preload config, workflows) becomes.

Plain frozen dataclasses that check themselves with the pure checks of `comfy_autocloud.keys` when
they are made (and again by `dataclasses.replace`), so a record that exists is valid. No pydantic:
`autocloud fetch URL` builds one on its way to the first request, and pydantic's import plus schema
building cost that command 0.2-0.35 s measured from a cold page cache. The parsers of files that
need a schema (preload config) keep pydantic for those files only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from comfy_autocloud.keys import check_folder, check_relpath, check_sha256, check_source, make_key


class SpecError(ValueError):
    """Every field of a record that failed its check, as (field, reason) pairs in field order."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = tuple(problems)
        super().__init__("; ".join(_say(f, r) for f, r in self.problems))

    @property
    def first(self) -> str:
        """The first problem, prefixed with its field unless the reason names it already."""
        return _say(*self.problems[0])


def _say(field: str, reason: str) -> str:
    return f"{field}: {reason}" if field and field not in reason else reason


Check = Callable[[Any], Any]  # value -> the value to store (coerced), or ValueError saying why not


def _text(check: Callable[[str], str] | None = None) -> Check:
    def run(value: Any) -> Any:
        if not isinstance(value, str):
            raise ValueError("Input should be a valid string")
        return check(value) if check is not None else value
    return run


def _tuple_of(kind: type, check: Callable[[Any], Any] | None = None) -> Check:
    """A list or tuple of `kind`, each item checked, stored as a tuple (records are immutable and hashable)."""
    def run(value: Any) -> tuple[Any, ...]:
        if not isinstance(value, (tuple, list)):
            raise ValueError("Input should be a valid tuple")
        for i, item in enumerate(value):
            if not isinstance(item, kind):
                raise ValueError(f"item {i}: Input should be {_expected(kind)}")
        return tuple(check(v) for v in value) if check is not None else tuple(value)
    return run


def _expected(kind: type) -> str:
    return "a valid string" if kind is str else f"an instance of {kind.__name__}"


def _optional(check: Check) -> Check:
    return lambda value: None if value is None else check(value)


def _size(value: Any) -> int:
    if not isinstance(value, int) or isinstance(value, bool):  # `true` is not a size
        raise ValueError("Input should be a valid integer")
    if value < 0:
        raise ValueError("Input should be greater than or equal to 0")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("Input should be a valid boolean")
    return value


def _mapping(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError("Input should be a valid dictionary")
    return value


def _instance(kind: type) -> Check:
    def run(value: Any) -> Any:
        if not isinstance(value, kind):
            raise ValueError(f"Input should be {_expected(kind)}")
        return value
    return run


def _key(value: str) -> str:
    """A 'folder/filename' cache key."""
    folder, _, filename = value.partition("/")
    return make_key(folder, filename)


def _check_fields(record: object, checks: Sequence[tuple[str, Check]]) -> None:
    """Run each field's check, store what it returns; raise one SpecError naming every failed field."""
    problems: list[tuple[str, str]] = []
    for name, check in checks:
        try:
            object.__setattr__(record, name, check(getattr(record, name)))
        except ValueError as exc:
            problems.append((name, str(exc)))
    if problems:
        raise SpecError(problems)


@dataclass(frozen=True, slots=True, kw_only=True)
class BundleMember:
    """One model inside a zip bundle: where it is in the zip and where it lands in the cache."""

    member: str  # path inside the zip
    key: str  # folder/filename in the cache
    sha256: str | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        _check_fields(self, _MEMBER_CHECKS)


@dataclass(frozen=True, slots=True, kw_only=True)
class Bundle:
    """A zip bundle: several models in one zip download (e.g. five LoRAs of one style).

    `name` ('loras/style-pack.zip') names the download for locking and progress; the zip itself is not
    kept. Members are verified by their own sha256, else by the zip's, so one of the two must be given.
    """

    name: str
    sha256: str | None = None
    size: int | None = None
    members: tuple[BundleMember, ...]

    def __post_init__(self) -> None:
        _check_fields(self, _BUNDLE_CHECKS)
        if not self.members:
            raise SpecError([("", "a bundle needs at least one member")])
        for what, values in (("zip member", [m.member for m in self.members]),
                             ("target", [m.key for m in self.members])):
            dup = {v for v in values if values.count(v) > 1}
            if dup:
                raise SpecError([("", f"{what} {sorted(dup)[0]!r} is listed twice")])
        if self.sha256 is None and any(m.sha256 is None for m in self.members):
            raise SpecError([("", "give the zip's sha256, or a sha256 for every member, so the members can be "
                                  "verified")])


@dataclass(frozen=True, slots=True, kw_only=True)
class ModelSpec:
    """A model file the cache should be able to produce at `<cache>/<folder>/<filename>`."""

    folder: str
    filename: str
    sources: tuple[str, ...] = ()
    sha256: str | None = None
    size: int | None = None
    pin: bool = False
    preload: dict[str, Any] | None = None  # memory-preload loader options (kind, clip type, dtype...)
    tags: tuple[str, ...] = ()
    defined_in: str = ""  # 'file:line' or 'file:key' where this entry came from, for error messages
    bundle: Bundle | None = None  # set when this file arrives inside a zip (sources are the zip's)

    def __post_init__(self) -> None:
        _check_fields(self, _SPEC_CHECKS)

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.filename}"


_SHA256 = _optional(_text(check_sha256))
_MEMBER_CHECKS: tuple[tuple[str, Check], ...] = (
    ("member", _text(lambda v: check_relpath(v, "zip member"))),
    ("key", _text(_key)),
    ("sha256", _SHA256),
    ("size", _optional(_size)),
)
_BUNDLE_CHECKS: tuple[tuple[str, Check], ...] = (
    ("name", _text(_key)),
    ("sha256", _SHA256),
    ("size", _optional(_size)),
    ("members", _tuple_of(BundleMember)),
)
_SPEC_CHECKS: tuple[tuple[str, Check], ...] = (
    ("folder", _text(check_folder)),
    ("filename", _text(lambda v: check_relpath(v, "filename"))),
    ("sources", _tuple_of(str, check_source)),
    ("sha256", _SHA256),
    ("size", _optional(_size)),
    ("pin", _flag),
    ("preload", _optional(_mapping)),
    ("tags", _tuple_of(str)),
    ("defined_in", _text()),
    ("bundle", _optional(_instance(Bundle))),
)
