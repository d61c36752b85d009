"""The rerun memo: proof, kept beside the store, that a warmup rerun has nothing to copy.

Proving it through the store means opening the SQLite index: the library, its modules and the index
pages, read from disk on a rerun after a reboot or a dropped page cache (about a quarter of such a
rerun, measured). A warmup in which every listed file ended up current writes down what that proof
rested on, and the next rerun checks exactly that, with a few stats:

- the plan: each listed file's key, volume path, size + mtime (its identity, the entry's etag) and
  list line. The rerun builds its plan from the list and the volume as always, so an edited list, a
  changed volume file or a new file a glob selects makes the plans differ;
- each cached copy's inode, size, mtime and ctime: a copy evicted, replaced (a fetch, a recopy) or
  quarantined no longer matches, as a new file has a new ctime whatever inode it gets;
- the index generation (store/generation.py): any commit to the index since (an eviction, a fetch,
  a settle, an access another process recorded) changes it;
- the boot, while one of the copies is not yet known to be on disk (committed unsettled): after a
  reboot the store reads such a file back before trusting it, so the memo is not trusted then.

Anything that differs or cannot be read means "not proven", and the rerun goes through the store as
before. The memo is written only when the generation did not move while it was taken (so no commit
slipped between the stats and the lookups it records). A rerun that trusts it owes the eviction
policy its accesses (`Store.touch`, what a rerun through the store records); a detached process
records them (`touch_and_save`) and then writes the memo again for the index as it now is.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfy_autocloud.fsutil import boot_id, write_atomic
from comfy_autocloud.store.generation import index_generation
from comfy_autocloud.warmup.copier import FileOutcome, current
from comfy_autocloud.warmup.plan import Plan

if TYPE_CHECKING:
    from comfy_autocloud.store import Store

MEMO_NAME = "rerun.memo"
VERSION = 1


def _plan_rows(plan: Plan) -> list[list[Any]]:
    return [[i.key, str(i.source), i.identity, i.line] for i in plan.items]


def _file_id(st: os.stat_result) -> list[int]:
    return [st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def save(state_dir: Path, store: Store, plan: Plan) -> bool:
    """Write the memo if every planned file is cached as it is on the volume now; False if not written.

    Reads the index (lookups, no access recorded) between two readings of its generation, and writes
    nothing unless both are the same token.
    """
    if not plan.items or plan.missing:  # a line that selects nothing is reported by every run
        discard(state_dir)
        return False
    generation = index_generation(store.root)
    if generation is None:
        discard(state_dir)
        return False
    files = []
    keys = set()
    for item in plan.items:
        path = store.path_for(item.key)
        try:
            st = os.stat(path)
        except OSError:
            discard(state_dir)
            return False
        entry = store.lookup(item.key)
        if entry is None or entry.etag != item.identity or entry.size != st.st_size:
            discard(state_dir)
            return False
        files.append({"path": str(path), "file": _file_id(st), "size": entry.size, "source": entry.source})
        keys.add(item.key)
    unsettled = any(key in keys for key, _created, _boot in store.unsettled())
    if index_generation(store.root) != generation:
        discard(state_dir)
        return False
    data = {"version": VERSION, "cache": str(store.root), "models": str(plan.models_dir),
            "generation": generation, "boot": boot_id() if unsettled else None,
            "plan": _plan_rows(plan), "files": files}
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(state_dir / MEMO_NAME, json.dumps(data), durable=False)  # lost in a crash: one slower rerun
    except OSError:
        return False
    return True


def load(state_dir: Path, cache: Path, plan: Plan) -> list[tuple[FileOutcome, Path]] | None:
    """Each planned file's 'cached' outcome and cached copy if the memo proves them current now, else None."""
    try:
        data = json.loads((state_dir / MEMO_NAME).read_bytes())
        if (not isinstance(data, dict) or data.get("version") != VERSION or data["cache"] != str(cache)
                or data["models"] != str(plan.models_dir) or plan.missing or not plan.items):
            return None
        if data["boot"] is not None and data["boot"] != boot_id():
            return None
        if index_generation(cache) != data["generation"] or data["plan"] != _plan_rows(plan):
            return None
        files = data["files"]
        if len(files) != len(plan.items):
            return None
        for f in files:  # after the generation: a copy removed before that reading is already gone here
            if _file_id(os.stat(f["path"])) != f["file"]:
                return None
        return [(FileOutcome(item.key, "cached", int(f["size"]), 0, 0.0, str(f["source"]), line=item.line),
                 Path(f["path"])) for item, f in zip(plan.items, files, strict=True)]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def discard(state_dir: Path) -> None:
    try:
        os.unlink(state_dir / MEMO_NAME)
    except FileNotFoundError:
        pass


def touch_and_save(state_dir: Path, store: Store, plan: Plan) -> bool:
    """After a rerun the memo proved: record each file's access as a rerun through the store does
    (`current`: a lookup, then `Store.touch`), then write the memo again for the index as it now is.
    A file no longer current drops the memo (the next rerun goes through the store and copies it)."""
    if not all([current(store, item, None) is not None for item in plan.items]):
        discard(state_dir)
        return False
    return save(state_dir, store, plan)
