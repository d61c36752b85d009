"""Model lists (the JSON format every node reads): `{folder: {filename: url}}`, one file or split into several.

The short form (a URL string) is what users of these lists already have; the object form adds what a
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
from comfy_autocloud.manifest.spec import Bundle, BundleMember, ModelSpec, SpecError

ENTRY_KEYS = ("url", "urls", "sha256", "size", "pin", "tags", "bundle")
MEMBER_KEYS = ("to", "sha256", "size")


def parse_model_list(data: Any, where: str) -> list[ModelSpec]:
    """Turn a parsed model-list document into specs; `where` is the file name used in errors."""
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
            sub = at(where, key_path(folder, filename))
            if isinstance(value, dict) and "bundle" in value:
                specs += _bundle(folder, filename, value, sub)
            else:
                specs.append(_entry(folder, filename, value, sub))
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


def _bundle(folder: str, filename: str, value: dict[str, Any], sub: str) -> list[ModelSpec]:
    """A zip of several models: `{"url": zip, "sha256": zip's, "bundle": {member: "folder/file" | {to, sha256,
    size}}}` becomes one spec per member (each offered by name; fetching any one extracts them all)."""
    zip_spec = _entry(folder, filename, {k: v for k, v in value.items() if k != "bundle"}, sub)
    raw = value["bundle"]
    bsub = f"{sub}.bundle"
    if not isinstance(raw, dict) or not raw:
        fail(bsub, 'expected a non-empty object {"member/in/zip": "folder/filename"}')
    members: list[BundleMember] = []
    for member, target in raw.items():
        msub = f"{bsub}.{member}"
        fields: dict[str, Any] = {"member": member}
        if isinstance(target, str):
            fields["key"] = target
        elif isinstance(target, dict):
            for k in target:
                if k not in MEMBER_KEYS:
                    fail(f"{msub}.{k}", f"unknown key {k!r}; a bundle member may have: {', '.join(MEMBER_KEYS)}")
            if not isinstance(target.get("to"), str):
                fail(msub, "missing 'to' (the folder/filename the member is stored as)")
            fields["key"] = target["to"]
            if "sha256" in target:
                fields["sha256"] = check_sha256_at(target["sha256"], f"{msub}.sha256")
            if "size" in target:
                if not is_int(target["size"]) or target["size"] < 0:
                    fail(f"{msub}.size", "expected the member's exact size in bytes")
                fields["size"] = target["size"]
        else:
            fail(msub, 'expected "folder/filename" or {"to": "folder/filename", "sha256": ..., "size": ...}')
        try:
            members.append(BundleMember(**fields))
        except SpecError as exc:
            fail(msub, exc.problems[0][1])
    try:
        bundle = Bundle(name=zip_spec.key, sha256=zip_spec.sha256, size=zip_spec.size, members=tuple(members))
    except SpecError as exc:
        fail(bsub, exc.problems[0][1])
    out = []
    for m in bundle.members:
        mfolder, _, mname = m.key.partition("/")
        out.append(build_spec(f"{bsub}.{m.member}", folder=mfolder, filename=mname, sources=zip_spec.sources,
                              sha256=m.sha256, size=m.size, pin=zip_spec.pin, tags=zip_spec.tags, bundle=bundle))
    return out


def check_tags(tags: Any, sub: str) -> tuple[str, ...]:
    if not isinstance(tags, list) or not all(isinstance(t, str) and t.strip() for t in tags):
        fail(sub, "expected a list of non-empty strings")
    if any(not c.isprintable() for t in tags for c in t):
        fail(sub, "tags must be printable text without control characters")
    return tuple(dict.fromkeys(t.strip() for t in tags))


def _kind(v: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")
