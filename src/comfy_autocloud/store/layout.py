"""Where the store keeps things on disk: one place for the names the store, `verify` and the CLI share.

    <root>/<folder>/<filename>                      final files (what ComfyUI reads)
    <root>/<folder>/.<filename>.<random>.actmp      a commit in progress (hardlink or cross-disk copy)
    <root>/.autocloud/index.sqlite                  the index
    <root>/.autocloud/partial/<name>.part           a download in progress (+ .state, .live records)
    <root>/.autocloud/locks/<name>.lock             its single-flight lock
    <root>/.autocloud/quarantine/                   files `verify` found damaged
    <root>/.autocloud/policy-state.json             what the adaptive eviction policy learned (policy_state)
    <temp_dir>/autocloud-partial-<cache id>/        partials on a RAM disk, when a temp dir is set

`<name>` is a hash of the key, so every file of one download shares the prefix `group_name` returns.
"""

from __future__ import annotations

from pathlib import Path

PRIVATE_DIR = ".autocloud"
PARTIAL_DIR = "partial"
LOCKS_DIR = "locks"
QUARANTINE_DIR = "quarantine"
INDEX_NAME = "index.sqlite"
POLICY_STATE_NAME = "policy-state.json"
SETTLE_LOCK = "settle.lock"  # one deferred-durability flush waiting per cache (store/settle.py)
HASH_LATER_LOCK = "hash_later.lock"  # one background hasher of warmup's first copies per cache (warmup/hash_later.py)
TMP_SUFFIX = ".actmp"
TEMP_RESERVE = 4 * 2**20  # left free on the temp dir after a partial is chosen to live there (state files)


def key_name(key: str) -> str:
    """The file-system name of a (validated) key's partial and lock files."""
    import hashlib  # here: reading the layout (a warmup rerun's memo) needs no OpenSSL

    return hashlib.sha1(key.encode()).hexdigest()[:20]


def group_name(filename: str) -> str:
    """The key name a partial, state, live-record or lock file belongs to."""
    return filename.split(".")[0]


def commit_temp(final: Path) -> Path:
    """A hidden temp name beside `final` for a commit in progress (renamed onto `final` when complete)."""
    import uuid

    return final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"


def is_commit_temp(filename: str) -> bool:
    return filename.startswith(".") and filename.endswith(TMP_SUFFIX)


def temp_partial_dir(temp_dir: Path, root_real: Path) -> Path:
    """`<temp_dir>/autocloud-partial-<cache id>`: caches sharing one RAM disk never mix partials."""
    import hashlib

    cache_id = hashlib.sha1(str(root_real).encode()).hexdigest()[:12]
    return temp_dir / f"autocloud-partial-{cache_id}"
