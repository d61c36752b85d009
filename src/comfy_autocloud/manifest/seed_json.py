"""Seed 004 model lists: `{folder: {filename: url}}`, one file or split into several.

The short form (a URL string) is what the seed's users already have; the object form adds what a
verified cache needs (mirrors, sha256, size, pin, tags) without inventing a second file format.
"""

from __future__ import annotations

from typing import Any

from comfy_autocloud.keys import check_folder
from comfy_autocloud.manifest.common import (
    at,
    build_spec,
    check_sha256_at,
    check_source_at,
    check_sources,
    fail,
    is_int,
    key_path,
)
from comfy_autocloud.manifest.spec import ModelSpec

ENTRY_KEYS = ("url", "urls", "sha256", "size", "pin", "tags")


def parse_seed_json(data: Any, where: str) -> list[ModelSpec]:
    """Turn a parsed seed-004 document into specs; `where` is the file name used in errors."""
    if not isinstance(data, dict):
        fail(at(where, ""), f"expected a JSON object {{folder: {{filename: url}}}}, got {_kind(data)}")
    specs: list[ModelSpec] = []
    for folder, files in data.items():
        fsub = at(where, folder)
        try:
            check_folder(folder)
        except ValueError as exc:
            fail(fsub, f"{exc} (a model folder such as 'checkpoints', 'loras', 'vae')")
        if not isinstance(files, dict):
            fail(fsub, f"expected an object mapping filenames to URLs, got {_kind(files)}")
        if not files:
            fail(fsub, "folder has no entries; remove it or list at least one filename")
        for filename, value in files.items():
            specs.append(_entry(folder, filename, value, at(where, key_path(folder, filename))))
    return specs


def _entry(folder: str, filename: str, value: Any, sub: str) -> ModelSpec:
    if isinstance(value, str):
        return build_spec(sub, folder=folder, filename=filename, sources=(check_source_at(value, sub),))
    if not isinstance(value, dict):
        fail(sub, f"expected a URL string or an object with 'url' or 'urls', got {_kind(value)}")
    for k in value:
        if k not in ENTRY_KEYS:
            fail(f"{sub}.{k}", f"unknown key {k!r}; an entry may have: {', '.join(ENTRY_KEYS)}")
    if ("url" in value) == ("urls" in value):
        fail(sub, "give exactly one of 'url' (a string) or 'urls' (a list of mirrors)")
    if "url" in value:
        sources = (check_source_at(value["url"], f"{sub}.url"),)
    else:
        urls = value["urls"]
        if not isinstance(urls, list) or not urls:
            fail(f"{sub}.urls", "expected a non-empty list of URL strings")
        sources = check_sources(urls, f"{sub}.urls")
    fields: dict[str, Any] = {"folder": folder, "filename": filename, "sources": sources}
    if "sha256" in value:
        fields["sha256"] = check_sha256_at(value["sha256"], f"{sub}.sha256")
    if "size" in value:
        if not is_int(value["size"]) or value["size"] < 0:
            fail(f"{sub}.size", "expected the exact file size as a non-negative integer number of bytes")
        fields["size"] = value["size"]
    if "pin" in value:
        if not isinstance(value["pin"], bool):
            fail(f"{sub}.pin", "expected true or false")
        fields["pin"] = value["pin"]
    if "tags" in value:
        fields["tags"] = check_tags(value["tags"], f"{sub}.tags")
    return build_spec(sub, **fields)


def check_tags(tags: Any, sub: str) -> tuple[str, ...]:
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
        fail(sub, "expected a list of non-empty strings")
    if any(not c.isprintable() for t in tags for c in t):
        fail(sub, "tags must be printable text without control characters")
    return tuple(dict.fromkeys(t.strip() for t in tags))


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")
