"""The local model cache: files at `<root>/<folder>/<filename>` (what ComfyUI reads) plus a SQLite index.

Rules kept here: a file reaches its final path only by an atomic rename (or hardlink + rename) of
complete, verified bytes; room is made *before* a download (reserve), never by deleting pinned or in-use
files; identical content is stored once (hardlinks); the file system is the truth and the index follows
it (`lookup` drops rows of vanished files, `verify` reconciles everything else).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from comfy_autocloud.errors import IntegrityError, NotEnoughSpace, StoreError
from comfy_autocloud.fsutil import fsync_dir, fsync_file
from comfy_autocloud.keys import check_sha256, split_key
from comfy_autocloud.store.eviction import Item, Policy, bytes_freed, get_policy, select_victims
from comfy_autocloud.store.index import Index, proc_alive, self_proc
from comfy_autocloud.store.space import allocated, disk_space, sha256_file
from comfy_autocloud.units import human_size

if TYPE_CHECKING:
    from comfy_autocloud.store.verify import VerifyReport

PRIVATE_DIR = ".autocloud"
TMP_SUFFIX = ".actmp"
ACCESS_LOG_MAX = 50_000  # rows kept in the access log (a few MB); trimmed every ACCESS_LOG_TRIM inserts
ACCESS_LOG_TRIM = 1_000
ACCESS_LOG_MAX_DEFAULT = ACCESS_LOG_MAX
TEMP_RESERVE = 4 * 2**20  # left free on the temp dir after a partial is chosen to live there (state files)

log = logging.getLogger(__name__)

_COLS = ("key, folder, filename, size, sha256, source, etag, last_modified, created, last_access, hits, "
         "pinned, priority, dev, ino")
_CLOCK_SQL = "COALESCE((SELECT CAST(value AS REAL) FROM meta WHERE name='clock'), 0.0)"


@dataclass(frozen=True)
class Entry:
    """One cached file as the index knows it; `source` is already redacted."""

    key: str
    folder: str
    filename: str
    path: Path
    size: int
    sha256: str
    source: str
    etag: str | None
    last_modified: str | None
    created: float
    last_access: float
    hits: int
    pinned: bool
    in_use: bool

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        return d


@dataclass(frozen=True)
class Usage:
    entries: int
    bytes: int  # unique bytes on disk: hardlinked twins counted once
    logical_bytes: int
    reserved_bytes: int
    cap: int | None
    disk_free: int
    disk_total: int

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Row:
    entry: Entry
    priority: float
    dev: int | None
    ino: int | None

    def item(self, protect: frozenset[str] = frozenset()) -> Item:
        e = self.entry
        return Item(key=e.key, size=e.size, last_access=e.last_access, hits=e.hits, created=e.created,
                    pinned=e.pinned, in_use=e.in_use or e.key in protect, priority=self.priority,
                    group=(self.dev, self.ino) if self.ino is not None else None)


class Reservation:
    """Room promised to one download until commit or release; visible to every process sharing the index."""

    def __init__(self, store: Store, key: str, nbytes: int, row_id: int, evicted: list[Entry]) -> None:
        self.store = store
        self.key = key
        self.nbytes = nbytes
        self.id = row_id
        self.evicted = evicted
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.store._index.execute("DELETE FROM reservations WHERE id=?", (self.id,))

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _unique_bytes(items: Iterable[Item]) -> int:
    seen: set[object] = set()
    total = 0
    for it in items:
        if it.group is None:
            total += it.size
        elif it.group not in seen:
            seen.add(it.group)
            total += it.size
    return total


def _on_dev(item: Item, dev: int) -> bool:
    """Whether evicting `item` frees space on device `dev` (unknown device: assume it does)."""
    return not isinstance(item.group, tuple) or item.group[0] == dev


class Store:
    """A size-capped, multi-process-safe cache of model files (see module docstring for the rules)."""

    def __init__(
        self,
        root: Path | str,
        *,
        max_size: int | None = None,
        policy: str = "default",
        high_watermark: float = 0.95,
        low_watermark: float = 0.85,
        min_free_disk: int = 256 * 2**20,
        temp_dir: Path | str | None = None,
    ) -> None:
        if not 0 < low_watermark <= high_watermark <= 1:
            raise StoreError(str(root), f"watermarks must satisfy 0 < low ({low_watermark}) <= high "
                                        f"({high_watermark}) <= 1")
        if max_size is not None and max_size < 0:
            raise StoreError(str(root), f"max_size must not be negative: {max_size}")
        try:
            self.policy: Policy = get_policy(policy)
        except ValueError as exc:
            raise StoreError(str(root), str(exc)) from None
        self.root = Path(root).expanduser().absolute()
        self.max_size = max_size
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.min_free_disk = min_free_disk
        self.private = self.root / PRIVATE_DIR
        for sub in ("partial", "locks", "quarantine"):
            (self.private / sub).mkdir(parents=True, exist_ok=True)
        self._root_real = self.root.resolve()
        self._private_real = self.private.resolve()
        self.temp_dir = self._open_temp_dir(temp_dir)
        self._index = Index(self.private / "index.sqlite", {"ac_priority": (4, self.policy.priority)})
        self._sync_policy()

    # ----------------------------------------------------------------- paths
    def path_for(self, key: str) -> Path:
        """Final path of `key`; StoreError for hostile keys and for folders that lead outside the cache."""
        try:
            folder, filename = split_key(key)
        except ValueError as exc:
            raise StoreError(repr(key), str(exc)) from None
        path = self.root / folder / filename
        real = path.resolve()
        if not real.is_relative_to(self._root_real):
            raise StoreError(key, f"resolves to {real}, outside the cache {self._root_real} "
                                  "(a symlinked folder?)")
        if real.is_relative_to(self._private_real):
            raise StoreError(key, "resolves into the store's private directory")
        return path

    def _key_name(self, key: str) -> str:
        try:
            split_key(key)
        except ValueError as exc:
            raise StoreError(repr(key), str(exc)) from None
        return hashlib.sha1(key.encode()).hexdigest()[:20]

    def _open_temp_dir(self, temp_dir: Path | str | None) -> Path | None:
        """`<temp_dir>/autocloud-partial-<cache id>`: caches sharing one RAM disk never mix partials."""
        if temp_dir is None or str(temp_dir) == "":
            return None
        cache_id = hashlib.sha1(str(self._root_real).encode()).hexdigest()[:12]
        path = Path(temp_dir).expanduser().absolute() / f"autocloud-partial-{cache_id}"
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log.warning("autocloud: temp dir %s unusable (%s); partial files stay on the cache disk", path,
                        exc.strerror)
            return None
        return path

    @property
    def partial_dirs(self) -> list[Path]:
        """Where partial files may be: the cache disk's `.autocloud/partial`, and the temp dir if set."""
        return [self.private / "partial", *([self.temp_dir] if self.temp_dir is not None else [])]

    def partial_path(self, key: str, size: int | None = None, *, disk: bool = False) -> Path:
        """Where `key`'s partial download lives; with a temp dir (a tmpfs), there when it has room.

        An existing partial (in either place) is always the answer, so a download resumes where it was.
        A new download of known `size` goes to the temp dir if that leaves TEMP_RESERVE free there, else
        to the cache disk (so does `disk=True`, and an unknown size, which cannot be promised to fit).
        The choice is made sticky by creating the empty file, so every later call agrees with it.
        """
        name = f"{self._key_name(key)}.part"
        on_disk = self.private / "partial" / name
        if self.temp_dir is None:
            return on_disk
        in_ram = self.temp_dir / name
        for p in ((on_disk,) if disk else (in_ram, on_disk)):
            if p.exists() or p.with_name(p.name + ".state").exists():
                return p
        if disk or size is None:
            return on_disk
        try:
            free, total, _dev = disk_space(self.temp_dir)
        except OSError:
            return on_disk
        if free - size < max(TEMP_RESERVE, total // 50):
            log.info("autocloud: %s (%s) does not fit in the temp dir (%s free); using the cache disk", key,
                     human_size(size), human_size(free))
            return on_disk
        try:
            os.close(os.open(in_ram, os.O_WRONLY | os.O_CREAT, 0o644))
        except OSError:
            return on_disk
        return in_ram

    def in_temp_dir(self, path: Path) -> bool:
        return self.temp_dir is not None and Path(path).parent == self.temp_dir

    def lock_path(self, key: str) -> Path:
        return self.private / "locks" / f"{self._key_name(key)}.lock"

    # ----------------------------------------------------------------- reads
    def _row(self, r: sqlite3.Row | tuple[Any, ...], live: set[str] | bool) -> _Row:
        (key, folder, filename, size, sha, source, etag, lm, created, last_access, hits, pinned, prio,
         dev, ino) = r[:15]
        in_use = live if isinstance(live, bool) else key in live
        e = Entry(key=key, folder=folder, filename=filename, path=self.root / folder / filename, size=size,
                  sha256=sha, source=source, etag=etag, last_modified=lm, created=created,
                  last_access=last_access, hits=hits, pinned=bool(pinned), in_use=in_use)
        return _Row(e, prio, dev, ino)

    @staticmethod
    def _live_leases(conn: sqlite3.Connection) -> set[str]:
        rows = conn.execute("SELECT key, pid, pstart FROM leases").fetchall()
        return {k for k, pid, ps in rows if proc_alive(pid, ps)}

    @staticmethod
    def _live_reservations(conn: sqlite3.Connection) -> list[tuple[int, str, int]]:
        rows = conn.execute("SELECT id, key, nbytes, pid, pstart FROM reservations").fetchall()
        return [(i, k, n) for i, k, n, pid, ps in rows if proc_alive(pid, ps)]

    def _load(self, conn: sqlite3.Connection) -> list[_Row]:
        live = self._live_leases(conn)
        return [self._row(r, live) for r in conn.execute(f"SELECT {_COLS} FROM entries ORDER BY key")]

    def lookup(self, key: str) -> Entry | None:
        """The entry if its file is present with the recorded size; drops the row if the file is gone."""
        path = self.path_for(key)
        conn = self._index.conn()
        r = conn.execute(
            f"SELECT {_COLS}, (SELECT group_concat(pid || ':' || pstart, ',') FROM leases l "
            f"WHERE l.key = e.key) FROM entries e WHERE key=?", (key,)).fetchone()
        if r is None:
            return None
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._index.execute("DELETE FROM entries WHERE key=? AND created=?", (key, r[8]))
            return None
        if st.st_size != r[3]:
            return None
        leases = r[15]
        in_use = False
        if leases:
            for token in leases.split(","):
                pid, _, ps = token.partition(":")
                if proc_alive(int(pid), ps):
                    in_use = True
                    break
        return self._row(r, in_use).entry

    def touch(self, key: str) -> None:
        """Record one access (last_access, hits, policy priority, a row of the access log); no-op if not cached."""
        now = time.time()
        with self._index.write() as c:
            cur = c.execute(
                f"UPDATE entries SET last_access=?1, hits=hits+1, "
                f"priority=ac_priority(size, hits+1, ?1, {_CLOCK_SQL}) WHERE key=?2", (now, key))
            if cur.rowcount:
                self._log_access(c, now, key)

    @staticmethod
    def _log_access(c: sqlite3.Connection, now: float, key: str) -> None:
        """The history predictive preloading learns from: one row per access, the newest ACCESS_LOG_MAX kept."""
        cur = c.execute("INSERT INTO access_log(ts, key, size) SELECT ?, key, size FROM entries WHERE key=?",
                        (now, key))
        row_id = int(cur.lastrowid or 0)
        if row_id and row_id % ACCESS_LOG_TRIM == 0:
            c.execute("DELETE FROM access_log WHERE id <= ?", (row_id - ACCESS_LOG_MAX,))

    def access_history(self, limit: int = ACCESS_LOG_MAX_DEFAULT) -> list[tuple[float, str, int]]:
        """The newest `limit` accesses as (timestamp, key, size), oldest first."""
        rows = self._index.conn().execute(
            "SELECT ts, key, size FROM access_log ORDER BY id DESC LIMIT ?", (max(0, limit),)).fetchall()
        return [(float(ts), str(k), int(n)) for ts, k, n in reversed(rows)]

    def last_access_id(self) -> int:
        """Grows with every recorded access: a cheap 'anything new?' for watchers."""
        row = self._index.conn().execute("SELECT MAX(id) FROM access_log").fetchone()
        return int(row[0] or 0)

    def _find_sha(self, sha: str, exclude: str | None = None) -> _Row | None:
        conn = self._index.conn()
        for r in conn.execute(f"SELECT {_COLS} FROM entries WHERE sha256=? ORDER BY created", (sha,)):
            row = self._row(r, False)
            if row.entry.key == exclude:
                continue
            try:
                st = os.stat(self.path_for(row.entry.key))
            except (OSError, StoreError):
                continue
            if st.st_size == row.entry.size:
                return row
        return None

    def find_by_sha256(self, sha256: str) -> Entry | None:
        """Any cached entry with this content whose file is present (for dedupe and renamed models)."""
        try:
            sha = check_sha256(sha256)
        except ValueError as exc:
            raise StoreError(repr(sha256), str(exc)) from None
        row = self._find_sha(sha)
        return row.entry if row else None

    def entries(self) -> list[Entry]:
        return [r.entry for r in self._load(self._index.conn())]

    def usage(self) -> Usage:
        conn = self._index.conn()
        rows = self._load(conn)
        items = [r.item() for r in rows]
        reserved = sum(n for _i, _k, n in self._live_reservations(conn))
        free, total, _dev = disk_space(self.root)
        return Usage(entries=len(rows), bytes=_unique_bytes(items), logical_bytes=sum(i.size for i in items),
                     reserved_bytes=reserved, cap=self.max_size, disk_free=free, disk_total=total)

    # ----------------------------------------------------------------- policy state
    def _clock(self, conn: sqlite3.Connection) -> float:
        row = conn.execute("SELECT value FROM meta WHERE name='clock'").fetchone()
        return float(row[0]) if row else 0.0

    def _sync_policy(self) -> None:
        """Re-rank every entry when the cache was last used with another policy (priorities differ)."""
        if self._index.get_meta("policy") == self.policy.name:
            return
        with self._index.write() as c:
            if self._index.get_meta("policy") == self.policy.name:
                return
            c.execute(f"UPDATE entries SET priority=ac_priority(size, hits, last_access, {_CLOCK_SQL})")
            c.execute("INSERT OR REPLACE INTO meta(name, value) VALUES('policy', ?)", (self.policy.name,))

    def _reap(self, conn: sqlite3.Connection) -> None:
        """Forget reservations and leases of processes that died without releasing them."""
        for table in ("reservations", "leases"):
            dead = [(i,) for i, pid, ps in conn.execute(f"SELECT id, pid, pstart FROM {table}")
                    if not proc_alive(pid, ps)]
            if dead:
                conn.executemany(f"DELETE FROM {table} WHERE id=?", dead)

    def _remove(self, conn: sqlite3.Connection, rows: list[_Row], *, policy_eviction: bool) -> list[Entry]:
        """Unlink files then drop rows (inside the caller's transaction); a crash leaves rows that
        `lookup` heals, never files the index forgot."""
        removed: list[Entry] = []
        for row in rows:
            e = row.entry
            try:
                path = self.path_for(e.key)
            except StoreError:
                path = None
            if path is not None:
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
                except OSError:
                    continue
            conn.execute("DELETE FROM entries WHERE key=?", (e.key,))
            removed.append(e)
        if policy_eviction and removed:
            gone = {e.key for e in removed}
            evicted = [r.item() for r in rows if r.entry.key in gone]
            clock = self.policy.clock_after(self._clock(conn), evicted)
            conn.execute("INSERT OR REPLACE INTO meta(name, value) VALUES('clock', ?)", (repr(clock),))
        return removed

    # ----------------------------------------------------------------- making room
    def reserve(self, key: str, nbytes: int) -> Reservation:
        """Make room for a download of `nbytes` before it starts, or raise NotEnoughSpace saying why."""
        final = self.path_for(key)
        if nbytes < 0:
            raise StoreError(key, f"cannot reserve a negative size ({nbytes})")
        with self._index.write() as c:
            self._reap(c)
            rows = self._load(c)
            by_key = {r.entry.key: r for r in rows}
            live_res = self._live_reservations(c)
            protect = frozenset({key, *(k for _i, k, _n in live_res)})
            items = [r.item(protect) for r in rows]
            used = _unique_bytes(items)
            old = by_key.get(key)
            old_unique = 0
            if old is not None and bytes_freed([old.item()], items) == old.entry.size:
                old_unique = old.entry.size  # replaced (not kept) once the new version commits
            others = sum(n for _i, _k, n in live_res)
            all_free = select_victims(self.policy, items, 2**62)
            freeable = bytes_freed(all_free, items)

            victims: list[Item] = []
            if self.max_size is not None:
                need_cap = used - old_unique + others + nbytes - self.max_size
                if need_cap > 0:
                    victims = select_victims(self.policy, items, need_cap)
                    if bytes_freed(victims, items) < need_cap:
                        held = used - freeable
                        msg = (f"needs {human_size(nbytes)}, cap {human_size(self.max_size)}, "
                               f"{human_size(held)} held by pinned/in-use files")
                        if others:
                            msg += f", {human_size(others)} reserved by downloads in progress"
                        raise NotEnoughSpace(key, msg)

            for dev, need, free, where, outstanding, keep in self._disk_needs(key, final, nbytes, live_res):
                freed_dev = bytes_freed([it for it in victims if _on_dev(it, dev)], items)
                short = need + outstanding + keep - free - freed_dev
                if need <= 0 or short <= 0:
                    continue
                chosen = {v.key for v in victims}
                rest = [it for it in items if it.key not in chosen and _on_dev(it, dev)]
                more = select_victims(self.policy, rest, short)
                more_freed = bytes_freed(more, rest)
                if more_freed < short:
                    msg = (f"needs {human_size(need)} + {human_size(keep)} kept free, disk has "
                           f"{human_size(free)} free at {where}")
                    if outstanding:
                        msg += f", {human_size(outstanding)} promised to downloads in progress"
                    msg += (f"; evicting every unpinned, unused file would free only "
                            f"{human_size(freed_dev + more_freed)}")
                    raise NotEnoughSpace(key, msg)
                victims += more

            evicted = self._remove(c, [by_key[v.key] for v in victims], policy_eviction=True)
            pid, pstart = self_proc()
            cur = c.execute("INSERT INTO reservations(key, nbytes, pid, pstart, created) VALUES(?,?,?,?,?)",
                            (key, nbytes, pid, pstart, time.time()))
            row_id = int(cur.lastrowid or 0)
        return Reservation(self, key, nbytes, row_id, evicted)

    def _disk_needs(self, key: str, final: Path, nbytes: int, live_res: list[tuple[int, str, int]]
                    ) -> list[tuple[int, int, int, Path, int, int]]:
        """(device, bytes still to write, free, where, promised to others, bytes kept free) per filesystem.

        The partial file grows in `.autocloud/partial` or the temp dir (preallocated bytes already count);
        if the model folder is another filesystem, commit copies the whole file there as well. A RAM-disk
        temp dir keeps only TEMP_RESERVE free (partial_path chose it because the file fits).
        """
        part = self.partial_path(key)
        part_dir = part.parent
        p_free, _t, p_dev = disk_space(part_dir)
        outstanding = 0
        for _i, k, n in live_res:  # only downloads whose partial grows on the same filesystem
            other = self.partial_path(k)
            if other.parent == part_dir:
                outstanding += max(0, n - allocated(other))
        need_part = max(0, nbytes - allocated(part))
        f_free, _t, f_dev = disk_space(final.parent)
        keep_part = min(TEMP_RESERVE, self.min_free_disk) if self.in_temp_dir(part) else self.min_free_disk
        if f_dev == p_dev:
            return [(p_dev, need_part, p_free, final.parent, outstanding, keep_part)]
        return [(p_dev, need_part, p_free, part_dir, outstanding, keep_part),
                (f_dev, nbytes, f_free, final.parent, 0, self.min_free_disk)]

    def _watermark(self, conn: sqlite3.Connection, just_committed: str) -> list[Entry]:
        if self.max_size is None:
            return []
        rows = self._load(conn)
        live_res = self._live_reservations(conn)
        protect = frozenset({just_committed, *(k for _i, k, _n in live_res)})
        items = [r.item(protect) for r in rows]
        used = _unique_bytes(items) + sum(n for _i, _k, n in live_res)
        if used <= self.high_watermark * self.max_size:
            return []
        victims = select_victims(self.policy, items, int(used - self.low_watermark * self.max_size))
        by_key = {r.entry.key: r for r in rows}
        return self._remove(conn, [by_key[v.key] for v in victims], policy_eviction=True)

    # ----------------------------------------------------------------- writes
    def commit(
        self,
        key: str,
        part_path: Path,
        *,
        size: int,
        sha256: str,
        source: str,
        etag: str | None = None,
        last_modified: str | None = None,
        pin: bool = False,
    ) -> Entry:
        """Move a complete, verified partial file to its final path atomically and index it."""
        final = self.path_for(key)
        try:
            sha = check_sha256(sha256)
        except ValueError as exc:
            raise StoreError(key, str(exc)) from None
        part_path = Path(part_path)
        try:
            st = os.stat(part_path)
        except FileNotFoundError:
            raise StoreError(key, f"partial file {part_path} does not exist") from None
        if st.st_size != size:
            raise IntegrityError(key, f"partial file has {st.st_size} bytes, expected {size}")
        final.parent.mkdir(parents=True, exist_ok=True)
        final = self.path_for(key)  # re-check: a folder could have been swapped for a symlink meanwhile

        placed = False
        twin = self._find_sha(sha)
        if twin is not None and twin.entry.key == key:
            placed = True  # identical bytes already at the final path
        elif twin is not None:
            placed = self._link_twin(twin, final, size)
        if placed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part_path)
        else:
            self._move_into_place(key, part_path, final)
        fsync_dir(final.parent)
        fst = os.stat(final)

        now = time.time()
        pid, _ps = self_proc()
        with self._index.write() as c:
            old = c.execute("SELECT hits, pinned FROM entries WHERE key=?", (key,)).fetchone()
            hits = (old[0] + 1) if old else 1
            pinned = bool(pin or (old and old[1]))
            folder, filename = split_key(key)
            prio = self.policy.priority(size, hits, now, self._clock(c))
            c.execute(
                f"INSERT OR REPLACE INTO entries({_COLS}) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (key, folder, filename, size, sha, source, etag, last_modified, now, now, hits, int(pinned),
                 prio, fst.st_dev, fst.st_ino))
            c.execute("DELETE FROM reservations WHERE key=? AND pid=?", (key, pid))
            self._log_access(c, now, key)  # a download is an access (the request that caused it)
            self._watermark(c, key)
            r = c.execute(f"SELECT {_COLS} FROM entries WHERE key=?", (key,)).fetchone()
            in_use = key in self._live_leases(c)
        return self._row(r, in_use).entry

    def _link_twin(self, twin: _Row, final: Path, size: int) -> bool:
        """Hardlink an identical cached file to `final` (temp name + rename); False if not possible."""
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        try:
            os.link(twin.entry.path, tmp)
            st = os.stat(tmp)
            # The inode must still be the one indexed with this sha256 (not replaced meanwhile).
            moved = twin.ino is not None and (st.st_dev, st.st_ino) != (twin.dev, twin.ino)
            if st.st_size != size or moved:
                raise OSError(errno.ESTALE, "twin changed")
            os.replace(tmp, final)
            return True
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            return False

    def _move_into_place(self, key: str, part: Path, final: Path) -> None:
        fsync_file(part)
        try:
            os.replace(part, final)
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise StoreError(key, f"cannot move into place: {exc.strerror}") from exc
        # The folder is another filesystem (a mount inside the cache): copy beside it, then rename.
        tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:12]}{TMP_SUFFIX}"
        try:
            with open(part, "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 8 * 2**20)
                dst.flush()
                os.fsync(dst.fileno())
            os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NotEnoughSpace(key, f"disk full while copying into {final.parent}; the complete "
                                          f"download is kept at {part}") from exc
            raise StoreError(key, f"cannot copy into place: {exc.strerror}") from exc
        with contextlib.suppress(FileNotFoundError):
            os.unlink(part)

    def adopt(self, key: str, *, source: str = "local") -> Entry:
        """Index a file someone placed at the final path by hand (hashed, streamed)."""
        path = self.path_for(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise StoreError(key, f"no file at {path}") from None
        if not path.is_file():
            raise StoreError(key, f"{path} is not a regular file")
        sha = sha256_file(path)
        st2 = os.stat(path)
        if (st2.st_size, st2.st_mtime_ns, st2.st_ino) != (st.st_size, st.st_mtime_ns, st.st_ino):
            raise StoreError(key, f"{path} changed while it was being hashed; try again")
        now = time.time()
        with self._index.write() as c:
            old = c.execute("SELECT hits, pinned, created FROM entries WHERE key=?", (key,)).fetchone()
            hits = old[0] if old else 1
            folder, filename = split_key(key)
            created = old[2] if old else now
            prio = self.policy.priority(st.st_size, hits, now, self._clock(c))
            c.execute(
                f"INSERT OR REPLACE INTO entries({_COLS}) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (key, folder, filename, st.st_size, sha, source, None, None, created, now, hits,
                 int(bool(old and old[1])), prio, st.st_dev, st.st_ino))
            r = c.execute(f"SELECT {_COLS} FROM entries WHERE key=?", (key,)).fetchone()
            in_use = key in self._live_leases(c)
        return self._row(r, in_use).entry

    def _set_pinned(self, key: str, value: bool) -> None:
        self.path_for(key)
        cur = self._index.execute("UPDATE entries SET pinned=? WHERE key=?", (int(value), key))
        if cur.rowcount == 0:
            raise StoreError(key, "not in the cache")

    def pin(self, key: str) -> None:
        """Never evict `key` (by policy or clean) until unpinned."""
        self._set_pinned(key, True)

    def unpin(self, key: str) -> None:
        self._set_pinned(key, False)

    @contextlib.contextmanager
    def in_use(self, key: str) -> Iterator[None]:
        """Lease `key` while a process reads it; eviction skips it until the block ends or the pid dies."""
        self.path_for(key)
        pid, pstart = self_proc()
        cur = self._index.execute(
            "INSERT INTO leases(key, pid, pstart, token, created) VALUES(?,?,?,?,?)",
            (key, pid, pstart, uuid.uuid4().hex, time.time()))
        lease_id = cur.lastrowid
        try:
            yield
        finally:
            self._index.execute("DELETE FROM leases WHERE id=?", (lease_id,))

    def evict(self, key: str, *, force: bool = False) -> Entry:
        """Remove one file and its row; pinned or in-use files only with force. A hardlink twin stays."""
        self.path_for(key)
        with self._index.write() as c:
            r = c.execute(f"SELECT {_COLS} FROM entries WHERE key=?", (key,)).fetchone()
            if r is None:
                raise StoreError(key, "not in the cache")
            row = self._row(r, key in self._live_leases(c))
            if not force and row.entry.pinned:
                raise StoreError(key, "is pinned (unpin it first, or force)")
            if not force and row.entry.in_use:
                raise StoreError(key, "is in use by a running process (wait, or force)")
            removed = self._remove(c, [row], policy_eviction=False)
        if not removed:
            raise StoreError(key, f"cannot delete {row.entry.path}")
        return removed[0]

    def clean(self, *, max_size: int | None = None, keep_days: float | None = None,
              dry_run: bool = False) -> list[Entry]:
        """Nightly cleanup: drop files unused for `keep_days`, then evict down to `max_size` (or the cap)."""
        now = time.time()
        target = max_size if max_size is not None else self.max_size
        with self._index.write() as c:
            self._reap(c)
            rows = self._load(c)
            protect = frozenset(k for _i, k, _n in self._live_reservations(c))
            by_key = {r.entry.key: r for r in rows}
            items = [r.item(protect) for r in rows]
            stale: list[Item] = []
            if keep_days is not None:
                cutoff = now - keep_days * 86400
                stale = [it for it in items if it.last_access < cutoff and not (it.pinned or it.in_use)]
            stale_keys = {it.key for it in stale}
            rest = [it for it in items if it.key not in stale_keys]
            victims: list[Item] = []
            if target is not None:
                victims = select_victims(self.policy, rest, _unique_bytes(rest) - target)
            if dry_run:
                return [by_key[it.key].entry for it in stale + victims]
            removed = self._remove(c, [by_key[it.key] for it in stale], policy_eviction=False)
            removed += self._remove(c, [by_key[it.key] for it in victims], policy_eviction=True)
        return removed

    def verify(self, *, rehash: bool = False, fix: bool = True, stale_minutes: float = 60.0) -> VerifyReport:
        """Reconcile disk and index (see store.verify)."""
        from comfy_autocloud.store.verify import run_verify

        return run_verify(self, rehash=rehash, fix=fix, stale_minutes=stale_minutes)

    def close(self) -> None:
        self._index.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        cap = human_size(self.max_size) if self.max_size is not None else "no cap"
        return f"Store({str(self.root)!r}, {cap}, policy={self.policy.name})"
