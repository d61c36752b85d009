"""Reconcile the cache directory with its index; the file system is the truth.

Finds: rows whose file is gone (dropped), files whose size (or, with rehash, sha256) no longer matches
or whose content is not what the name says (store.content_check, as on commit) (moved to
`.autocloud/quarantine/`, row dropped, so the next use downloads a good copy), leftovers of dead
downloads (partials, `.state` files, lock files, commit temp files older than `stale_minutes`,
removed) and rows of dead processes. Files at final paths that the index does not know ("orphans")
are reported and left alone: they may be a user's own models, and deleting them is not ours to decide.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfy_autocloud.errors import StoreError
from comfy_autocloud.fsutil import sha256_of
from comfy_autocloud.store.content_check import content_problem
from comfy_autocloud.store.index import proc_alive
from comfy_autocloud.store.layout import LOCKS_DIR, PRIVATE_DIR, QUARANTINE_DIR, group_name, is_commit_temp
from comfy_autocloud.store.partials import flock_free

if TYPE_CHECKING:
    from comfy_autocloud.store.store import Store

# Kinds that are problems unless fixed. The others are informational: orphans are not ours to delete,
# an empty lock file of a finished download costs nothing, dead rows are already ignored by every reader.
PROBLEM_KINDS = frozenset({"missing", "size_mismatch", "sha256_mismatch", "unverifiable", "bad_content", "unsafe_path",
                           "unreadable",
                           "stale_partial", "stale_temp"})


@dataclass(frozen=True)
class Finding:
    kind: str
    key: str | None
    path: str
    reason: str
    fixed: bool

    @property
    def problem(self) -> bool:
        return self.kind in PROBLEM_KINDS and not self.fixed

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "problem": self.problem}


@dataclass
class VerifyReport:
    checked: int = 0
    rehashed: int = 0
    findings: list[Finding] = field(default_factory=list)

    @property
    def problems(self) -> list[Finding]:
        """Findings still wrong after this run (what makes `autocloud verify` exit 1)."""
        return [f for f in self.findings if f.problem]

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        return {"checked": self.checked, "rehashed": self.rehashed, "ok": self.ok,
                "problems": len(self.problems), "findings": [f.as_dict() for f in self.findings]}


def quarantine(store: Store, key: str, path: Path) -> Path:
    """Move a bad file out of ComfyUI's sight into the private quarantine dir (kept for a look)."""
    qdir = store.private / QUARANTINE_DIR
    qdir.mkdir(parents=True, exist_ok=True)
    import hashlib  # here: opening a store for a copy or a cache hit should not load OpenSSL

    dest = qdir / f"{int(time.time())}-{hashlib.sha1(key.encode()).hexdigest()[:12]}-{path.name}"
    os.replace(path, dest)
    return dest


def run_verify(store: Store, *, rehash: bool, fix: bool, stale_minutes: float) -> VerifyReport:
    """Compare index and disk; with `fix`, repair what can be repaired safely (see module docstring)."""
    report = VerifyReport()
    now = time.time()
    cutoff = now - stale_minutes * 60
    _check_process_rows(store, report, fix)
    known = _check_entries(store, report, rehash=rehash, fix=fix)
    _check_final_paths(store, report, known, cutoff, fix)
    kept, live = _check_partials(store, report, now, cutoff, fix)
    _check_locks(store, report, kept | live, cutoff, fix)
    return report


def _check_process_rows(store: Store, report: VerifyReport, fix: bool) -> None:
    """Reservations and leases of processes that are no longer running."""
    index = store._index
    for table, kind in (("reservations", "dead_reservation"), ("leases", "dead_lease")):
        for row_id, key, _n, pid, pstart in index.process_rows(table):
            if not proc_alive(pid, pstart):
                if fix:
                    index.drop_process_row(table, row_id)
                report.findings.append(Finding(kind, key, "", f"left by pid {pid}, which is no longer running", fix))


def _check_entries(store: Store, report: VerifyReport, *, rehash: bool, fix: bool) -> set[str]:
    """Every row against its file (size, with `rehash` the sha256, the inode); returns the real paths checked."""
    index = store._index
    add = report.findings.append
    known: set[str] = set()
    ended = store.unsettled_by_ended_boots()  # committed without fsync before the machine went down: read back
    for r in index.entry_rows():
        key, size, sha, created, dev, ino = r[0], r[3], r[4], r[8], r[13], r[14]
        unsettled = (key, created) in ended
        report.checked += 1
        try:
            path = store.path_for(key)
        except StoreError as exc:
            if fix:
                index.drop_entry(key, created)
            reason = exc.reason + ("; row dropped, file left alone" if fix else "")
            add(Finding("unsafe_path", key, "", reason, fix))
            continue
        known.add(os.path.realpath(path))  # folder aliases (unet -> diffusion_models) name one file
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if fix:
                index.drop_entry(key, created)
            add(Finding("missing", key, str(path), "indexed but the file is gone", fix))
            continue
        except OSError as exc:
            add(Finding("unreadable", key, str(path), f"cannot stat: {exc.strerror}", False))
            continue
        bad_reason = None
        kind = ""
        if st.st_size != size:
            kind, bad_reason = "size_mismatch", f"file has {st.st_size} bytes, index says {size}"
        elif not sha and unsettled:
            kind, bad_reason = "unverifiable", ("copied to be hashed later, and the machine went down before "
                                                "it was hashed or flushed: nothing to check it against")
        elif rehash or unsettled or not sha:  # not sha: committed to be hashed later (a warmup copy)
            report.rehashed += 1
            try:
                actual = sha256_of(path)
            except OSError as exc:
                add(Finding("unreadable", key, str(path), f"cannot read: {exc.strerror}", False))
                continue
            if not sha:
                if fix:
                    index.set_sha256(key, created, st.st_ino, actual)
            elif actual != sha:
                kind, bad_reason = "sha256_mismatch", f"sha256 {actual[:16]}… != indexed {sha[:16]}…" + (
                    " (written just before the machine went down)" if unsettled else "")
            elif unsettled and fix:
                index.settle(key)  # its bytes are on disk after all
        if bad_reason is None:  # the same format checks as a commit (an HTML page named .safetensors...)
            try:
                problem = content_problem(path, path.name)
            except OSError as exc:
                add(Finding("unreadable", key, str(path), f"cannot read: {exc.strerror}", False))
                continue
            if problem is not None:
                kind, bad_reason = "bad_content", f"holds {problem}"
        if bad_reason is not None:
            fixed = False
            if fix:
                try:
                    dest = quarantine(store, key, path)
                    bad_reason += f"; moved to {dest}"
                    index.drop_entry(key, created)
                    if unsettled:
                        index.settle(key)
                    fixed = True
                except OSError as exc:
                    bad_reason += f"; could not quarantine: {exc.strerror}"
            add(Finding(kind, key, str(path), bad_reason, fixed))
            continue
        if ino is not None and (st.st_dev, st.st_ino) != (dev, ino):
            if fix:
                index.set_identity(key, created, st.st_dev, st.st_ino)
            add(Finding("inode_changed", key, str(path),
                        "replaced outside the store (same size); --rehash checks its content", fix))
    return known


def _check_final_paths(store: Store, report: VerifyReport, known: set[str], cutoff: float, fix: bool) -> None:
    """Files at final paths that the index does not know; commit temp files of crashed processes."""
    add = report.findings.append
    for dirpath, dirnames, filenames in os.walk(store.root):
        if Path(dirpath) == store.root:
            dirnames[:] = [d for d in dirnames if d != PRIVATE_DIR]
        for name in filenames:
            p = Path(dirpath) / name
            if is_commit_temp(name):
                with contextlib.suppress(OSError):
                    if p.lstat().st_mtime < cutoff:
                        if fix:
                            p.unlink()
                        add(Finding("stale_temp", None, str(p), "temp file of an interrupted commit", fix))
                continue
            if os.path.realpath(p) not in known:
                rel = p.relative_to(store.root).as_posix()
                add(Finding("orphan", rel if "/" in rel else None, str(p),
                            "file not in the index (not counted against the cap); left in place", False))


def _check_partials(store: Store, report: VerifyReport, now: float, cutoff: float,
                    fix: bool) -> tuple[set[str], set[str]]:
    """Leftovers of dead downloads in the partial dirs; returns (groups kept, groups of live reservations)."""
    live: set[str] = set()
    for _i, key, _n in store._index.live_reservations():
        with contextlib.suppress(StoreError):
            live.add(group_name(store.partial_path(key).name))
    locks_dir = store.private / LOCKS_DIR
    groups: dict[str, list[Path]] = {}
    with contextlib.suppress(FileNotFoundError):
        for d in store.partial_dirs:  # the cache disk's, and the temp dir's (a RAM disk) when set
            for p in d.iterdir():
                groups.setdefault(group_name(p.name), []).append(p)
    kept: set[str] = set()  # partial groups of downloads that may still be running
    for name, files in sorted(groups.items()):
        kept.add(name)
        if name in live or not flock_free(locks_dir / f"{name}.lock"):
            continue
        try:
            newest = max(f.lstat().st_mtime for f in files)
        except OSError:
            continue
        if newest >= cutoff:
            continue
        kept.discard(name)
        for f in files:
            if fix:
                with contextlib.suppress(FileNotFoundError):
                    f.unlink()
            report.findings.append(Finding("stale_partial", None, str(f),
                                           f"left by a download that stopped {int((now - newest) // 60)} min ago",
                                           fix))
    return kept, live


def _check_locks(store: Store, report: VerifyReport, busy: set[str], cutoff: float, fix: bool) -> None:
    """Lock files of no running download (older than the cutoff, not held, no partial kept)."""
    with contextlib.suppress(FileNotFoundError):
        for lock in sorted((store.private / LOCKS_DIR).iterdir()):
            if group_name(lock.name) in busy:
                continue
            try:
                if lock.lstat().st_mtime >= cutoff:
                    continue
            except OSError:
                continue
            fixed = False
            if fix:
                fixed = _remove_lock_if_free(lock)
                if not fixed:
                    continue
            elif not flock_free(lock):
                continue
            report.findings.append(Finding("stale_lock", None, str(lock), "lock file of no running download", fixed))


def _remove_lock_if_free(lock: Path) -> bool:
    """Unlink a lock file while holding its flock, so no current holder loses it."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return False
        with contextlib.suppress(FileNotFoundError):
            os.unlink(lock)
        return True
    finally:
        os.close(fd)
