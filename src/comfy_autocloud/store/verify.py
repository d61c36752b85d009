"""Reconcile the cache directory with its index; the file system is the truth.

Finds: rows whose file is gone (dropped), files whose size (or, with rehash, sha256) no longer matches
(moved to `.autocloud/quarantine/`, row dropped, so the next use downloads a good copy), leftovers of
dead downloads (partials, `.state` files, lock files, commit temp files older than `stale_minutes`,
removed) and rows of dead processes. Files at final paths that the index does not know ("orphans")
are reported and left alone: they may be a user's own models, and deleting them is not ours to decide.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfy_autocloud.errors import StoreError
from comfy_autocloud.store.index import proc_alive
from comfy_autocloud.store.space import sha256_file

if TYPE_CHECKING:
    from comfy_autocloud.store.store import Store

# Kinds that are problems unless fixed. The others are informational: orphans are not ours to delete,
# an empty lock file of a finished download costs nothing, dead rows are already ignored by every reader.
PROBLEM_KINDS = frozenset({"missing", "size_mismatch", "sha256_mismatch", "unsafe_path", "unreadable",
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


def _flock_free(path: Path) -> bool:
    """True if nobody holds an flock on `path` (the fetch service's single-flight lock)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        return exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK)
    finally:
        os.close(fd)  # closing our own descriptor drops only our probe lock
    return True


def _quarantine(store: Store, key: str, path: Path) -> Path:
    qdir = store.private / "quarantine"
    qdir.mkdir(parents=True, exist_ok=True)
    dest = qdir / f"{int(time.time())}-{hashlib.sha1(key.encode()).hexdigest()[:12]}-{path.name}"
    os.replace(path, dest)
    return dest


def run_verify(store: Store, *, rehash: bool, fix: bool, stale_minutes: float) -> VerifyReport:
    """Compare index and disk; with `fix`, repair what can be repaired safely (see module docstring)."""
    from comfy_autocloud.store.store import PRIVATE_DIR, TMP_SUFFIX

    report = VerifyReport()
    add = report.findings.append
    index = store._index
    conn = index.conn()
    now = time.time()
    cutoff = now - stale_minutes * 60

    # Dead processes' reservations and leases.
    for table, kind in (("reservations", "dead_reservation"), ("leases", "dead_lease")):
        for row_id, key, pid, pstart in conn.execute(f"SELECT id, key, pid, pstart FROM {table}").fetchall():
            if not proc_alive(pid, pstart):
                if fix:
                    index.execute(f"DELETE FROM {table} WHERE id=?", (row_id,))
                add(Finding(kind, key, "", f"left by pid {pid}, which is no longer running", fix))

    # Index rows against files.
    rows = conn.execute("SELECT key, size, sha256, created, dev, ino FROM entries ORDER BY key").fetchall()
    known: set[str] = set()
    for key, size, sha, created, dev, ino in rows:
        report.checked += 1
        try:
            path = store.path_for(key)
        except StoreError as exc:
            if fix:
                index.execute("DELETE FROM entries WHERE key=? AND created=?", (key, created))
            reason = exc.reason + ("; row dropped, file left alone" if fix else "")
            add(Finding("unsafe_path", key, "", reason, fix))
            continue
        known.add(os.path.realpath(path))  # folder aliases (unet -> diffusion_models) name one file
        try:
            st = os.stat(path)
        except FileNotFoundError:
            if fix:
                index.execute("DELETE FROM entries WHERE key=? AND created=?", (key, created))
            add(Finding("missing", key, str(path), "indexed but the file is gone", fix))
            continue
        except OSError as exc:
            add(Finding("unreadable", key, str(path), f"cannot stat: {exc.strerror}", False))
            continue
        bad_reason = None
        kind = ""
        if st.st_size != size:
            kind, bad_reason = "size_mismatch", f"file has {st.st_size} bytes, index says {size}"
        elif rehash:
            report.rehashed += 1
            try:
                actual = sha256_file(path)
            except OSError as exc:
                add(Finding("unreadable", key, str(path), f"cannot read: {exc.strerror}", False))
                continue
            if actual != sha:
                kind, bad_reason = "sha256_mismatch", f"sha256 {actual[:16]}… != indexed {sha[:16]}…"
        if bad_reason is not None:
            fixed = False
            if fix:
                try:
                    dest = _quarantine(store, key, path)
                    bad_reason += f"; moved to {dest}"
                    index.execute("DELETE FROM entries WHERE key=? AND created=?", (key, created))
                    fixed = True
                except OSError as exc:
                    bad_reason += f"; could not quarantine: {exc.strerror}"
            add(Finding(kind, key, str(path), bad_reason, fixed))
            continue
        if ino is not None and (st.st_dev, st.st_ino) != (dev, ino):
            if fix:
                index.execute("UPDATE entries SET dev=?, ino=? WHERE key=? AND created=?",
                              (st.st_dev, st.st_ino, key, created))
            add(Finding("inode_changed", key, str(path),
                        "replaced outside the store (same size); --rehash checks its content", fix))

    # Files at final paths that the index does not know; commit temp files of crashed processes.
    for dirpath, dirnames, filenames in os.walk(store.root):
        if Path(dirpath) == store.root:
            dirnames[:] = [d for d in dirnames if d != PRIVATE_DIR]
        for name in filenames:
            p = Path(dirpath) / name
            if name.startswith(".") and name.endswith(TMP_SUFFIX):
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

    # Leftovers of dead downloads in .autocloud/partial and .autocloud/locks.
    live_names = set()
    for key, pid, pstart in conn.execute("SELECT key, pid, pstart FROM reservations").fetchall():
        if proc_alive(pid, pstart):
            with contextlib.suppress(StoreError):
                live_names.add(store.partial_path(key).name.split(".")[0])
    locks_dir = store.private / "locks"
    groups: dict[str, list[Path]] = {}
    with contextlib.suppress(FileNotFoundError):
        for d in store.partial_dirs:  # the cache disk's, and the temp dir's (a RAM disk) when set
            for p in d.iterdir():
                groups.setdefault(p.name.split(".")[0], []).append(p)
    kept: set[str] = set()  # partial groups of downloads that may still be running
    for name, files in sorted(groups.items()):
        kept.add(name)
        if name in live_names or not _flock_free(locks_dir / f"{name}.lock"):
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
            add(Finding("stale_partial", None, str(f),
                        f"left by a download that stopped {int((now - newest) // 60)} min ago", fix))
    with contextlib.suppress(FileNotFoundError):
        for lock in sorted(locks_dir.iterdir()):
            name = lock.name.split(".")[0]
            if name in kept or name in live_names:
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
            elif not _flock_free(lock):
                continue
            add(Finding("stale_lock", None, str(lock), "lock file of no running download", fixed))
    return report


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
