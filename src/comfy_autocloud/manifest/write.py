"""Writing model lists: add verified entries without ever leaving a half-written file.

`autocloud manifest add` and `manifest from-s3` end here. The file is read with the same strict
parser as every manifest (so a broken file is reported, not overwritten), changed in memory, then
written to a temporary file in the same directory, fsynced and renamed over the original; a lock on
the directory serialises concurrent writers. Existing entries keep their form and order; the document is
written with two-space indentation and a trailing newline, so repeated adds give stable diffs.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from comfy_autocloud.fsutil import write_atomic
from comfy_autocloud.manifest.common import at, fail, key_path, load_json
from comfy_autocloud.manifest.model_list import parse_model_list
from comfy_autocloud.manifest.spec import ModelSpec

Action = Literal["added", "unchanged", "merged"]


@dataclass(frozen=True)
class WriteOutcome:
    key: str
    action: Action  # added: new entry; merged: new mirrors or a missing sha256/size filled in; unchanged


def entry_value(spec: ModelSpec) -> str | dict[str, Any]:
    """The model-list form of one spec: the short URL string when nothing else is known, else an object."""
    if len(spec.sources) == 1 and spec.sha256 is None and spec.size is None and not spec.pin and not spec.tags:
        return spec.sources[0]
    out: dict[str, Any] = {}
    if len(spec.sources) == 1:
        out["url"] = spec.sources[0]
    else:
        out["urls"] = list(spec.sources)
    if spec.sha256 is not None:
        out["sha256"] = spec.sha256
    if spec.size is not None:
        out["size"] = spec.size
    if spec.pin:
        out["pin"] = True
    if spec.tags:
        out["tags"] = list(spec.tags)
    return out


def render(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def document(specs: Sequence[ModelSpec]) -> dict[str, Any]:
    """A fresh model-list document holding `specs` (the entries must not repeat a key)."""
    doc: dict[str, Any] = {}
    _apply(doc, specs, "<new manifest>")
    return doc


def _merge(old: ModelSpec, new: ModelSpec, where: str) -> ModelSpec | None:
    """The entry that holds both, None when they agree already; a contradiction is an error."""
    sub = at(where, key_path(old.folder, old.filename))
    if old.bundle is not None:
        fail(sub, f"is a member of the zip bundle {old.bundle.name}; edit that entry instead")
    if old.sha256 and new.sha256 and old.sha256 != new.sha256:
        fail(sub, f"already listed with sha256 {old.sha256}, the new entry has {new.sha256}; refusing to "
                  "overwrite it (remove or rename the existing entry first)")
    if old.size is not None and new.size is not None and old.size != new.size:
        fail(sub, f"already listed with size {old.size}, the new entry has {new.size}; refusing to overwrite it")
    same_hash = old.sha256 is not None and old.sha256 == new.sha256
    if not same_hash and not set(old.sources) & set(new.sources):
        fail(sub, "already listed from other sources, and without a common sha256 the new sources cannot be "
                  "shown to serve the same file; refusing to overwrite it")
    sources = tuple(dict.fromkeys((*old.sources, *new.sources)))
    merged = replace(old, sources=sources, sha256=old.sha256 or new.sha256,
                     size=old.size if old.size is not None else new.size)
    if (merged.sources, merged.sha256, merged.size) == (old.sources, old.sha256, old.size):
        return None
    return merged


def _apply(doc: dict[str, Any], specs: Sequence[ModelSpec], where: str) -> list[WriteOutcome]:
    existing = {s.key: s for s in parse_model_list(doc, where)} if doc else {}
    outcomes: list[WriteOutcome] = []
    for spec in specs:
        old = existing.get(spec.key)
        if old is None:
            folder = doc.setdefault(spec.folder, {})
            folder[spec.filename] = entry_value(spec)
            existing[spec.key] = spec
            outcomes.append(WriteOutcome(spec.key, "added"))
            continue
        merged = _merge(old, spec, where)
        if merged is None:
            outcomes.append(WriteOutcome(spec.key, "unchanged"))
            continue
        value = entry_value(merged)
        prior = doc[spec.folder][spec.filename]
        if isinstance(prior, dict) and isinstance(value, dict):  # keep keys this writer does not manage
            value = {**prior, **value}
            if "urls" in value and "url" in prior:
                value.pop("url")
        doc[spec.folder][spec.filename] = value
        existing[spec.key] = merged
        outcomes.append(WriteOutcome(spec.key, "merged"))
    parse_model_list(doc, where)  # what is written must read back
    return outcomes


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """flock on the directory: the file itself is replaced by rename, so it cannot carry the lock."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def add_entries(path: Path, specs: Sequence[ModelSpec]) -> list[WriteOutcome]:
    """Add `specs` to the model-list file at `path` (created if missing): all of them, or none on a conflict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    where = str(path)
    with _locked(path):
        doc: Any = load_json(path) if path.exists() else {}
        if not isinstance(doc, dict):
            fail(at(where, ""), "is not a model list ({folder: {filename: url}}); refusing to change it")
        doc = json.loads(json.dumps(doc))  # plain dicts (the strict reader's subclass) in the same order
        outcomes = _apply(doc, specs, where)
        if any(o.action != "unchanged" for o in outcomes) or not path.exists():
            write_atomic(path, render(doc))
    return outcomes


__all__ = ["WriteOutcome", "add_entries", "document", "entry_value", "render", "write_atomic"]
