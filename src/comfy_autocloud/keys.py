"""Model keys ('folder/filename') and the one place that decides whether a relative path is safe.

ComfyUI allows subfolders in model names ('SDXL/juggernaut.safetensors'), so a filename may hold
forward slashes; every component is checked so no key can name a path outside the cache.
"""

from __future__ import annotations

import re

_BAD_CHARS = re.compile(r"[\x00-\x1f\x7f\\:*?\"<>|]")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(1, 10)), *(f"lpt{i}" for i in range(1, 10))}


def check_relpath(path: str, what: str = "path") -> str:
    """Return `path` if it is a safe relative POSIX path, else raise ValueError saying why."""
    if not isinstance(path, str) or not path:
        raise ValueError(f"{what} is empty")
    if "\x00" in path:
        raise ValueError(f"{what} contains a NUL byte")
    if "\\" in path:
        raise ValueError(f"{what} {path!r} contains a backslash (use '/' to separate folders)")
    if path.startswith("/") or path.startswith("~") or re.match(r"^[a-zA-Z]:", path):
        raise ValueError(f"{what} {path!r} is absolute; it must be relative to the models folder")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise ValueError(f"{what} {path!r} has an empty, '.' or '..' component")
        if _BAD_CHARS.search(part):
            raise ValueError(f"{what} {path!r} contains a control or reserved character")
        if part.startswith(".autocloud"):
            raise ValueError(f"{what} {path!r} uses the reserved name '.autocloud'")
        if part.split(".")[0].lower() in _WINDOWS_RESERVED:
            raise ValueError(f"{what} {path!r} uses a reserved device name")
        if len(part.encode()) > 255:
            raise ValueError(f"{what} {path!r} has a component longer than 255 bytes")
    return path


def check_folder(folder: str) -> str:
    """A model folder is one safe component ('checkpoints', 'loras', 'text_encoders', ...)."""
    check_relpath(folder, "folder")
    if "/" in folder:
        raise ValueError(f"folder {folder!r} must be a single name such as 'checkpoints'")
    return folder


def check_sha256(value: str) -> str:
    v = value.strip().lower()
    if v.startswith("sha256:"):
        v = v[len("sha256:"):]
    if not _SHA256_RE.match(v):
        raise ValueError(f"sha256 {value!r} is not 64 hex digits")
    return v


def make_key(folder: str, filename: str) -> str:
    return f"{check_folder(folder)}/{check_relpath(filename, 'filename')}"


def split_key(key: str) -> tuple[str, str]:
    folder, sep, filename = key.partition("/")
    if not sep:
        raise ValueError(f"key {key!r} must look like 'folder/filename'")
    return check_folder(folder), check_relpath(filename, "filename")


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
