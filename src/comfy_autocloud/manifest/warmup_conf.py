"""The warmup list `warmup_models.conf`: one `<folder>/<name-or-glob>` per line, relative to `models/`.

Glob lines only mean something to warmup (it expands them against the volume), so they are kept as
WarmupEntry; plain names also become ModelSpecs for everything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_autocloud.keys import check_folder, check_relpath
from comfy_autocloud.manifest.common import build_spec, decode_utf8, fail, read_bytes

if TYPE_CHECKING:
    from comfy_autocloud.manifest.spec import ModelSpec

_GLOB_CHARS = "*?["
_COMMENT = re.compile(r"(^|\s)#.*$")  # '#' starts a comment at line start or after whitespace


@dataclass(frozen=True)
class WarmupEntry:
    """One line of the file: `folder/pattern`, where it was (`defined_in` is 'file:line')."""

    folder: str
    pattern: str
    line: int
    defined_in: str

    @property
    def is_glob(self) -> bool:
        return any(c in self.pattern for c in _GLOB_CHARS)

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.pattern}"

    def to_spec(self) -> ModelSpec:
        """A names-only spec tagged 'warmup'; globs have no single file to name."""
        if self.is_glob:
            raise ValueError(f"{self.defined_in}: {self.key} is a glob; expand it against a folder first")
        return build_spec(self.defined_in, folder=self.folder, filename=self.pattern, tags=("warmup",))


def check_pattern(pattern: str) -> str:
    """A pattern is a safe relative path once its glob characters are ignored ('..' stays banned)."""
    check_relpath(re.sub(r"[*?]", "x", pattern), "pattern")
    if pattern.count("[") != pattern.count("]"):
        raise ValueError(f"pattern {pattern!r} has an unclosed '[' character class")
    return pattern


def parse_warmup_text(text: str, where: str) -> list[WarmupEntry]:
    """Parse the text of a warmup list; duplicate lines are kept once (the first one)."""
    entries: dict[str, WarmupEntry] = {}
    for n, raw in enumerate(text.split("\n"), start=1):
        sub = f"{where}:{n}"
        line = _COMMENT.sub("", raw.rstrip("\r")).strip()
        if not line:
            continue
        if "\x00" in line or any(c in line for c in "\r\x0b\x0c"):
            fail(sub, "line contains a NUL or control character")
        if line.startswith(("/", "~")) or re.match(r"^[A-Za-z]:", line):
            fail(sub, "path is absolute; write it relative to the models folder, e.g. 'loras/x.safetensors'")
        if "\\" in line:
            fail(sub, "path contains a backslash; separate folders with '/', e.g. 'loras/x.safetensors'")
        folder, sep, pattern = line.partition("/")
        if not sep or not pattern:
            fail(sub, "expected '<folder>/<filename or glob>', e.g. 'checkpoints/sdxl_*.safetensors'")
        try:
            if any(c in folder for c in _GLOB_CHARS):
                raise ValueError(f"folder {folder!r} may not contain glob characters")
            check_folder(folder)
            check_pattern(pattern)
        except ValueError as exc:
            fail(sub, f"{exc}; expected '<folder>/<filename or glob>' relative to the models folder")
        entry = WarmupEntry(folder=folder, pattern=pattern, line=n, defined_in=sub)
        entries.setdefault(entry.key, entry)
    return list(entries.values())


def parse_warmup_conf(path: Path) -> list[WarmupEntry]:
    """Read a warmup list (size-limited, UTF-8, LF or CRLF line ends)."""
    where = str(path)
    return parse_warmup_text(decode_utf8(read_bytes(path), where), where)


def warmup_specs(entries: list[WarmupEntry]) -> list[ModelSpec]:
    """The non-glob entries as specs (what load_manifest returns for a .conf file)."""
    return [e.to_spec() for e in entries if not e.is_glob]
