"""Reading untrusted manifest files safely, and turning every problem into one ManifestError.

Manifests come from users, other nodes and the network, so reading is bounded (size, nesting),
strict (UTF-8, no duplicate JSON keys, no NaN) and every message is redacted before it is raised.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from comfy_autocloud.errors import ManifestError
from comfy_autocloud.keys import check_sha256, check_source

if TYPE_CHECKING:
    from comfy_autocloud.manifest.spec import ModelSpec

# A model list is kilobytes; anything this big is a mistake or an attack.
MAX_MANIFEST_BYTES = 16 * 1024 * 1024
MAX_DEPTH = 64  # the deepest real format (UI workflow subgraphs) nests < 10 levels

WHOLE_FILE = "1"  # the `line` used for problems that concern the whole file (size, encoding of the top level)


def _printable(text: str) -> str:
    """Escape control characters so a hostile key cannot rewrite the terminal or hide in a log line."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def fail(subject: str, reason: str) -> NoReturn:
    """Raise the one error type, with secrets masked in both halves (a key may itself be a URL)."""
    from comfy_autocloud.redact import redact_text  # here: reading a list that is fine needs none

    raise ManifestError(_printable(redact_text(subject)), _printable(redact_text(reason)))


def key_path(parent: str, key: str | int) -> str:
    """Dotted path used in error subjects: 'checkpoints.x.safetensors', 'nodes[3].inputs'."""
    if isinstance(key, int):
        return f"{parent}[{key}]"
    return f"{parent}.{key}" if parent else str(key)


def at(where: str, path: str) -> str:
    return f"{where}:{path}" if path else f"{where}:{WHOLE_FILE}"


def read_bytes(path: Path) -> bytes:
    """Read at most MAX_MANIFEST_BYTES; refuse bigger files before loading them into memory."""
    where = str(path)
    try:
        if path.is_dir():
            fail(at(where, ""), "is a directory; expected a manifest file")
        size = path.stat().st_size
        if size > MAX_MANIFEST_BYTES:
            fail(at(where, ""), f"file is {size} bytes; manifests larger than {MAX_MANIFEST_BYTES} bytes "
                                "(16 MiB) are refused — split it into several files")
        with path.open("rb") as fh:
            data = fh.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        fail(at(where, ""), "no such file")
    except PermissionError:
        fail(at(where, ""), "permission denied")
    except IsADirectoryError:
        fail(at(where, ""), "is a directory; expected a manifest file")
    except OSError as exc:
        fail(at(where, ""), f"cannot read the file ({exc.strerror or type(exc).__name__})")
    if len(data) > MAX_MANIFEST_BYTES:  # grew while we looked, or a pseudo-file without a size
        fail(at(where, ""), f"manifests larger than {MAX_MANIFEST_BYTES} bytes (16 MiB) are refused")
    return data


def decode_utf8(data: bytes, where: str) -> str:
    """Strict UTF-8 (a leading BOM is tolerated: Windows editors add one)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        fail(f"{where}:{line}", f"is not valid UTF-8 (byte 0x{data[exc.start]:02x}); save the file as UTF-8")


class _Pairs(dict):
    """A JSON object that remembers keys given more than once (json keeps the last one silently)."""

    duplicates: tuple[str, ...] = ()


def _object_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = _Pairs()
    dups: list[str] = []
    for k, v in pairs:
        if k in obj and k not in dups:
            dups.append(k)
        obj[k] = v
    if dups:
        obj.duplicates = tuple(dups)
    return obj


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def parse_json_text(text: str, where: str) -> Any:
    """Parse JSON strictly and check the whole tree: duplicate keys, depth, lone surrogates."""
    try:
        data = json.loads(text, object_pairs_hook=_object_pairs, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        fail(f"{where}:{exc.lineno}", f"invalid JSON: {exc.msg} (column {exc.colno})")
    except ValueError as exc:  # NaN / Infinity
        fail(at(where, ""), f"invalid JSON: {exc}")
    except RecursionError:
        fail(at(where, ""), f"JSON is nested too deeply (more than {MAX_DEPTH} levels are refused)")
    check_tree(data, where)
    return data


def check_tree(data: Any, where: str) -> None:
    """Walk iteratively (no recursion limit to hit) and reject what no manifest format contains."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    while stack:
        obj, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            fail(at(where, path), f"nested more than {MAX_DEPTH} levels deep; no manifest format needs that")
        if isinstance(obj, dict):
            for dup in getattr(obj, "duplicates", ()):
                fail(at(where, key_path(path, dup)), "key appears more than once in the same object; "
                                                     "JSON keeps only the last one, so remove the duplicate")
            for k, v in obj.items():
                _check_str(k, where, key_path(path, k))
                stack.append((v, key_path(path, k), depth + 1))
        elif isinstance(obj, list):
            stack.extend((v, key_path(path, i), depth + 1) for i, v in enumerate(obj))
        elif isinstance(obj, str):
            _check_str(obj, where, path)


def _check_str(s: str, where: str, path: str) -> None:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        fail(at(where, path), "contains an invalid \\u escape (a lone UTF-16 surrogate); expected real text")


def load_json(path: Path) -> Any:
    where = str(path)
    return parse_json_text(decode_utf8(read_bytes(path), where), where)


def is_int(v: Any) -> bool:
    """JSON integers only: bool is an int subclass in Python but `true` is not a size."""
    return isinstance(v, int) and not isinstance(v, bool)


def check_source_at(value: Any, subject: str) -> str:
    """One source string, validated; the error names where it is, never echoing it whole."""
    if not isinstance(value, str):
        fail(subject, f"expected a URL string, got {type(value).__name__}")
    try:
        return check_source(value)
    except ValueError as exc:
        fail(subject, str(exc))


def check_sha256_at(value: Any, subject: str) -> str:
    """A sha256 as 64 hex digits (an optional 'sha256:' prefix is accepted and dropped)."""
    if not isinstance(value, str):
        fail(subject, f"expected a string of 64 hex digits, got {type(value).__name__}")
    try:
        return check_sha256(value)
    except ValueError:
        fail(subject, "sha256 must be 64 hex digits (optionally prefixed 'sha256:')")


def check_sources(values: list[Any], subject: str) -> tuple[str, ...]:
    """Validate a list of mirrors, dropping exact repeats while keeping their order."""
    out: list[str] = []
    for i, v in enumerate(values):
        src = check_source_at(v, f"{subject}[{i}]")
        if src not in out:
            out.append(src)
    return tuple(out)


def build_spec(subject: str, **fields: Any) -> ModelSpec:
    """ModelSpec(**fields), its first failed check turned into 'subject: what is wrong'."""
    from comfy_autocloud.manifest.spec import ModelSpec, SpecError  # here: a warmup rerun builds no spec

    try:
        return ModelSpec(defined_in=subject, **fields)
    except SpecError as exc:
        fail(subject, exc.first)
