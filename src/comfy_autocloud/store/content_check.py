"""Is a file what its name says? Format checks that run before a commit and in `verify`.

Most lists give no sha256 or size, so the bytes an origin sends are the only evidence: an HTML error
page, a JSON error body, a Git LFS pointer or a file cut short would otherwise be cached and served as
a hit until ComfyUI fails to load it (`header too large`, `incomplete metadata`). Each known model
format is checked for what loaders read first: its magic, header and the extent its header claims
(safetensors: tensor offsets cover the file exactly; GGUF: tensor data within the file; ONNX: the
protobuf's top-level fields end at the end of the file; zips: the central directory). Files of other
formats pass. Only headers are read (at most a few MB), never the tensor data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from comfy_autocloud.errors import BadContent
from comfy_autocloud.units import human_size

SAFETENSORS_MAX_HEADER = 100_000_000  # the limit safetensors itself enforces
GGUF_MAX_COUNT = 1 << 24              # tensors or metadata entries; real files have thousands
_SNIFF = 4096
LFS_POINTER = b"version https://git-lfs.github.com/spec/"

# safetensors dtype -> bytes per element (sub-byte and unknown dtypes: extent checks only)
_ST_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                   "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8, "C64": 8}
# ggml tensor type -> (elements per block, bytes per block), as the gguf package lists them
_GGML_BLOCKS = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 9: (32, 40),
                10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210), 15: (256, 292),
                16: (256, 66), 17: (256, 74), 18: (256, 98), 19: (256, 50), 20: (32, 18), 21: (256, 110),
                22: (256, 82), 23: (256, 136), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8),
                29: (256, 56), 30: (1, 2), 34: (256, 54), 35: (256, 66), 39: (32, 17), 40: (64, 36), 41: (128, 18)}
# GGUF metadata value type -> fixed size (8: string, 9: array)
_GGUF_SCALAR = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


class _Bad(Exception):
    """The file is not a valid instance of its format; the message says how."""


def _read_exact(f: BinaryIO, n: int, what: str) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise _Bad(f"ends inside its {what} (the download was cut short?)")
    return data


def _check_safetensors(f: BinaryIO, size: int) -> None:
    if size < 8:
        raise _Bad(f"has {size} bytes, less than a safetensors header length")
    (n,) = struct.unpack("<Q", _read_exact(f, 8, "header length"))
    if n > SAFETENSORS_MAX_HEADER:
        raise _Bad(f"announces a {human_size(n)} header (header too large: not a safetensors file)")
    if n > size - 8:
        raise _Bad(f"announces a {n}-byte header but has only {size - 8} bytes after the length "
                   "(cut short?)")
    try:
        header = json.loads(_read_exact(f, n, "header"))
    except (UnicodeDecodeError, ValueError):
        raise _Bad("has a header that is not JSON") from None
    if not isinstance(header, dict):
        raise _Bad("has a header that is not a JSON object")
    extents: list[tuple[int, int, str]] = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(x) is int for x in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise _Bad(f"has no valid data_offsets for tensor {name[:80]!r}")
        shape, dtype = info.get("shape"), info.get("dtype")
        if isinstance(shape, list) and all(type(x) is int and x >= 0 for x in shape) and dtype in _ST_DTYPE_BYTES:
            want = math.prod(shape) * _ST_DTYPE_BYTES[dtype]
            if want != offsets[1] - offsets[0]:
                raise _Bad(f"gives tensor {name[:80]!r} {offsets[1] - offsets[0]} bytes, its shape and dtype "
                           f"need {want}")
        extents.append((offsets[0], offsets[1], name))
    data = size - 8 - n
    pos = 0
    for begin, end, name in sorted(extents):
        if begin != pos:
            raise _Bad(f"has tensor data that does not follow on at tensor {name[:80]!r} (offset {begin}, "
                       f"expected {pos})")
        pos = end
    if pos != data:
        if pos > data:
            raise _Bad(f"is truncated: its header maps {pos} bytes of tensor data, the file has {data} "
                       "(the download was cut short?)")
        raise _Bad(f"has {data - pos} bytes after the last tensor its header maps")


def _gguf_string(f: BinaryIO, size: int) -> None:
    (n,) = struct.unpack("<Q", _read_exact(f, 8, "metadata"))
    if n > size:
        raise _Bad("has a metadata string longer than the file")
    f.seek(n, os.SEEK_CUR)


def _gguf_value(f: BinaryIO, vtype: int, size: int, depth: int = 0) -> None:
    if vtype in _GGUF_SCALAR:
        _read_exact(f, _GGUF_SCALAR[vtype], "metadata")
    elif vtype == 8:
        _gguf_string(f, size)
    elif vtype == 9 and depth < 4:
        etype, count = struct.unpack("<IQ", _read_exact(f, 12, "metadata"))
        if etype in _GGUF_SCALAR:
            if count * _GGUF_SCALAR[etype] > size:
                raise _Bad("has a metadata array longer than the file")
            f.seek(count * _GGUF_SCALAR[etype], os.SEEK_CUR)
        else:
            if count > size:
                raise _Bad("has a metadata array longer than the file")
            for _ in range(count):
                _gguf_value(f, etype, size, depth + 1)
    else:
        raise _Bad(f"has a metadata value of unknown type {vtype}")


def _check_gguf(f: BinaryIO, size: int) -> None:
    head = _read_exact(f, 8, "header")
    if head[:4] != b"GGUF":
        raise _Bad("does not start with the GGUF magic")
    (version,) = struct.unpack("<I", head[4:])
    if version not in (2, 3):
        raise _Bad(f"has GGUF version {version} (known: 2, 3)")
    n_tensors, n_kv = struct.unpack("<QQ", _read_exact(f, 16, "header"))
    if n_tensors > GGUF_MAX_COUNT or n_kv > GGUF_MAX_COUNT:
        raise _Bad(f"announces {n_tensors} tensors and {n_kv} metadata entries (not a GGUF file?)")
    alignment = 32
    for _ in range(n_kv):
        (klen,) = struct.unpack("<Q", _read_exact(f, 8, "metadata"))
        if klen > 65535:
            raise _Bad("has a metadata key longer than 64 KiB")
        key = _read_exact(f, klen, "metadata")
        (vtype,) = struct.unpack("<I", _read_exact(f, 4, "metadata"))
        if key == b"general.alignment" and vtype == 4:
            (alignment,) = struct.unpack("<I", _read_exact(f, 4, "metadata"))
            if alignment == 0 or alignment & (alignment - 1):
                raise _Bad(f"has general.alignment {alignment}, not a power of two")
        else:
            _gguf_value(f, vtype, size)
    tensors: list[tuple[int, int | None, str]] = []
    for _ in range(n_tensors):
        (nlen,) = struct.unpack("<Q", _read_exact(f, 8, "tensor infos"))
        if nlen > 65535:
            raise _Bad("has a tensor name longer than 64 KiB")
        name = _read_exact(f, nlen, "tensor infos").decode("utf-8", "replace")
        (n_dims,) = struct.unpack("<I", _read_exact(f, 4, "tensor infos"))
        if n_dims > 8:
            raise _Bad(f"gives tensor {name[:80]!r} {n_dims} dimensions")
        dims = struct.unpack(f"<{n_dims}Q", _read_exact(f, 8 * n_dims, "tensor infos"))
        ttype, offset = struct.unpack("<IQ", _read_exact(f, 12, "tensor infos"))
        block = _GGML_BLOCKS.get(ttype)
        nbytes = None if block is None else math.prod(dims) // block[0] * block[1]
        tensors.append((offset, nbytes, name))
    start = -(-f.tell() // alignment) * alignment
    data = size - start
    if data < 0:
        raise _Bad("ends before its tensor data begins (the download was cut short?)")
    for offset, nbytes, name in tensors:
        end = offset + (nbytes or 0)
        if offset > data or end > data:
            raise _Bad(f"is truncated: tensor {name[:80]!r} ends at byte {start + end}, the file has {size} "
                       "(the download was cut short?)")


def _check_torch(f: BinaryIO, size: int) -> None:
    head = f.read(8)
    if head[:4] == b"PK\x03\x04":
        _check_zip(f, size)
    elif not (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5):
        raise _Bad("is neither a zip (torch.save) nor a pickle")


def _check_zip(f: BinaryIO, size: int) -> None:
    import zipfile  # only for zip-shaped files (.ckpt/.pt, .zip)

    f.seek(0)
    try:
        with zipfile.ZipFile(f) as z:
            infos = z.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _Bad(f"is not a complete zip archive ({exc}; cut short?)") from None
    for info in infos:
        if info.header_offset + info.compress_size > size:
            raise _Bad(f"is truncated: member {info.filename[:80]!r} lies past the end of the file")


def _varint(f: BinaryIO) -> int:
    value = shift = 0
    while shift < 70:
        b = f.read(1)
        if not b:
            raise _Bad("ends inside a protobuf field (the download was cut short?)")
        value |= (b[0] & 0x7F) << shift
        if not b[0] & 0x80:
            return value
        shift += 7
    raise _Bad("has a malformed protobuf varint")


def _check_onnx(f: BinaryIO, size: int) -> None:
    """ModelProto's top-level fields must be well-formed, end exactly at the end of the file and include a graph."""
    seen: set[int] = set()
    for _ in range(10_000):
        if f.tell() == size:
            break
        tag = _varint(f)
        field, wire = tag >> 3, tag & 7
        if field == 0 or field > 64:
            raise _Bad(f"has top-level protobuf field {field}, not an ONNX model")
        if wire == 0:
            _varint(f)
        elif wire == 2:
            n = _varint(f)
            if f.tell() + n > size:
                raise _Bad(f"is truncated: field {field} needs {n} bytes, {size - f.tell()} are left "
                           "(the download was cut short?)")
            f.seek(n, os.SEEK_CUR)
        elif wire in (1, 5):
            _read_exact(f, 8 if wire == 1 else 4, "protobuf field")
        else:
            raise _Bad(f"has protobuf wire type {wire}, not an ONNX model")
        seen.add(field)
    else:
        raise _Bad("has more than 10000 top-level protobuf fields, not an ONNX model")
    if 7 not in seen:
        raise _Bad("has no graph (not an ONNX model)")


def _magic(*prefixes: bytes, offset: int = 0) -> Callable[[BinaryIO, int], None]:
    def check(f: BinaryIO, size: int) -> None:
        f.seek(offset)
        head = f.read(max(len(p) for p in prefixes))
        if not any(head.startswith(p) for p in prefixes):
            raise _Bad("does not start with its format's magic bytes")
    return check


# suffix -> (format name, check)
FORMATS: dict[str, tuple[str, Callable[[BinaryIO, int], None]]] = {
    ".safetensors": ("safetensors", _check_safetensors),
    ".sft": ("safetensors", _check_safetensors),
    ".gguf": ("GGUF", _check_gguf),
    ".ckpt": ("PyTorch checkpoint", _check_torch),
    ".pt": ("PyTorch checkpoint", _check_torch),
    ".pth": ("PyTorch checkpoint", _check_torch),
    ".onnx": ("ONNX", _check_onnx),
    ".zip": ("zip", _check_zip),
    ".tar": ("tar", _magic(b"ustar", offset=257)),
    ".gz": ("gzip", _magic(b"\x1f\x8b")),
    ".tgz": ("gzip", _magic(b"\x1f\x8b")),
    ".bz2": ("bzip2", _magic(b"BZh")),
    ".xz": ("xz", _magic(b"\xfd7zXZ\x00")),
    ".7z": ("7z", _magic(b"7z\xbc\xaf\x27\x1c")),
}


def format_of(filename: str) -> str | None:
    """The format a file name promises, if it is one this module checks."""
    entry = FORMATS.get(os.path.splitext(filename.lower())[1])
    return entry[0] if entry else None


def describe(head: bytes, size: int, content_type: str | None = None) -> str | None:
    """What an origin sent instead of a model, when the first bytes say so ("an HTML page (text/html,
    105 bytes)"); None when they look like binary data of some other kind."""
    ctype = (content_type or "").split(";")[0].strip().lower()
    where = f"({ctype + ', ' if ctype else ''}{size} bytes)"
    if size == 0:
        return f"an empty body {where}"
    if head.startswith(LFS_POINTER):
        return f"a Git LFS pointer {where}"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")) or b"<html" in text[:1024] \
            or ctype in ("text/html", "application/xhtml+xml"):
        return f"an HTML page {where}"
    if text.startswith(b"<?xml") or ctype.endswith("/xml"):
        return f"an XML document {where}"
    if text[:1] in (b"{", b"[") and (ctype.endswith("json") or b'"' in text[:64]):
        return f"a JSON document {where}"
    if ctype.startswith("text/") or all(32 <= c < 127 or c in (9, 10, 13) for c in head[:512]):
        return f"a text document {where}"
    return None


def content_problem(path: Path | str, filename: str, content_type: str | None = None) -> str | None:
    """What `path` holds when it is not the kind of file `filename` names, or None when it is (or the format
    is not one checked here). Reads after "<source> sent ...": "an HTML page (text/html, 105 bytes), not a
    safetensors file", "a broken GGUF file: it is truncated: ...". `content_type`: what the origin said.
    """
    entry = FORMATS.get(os.path.splitext(filename.lower())[1])
    if entry is None:
        return None
    name, check = entry
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        head = f.read(_SNIFF)
        f.seek(0)
        try:
            check(f, size)
        except _Bad as exc:
            what = describe(head, size, content_type)
            a = "an" if name[0].lower() in "aeiox" else "a"
            if what is None:
                return f"a broken {name} file: it {exc}"
            if head.startswith(LFS_POINTER):
                return f"{what}, not {a} {name} file: the URL serves the pointer, not the file"
            return f"{what}, not {a} {name} file"
        except (struct.error, OverflowError, MemoryError) as exc:
            return f"a broken {name} file: its header cannot be read ({type(exc).__name__})"
    return None


def check_before_commit(key: str, part: Path, filename: str, source: str, content_type: str | None) -> None:
    """BadContent (the partial deleted: those bytes can never become the file) when `part` is not a `filename`."""
    problem = content_problem(part, filename, content_type)
    if problem is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)
        raise BadContent(key, f"{source} sent {problem}; nothing was cached")
