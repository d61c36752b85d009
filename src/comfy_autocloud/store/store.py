"""The local model cache: files at `<root>/<folder>/<filename>` (what ComfyUI reads) plus a SQLite index.

Rules kept here: a file reaches its final path only by an atomic rename (or hardlink + rename) of
complete, verified bytes; room is made *before* a download (reserve), never by deleting pinned or in-use
files; identical content is stored once (hardlinks); the file system is the truth and the index follows
it (`lookup` drops rows of vanished files, `verify` reconciles everything else).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Collection, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from comfy_autocloud.errors import IntegrityError, NotEnoughSpace, StoreError
from comfy_autocloud.fsutil import boot_id, fsync_dir, fsync_file, sha256_of, sha256_of_fd
from comfy_autocloud.keys import check_sha256, split_key
from comfy_autocloud.phases import Laps
from comfy_autocloud.store.content_check import check_before_commit
from comfy_autocloud.store.durability import Durability
from comfy_autocloud.store.eviction import AdaptivePolicy, Item, Policy, bytes_freed, get_policy, select_victims
from comfy_autocloud.store.index import ACCESS_LOG_MAX, Index, proc_alive
from comfy_autocloud.store.layout import (
    INDEX_NAME,
    LOCKS_DIR,
    PARTIAL_DIR,
    POLICY_STATE_NAME,
    PRIVATE_DIR,
    QUARANTINE_DIR,
    TEMP_RESERVE,
    commit_temp,
    key_name,
    temp_partial_dir,
)
from comfy_autocloud.store.partials import idle_partials
from comfy_autocloud.store.partials import remove as remove_partial
from comfy_autocloud.store.policy_state import SAVE_EVERY, PolicyStateFile
from comfy_autocloud.store.room import disk_needs, over_watermark, room_for, unique_bytes
from comfy_autocloud.store.settle import flush_and_settle, start_settle
from comfy_autocloud.store.space import disk_space
from comfy_autocloud.store.verify import VerifyReport, quarantine, run_verify
from comfy_autocloud.units import human_size

log = logging.getLogger(__name__)

POLICY_REPLAY = 5_000  # access-log rows (weeks of a node's loads) a stateful policy replays at most at first use


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

    @property
    def hashed(self) -> bool:
        """False while the sha256 of a file committed without one (a warmup copy) is still being computed."""
        return bool(self.sha256)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["path"] = str(self.path)
        d["sha256"] = self.sha256 or None
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
        """Give the room back. When the index cannot be written (its disk is full) the row is dropped by this
        store's next reservation instead: a failed release must not replace the error being reported."""
        if not self._released:
            self._released = True
            try:
                self.store._index.drop_process_row("reservations", self.id)
            except (NotEnoughSpace, sqlite3.Error) as exc:
                log.warning("autocloud: %s: reservation kept until the next download: %s", self.key, exc)
                self.store._unreleased.append(self.id)

    def __enter__(self) -> Reservation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


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
            self.policy: Policy = get_policy(policy, max_size)
        except ValueError as exc:
            raise StoreError(str(root), str(exc)) from None
        self.root = Path(root).expanduser().absolute()
        self.max_size = max_size
        self.high_watermark = high_watermark
        self.low_watermark = low_watermark
        self.min_free_disk = min_free_disk
        self.private = self.root / PRIVATE_DIR
        for sub in (PARTIAL_DIR, LOCKS_DIR, QUARANTINE_DIR):
            (self.private / sub).mkdir(parents=True, exist_ok=True)
        self._root_real = self.root.resolve()
        self._private_real = self.private.resolve()
        self.temp_dir = self._open_temp_dir(temp_dir)
        self._index = Index(self.private / INDEX_NAME, {"ac_priority": (4, self.policy.priority)})
        self._unreleased: list[int] = []  # reservation rows whose release could not be written
        self._index.rerank(self.policy.name)
        self._policy_seen = -1  # the last access-log row a stateful policy has observed
        self._policy_lock = threading.Lock()  # threads of this process feed it each row once
        self._policy_file = PolicyStateFile(self.private / POLICY_STATE_NAME)
        self._policy_saved = -1  # the row the saved state was built up to, as this process last knew it
        self._index.redact_sources()

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
        return key_name(key)

    def _open_temp_dir(self, temp_dir: Path | str | None) -> Path | None:
        """`<temp_dir>/autocloud-partial-<cache id>`: caches sharing one RAM disk never mix partials."""
        if temp_dir is None or str(temp_dir) == "":
            return None
        path = temp_partial_dir(Path(temp_dir).expanduser().absolute(), self._root_real)
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
        return [self.private / PARTIAL_DIR, *([self.temp_dir] if self.temp_dir is not None else [])]

    def partial_path(self, key: str, size: int | None = None, *, disk: bool = False) -> Path:
        """Where `key`'s partial download lives; with a temp dir (a tmpfs), there when it has room.

        An existing partial (in either place) is always the answer, so a download resumes where it was.
        A new download of known `size` goes to the temp dir if that leaves TEMP_RESERVE free there, else
        to the cache disk (so does `disk=True`, and an unknown size, which cannot be promised to fit).
        The choice is made sticky by creating the empty file, so every later call agrees with it.
        """
        name = f"{self._key_name(key)}.part"
        on_disk = self.private / PARTIAL_DIR / name
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
        return self.private / LOCKS_DIR / f"{self._key_name(key)}.lock"

    # ----------------------------------------------------------------- reads
    def _row(self, r: sqlite3.Row | tuple[Any, ...], live: set[str] | bool) -> _Row:
        (key, folder, filename, size, sha, source, etag, lm, created, last_access, hits, pinned, prio,
         dev, ino) = r[:15]
        in_use = live if isinstance(live, bool) else key in live
        e = Entry(key=key, folder=folder, filename=filename, path=self.root / folder / filename, size=size,
                  sha256=sha, source=source, etag=etag, last_modified=lm, created=created,
                  last_access=last_access, hits=hits, pinned=bool(pinned), in_use=in_use)
        return _Row(e, prio, dev, ino)

    def _load(self, conn: sqlite3.Connection | None = None) -> list[_Row]:
        live = self._index.live_leases(conn)
        return [self._row(r, live) for r in self._index.entry_rows(conn)]

    def lookup(self, key: str) -> Entry | None:
        """The entry if its file is present with the recorded size; drops the row if the file is gone."""
        path = self.path_for(key)
        found = self._index.entry_row_with_leases(key)
        if found is None:
            return None
        r, leases, unsettled_in = found
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._index.drop_entry(key, r[8])
            return None
        if st.st_size != r[3]:
            return None
        if unsettled_in is not None and unsettled_in != boot_id() and not self._check_unsettled(key, path, r):
            return None
        return self._row(r, any(proc_alive(pid, ps) for pid, ps in leases)).entry

    def _check_unsettled(self, key: str, path: Path, r: tuple[Any, ...]) -> bool:
        """An entry committed without fsync in a boot that has ended: the machine went down before its
        bytes were known to be on disk, so they are read back once against the recorded sha256. A file
        that lost bytes is quarantined as `verify` does (it is fetched or copied again); a good one is
        trusted from now on."""
        if r[4]:
            log.info("%s: written just before the machine went down; checking its sha256 once", key)
            if sha256_of(path) == r[4]:
                self._index.settle(key)
                return True
            why = "lost bytes when the machine went down (sha256 differs)"
        else:  # copied to be hashed later, and the machine went down first: nothing to check it against
            why = "was copied just before the machine went down and never hashed, so it cannot be checked"
        try:
            where = f"moved to {quarantine(self, key, path)}"
        except FileNotFoundError:
            where = "already gone"
        log.warning("%s: %s; %s, it will be fetched again", key, why, where)
        self._index.drop_entry(key, r[8])
        self._index.settle(key)
        return False

    def settle(self) -> int:
        """Wait until everything written to the cache's file system is on disk (one syncfs), then trust the
        entries committed unsettled in this boot before that moment; returns how many were settled."""
        return flush_and_settle(self.root, self._index)

    def settle_in_background(self, delay: float | None = None) -> bool:
        """`settle` in a detached process, so the command that committed returns without waiting for the
        disk (store.settle.start_settle); False when it cannot be started (the marks then stay until the
        next settle, or until a lookup in another boot checks the file)."""
        return start_settle(self.root, delay)

    def unsettled(self) -> list[tuple[str, float, str]]:
        """(key, created, boot) of entries committed without fsync and not yet settled."""
        return self._index.unsettled()

    # ----------------------------------------------------------------- hashed later
    def unhashed(self) -> list[Entry]:
        """Entries committed without a sha256 (`commit(sha256=None)`) whose hash is not recorded yet, oldest first."""
        return [self._row(r, False).entry for r in self._index.unhashed_rows()]

    def hash_pending(self, keys: Collection[str] | None = None) -> list[Entry]:
        """Hash the unhashed entries (all, or those in `keys`) and record each sha256; returns the entries
        now hashed. The bytes hashed are those of the indexed inode; a version replaced, evicted or hashed by
        another process meanwhile is skipped."""
        done: list[Entry] = []
        for r in self._index.unhashed_rows():
            row = self._row(r, False)
            if keys is not None and row.entry.key not in keys:
                continue
            sha = self._hash_row(row)
            if sha is not None:
                done.append(replace(row.entry, sha256=sha))
        return done

    def with_sha256(self, entry: Entry) -> Entry:
        """`entry` with its sha256, hashing it now if it was committed without one (what a caller that
        compares hashes or serves the file to peers needs); StoreError if it was replaced meanwhile."""
        if entry.hashed:
            return entry
        r = self._index.entry_row(entry.key)
        if r is None or r[8] != entry.created:
            raise StoreError(entry.key, "replaced or evicted while its sha256 was being computed")
        row = self._row(r, entry.in_use)
        if row.entry.hashed:
            return row.entry
        sha = self._hash_row(row)
        if sha is None:
            r = self._index.entry_row(entry.key)  # hashed by another process meanwhile, or replaced
            if r is None or r[8] != entry.created or not r[4]:
                raise StoreError(entry.key, "replaced or evicted while its sha256 was being computed")
            sha = r[4]
        return replace(row.entry, sha256=sha)

    def _hash_row(self, row: _Row) -> str | None:
        """The sha256 of the file of an unhashed row, recorded; None when the file is not that row's inode
        any more or the row changed meanwhile."""
        e = row.entry
        try:
            fd = os.open(e.path, os.O_RDONLY)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
            if st.st_ino != row.ino or st.st_size != e.size:
                return None
            sha = sha256_of_fd(fd)
        finally:
            os.close(fd)
        if not self._index.set_sha256(e.key, e.created, st.st_ino, sha):
            return None
        log.info("%s: sha256 %s recorded", e.key, sha[:12])
        return sha

    def unsettled_by_ended_boots(self) -> set[tuple[str, float]]:
        """(key, created) of the entries committed unsettled in a boot that has ended: their bytes may not
        have reached the disk (what `lookup` and `verify` read back)."""
        this_boot = boot_id()
        return {(key, created) for key, created, boot in self._index.unsettled() if boot != this_boot}

    def touch(self, key: str) -> None:
        """Record one access (last_access, hits, policy priority, a row of the access log); no-op if not cached."""
        self._index.touch(key, time.time())

    def access_history(self, limit: int = ACCESS_LOG_MAX) -> list[tuple[float, str, int]]:
        """The newest `limit` accesses as (timestamp, key, size), oldest first."""
        return self._index.access_history(limit)

    def last_access_id(self) -> int:
        """Grows with every recorded access: a cheap 'anything new?' for watchers."""
        return self._index.last_access_id()

    def _find_sha(self, sha: str, exclude: str | None = None) -> _Row | None:
        for r in self._index.rows_with_sha(sha):
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
        return [r.entry for r in self._load()]

    def usage(self) -> Usage:
        rows = self._load()
        items = [r.item() for r in rows]
        reserved = sum(n for _i, _k, n in self._index.live_reservations())
        free, total, _dev = disk_space(self.root)
        return Usage(entries=len(rows), bytes=unique_bytes(items), logical_bytes=sum(i.size for i in items),
                     reserved_bytes=reserved, cap=self.max_size, disk_free=free, disk_total=total)

    # ----------------------------------------------------------------- removing and making room
    def _feed_policy(self, conn: sqlite3.Connection | None = None) -> None:
        """A stateful policy observes the accesses logged since it last looked (every process's, in order),
        before it ranks victims. The adaptive default starts from the state a process saved
        (`policy_state`) and replays only the rows after it; without one, from the newest POLICY_REPLAY
        rows. Saved every SAVE_EVERY rows, outside the write lock (`conn` is None there). Once started it
        never skips a row, so processes on one cache that reach the same state stay the same."""
        if not self.policy.stateful:
            return
        adaptive = self.policy if isinstance(self.policy, AdaptivePolicy) else None
        with self._policy_lock:
            if adaptive is not None:
                built_to = self._policy_file.load_if_newer(adaptive, self._index, self._policy_seen)
                if built_to is not None:
                    self._policy_seen = self._policy_saved = built_to
            if self._policy_seen < 0:  # nothing saved: learn from the newest rows (bounded)
                self._policy_seen = max(0, self._index.last_access_id() - POLICY_REPLAY)
            for row_id, ts, key, size in self._index.access_since(self._policy_seen, conn):
                self.policy.observe(ts, key, size)
                self._policy_seen = row_id
            if adaptive is not None and conn is None and self._policy_seen > 0 \
                    and (self._policy_saved < 0 or self._policy_seen - self._policy_saved >= SAVE_EVERY):
                self._policy_file.save(adaptive, self._index, self._policy_seen)  # a failure is logged, not retried
                self._policy_saved = self._policy_seen

    def would_evict(self, nbytes: int, *, protect: Collection[str] = ()) -> list[Entry] | None:
        """What the policy would evict under the cap to make room for `nbytes` more (a dry run): [] when
        it fits, None when evicting every unpinned, unused file would not make room."""
        if self.max_size is None:
            return []
        self._feed_policy()
        rows = self._load()
        live_res = self._index.live_reservations()
        items = [r.item(frozenset({*protect, *(k for _i, k, _n in live_res)})) for r in rows]
        need = unique_bytes(items) + sum(n for _i, _k, n in live_res) + nbytes - self.max_size
        victims = select_victims(self.policy, items, need)
        if need > 0 and bytes_freed(victims, items) < need:
            return None
        by_key = {r.entry.key: r.entry for r in rows}
        return [by_key[v.key] for v in victims]

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
            self._index.drop_entry(e.key, c=conn)
            removed.append(e)
        if policy_eviction and removed:
            gone = {e.key for e in removed}
            evicted = [r.item() for r in rows if r.entry.key in gone]
            self._index.set_clock(conn, self.policy.clock_after(self._index.clock(conn), evicted))
        return removed

    def reserve(self, key: str, nbytes: int) -> Reservation:
        """Make room for a download of `nbytes` before it starts, or raise NotEnoughSpace saying why."""
        final = self.path_for(key)
        if nbytes < 0:
            raise StoreError(key, f"cannot reserve a negative size ({nbytes})")
        self._feed_policy()  # the long catch-up outside the write lock
        while self._unreleased:  # releases a full disk refused earlier
            try:
                self._index.drop_process_row("reservations", self._unreleased[-1])
            except (NotEnoughSpace, sqlite3.Error):
                break
            self._unreleased.pop()
        with self._index.write() as c:
            self._feed_policy(c)
            self._index.reap(c)
            rows = self._load(c)
            by_key = {r.entry.key: r for r in rows}
            live_res = self._index.live_reservations(c)
            protect = frozenset({key, *(k for _i, k, _n in live_res)})
            items = [r.item(protect) for r in rows]
            old = by_key.get(key)
            replaced = 0
            if old is not None and bytes_freed([old.item()], items) == old.entry.size:
                replaced = old.entry.size  # replaced (not kept) once the new version commits
            part = self.partial_path(key)
            disks = disk_needs(part, final, nbytes, [(self.partial_path(k), n) for _i, k, n in live_res],
                               self.min_free_disk, part_in_ram=self.in_temp_dir(part))
            running = {key_name(k) for _i, k, _n in live_res} | {key_name(key)}
            victims, stopped = room_for(self.policy, items, key=key, nbytes=nbytes, replaced=replaced,
                                        reserved=sum(n for _i, _k, n in live_res), max_size=self.max_size,
                                        disks=disks, stopped=lambda dev: idle_partials(self, running, dev))
            for p in stopped:
                remove_partial(p)
                log.warning("autocloud: removed a stopped partial download (%s) to make room for %s",
                            human_size(p.nbytes), key)
            evicted = self._remove(c, [by_key[v.key] for v in victims], policy_eviction=True)
            row_id = self._index.add_reservation(c, key, nbytes, time.time())
        return Reservation(self, key, nbytes, row_id, evicted)

    def _watermark(self, conn: sqlite3.Connection, just_committed: str) -> list[Entry]:
        rows = self._load(conn)
        live_res = self._index.live_reservations(conn)
        protect = frozenset({just_committed, *(k for _i, k, _n in live_res)})
        self._feed_policy(conn)
        victims = over_watermark(self.policy, [r.item(protect) for r in rows], sum(n for _i, _k, n in live_res),
                                 self.max_size, self.high_watermark, self.low_watermark)
        by_key = {r.entry.key: r for r in rows}
        return self._remove(conn, [by_key[v.key] for v in victims], policy_eviction=True)

    # ----------------------------------------------------------------- writes
    def commit(
        self,
        key: str,
        part_path: Path,
        *,
        size: int,
        sha256: str | None,
        source: str,
        etag: str | None = None,
        last_modified: str | None = None,
        pin: bool = False,
        timings: dict[str, float] | None = None,
        content_type: str | None = None,
        durability: Durability = "durable",
    ) -> Entry:
        """Move a complete, verified partial file to its final path atomically and index it.

        `timings`, when given, gets the seconds spent on fsync, rename and index (see `phases.Laps`). Its
        content must be what the file name says (store.content_check; `content_type` is what the origin said
        it sent): else BadContent, and the partial is deleted.

        `durability` (see DURABILITIES): "durable" fsyncs the file before and the folder after the rename.
        The other two skip both: a kill still never shows a partial file (the rename is atomic and the page
        cache outlives the process), only a machine going down could. "deferred" records the entry as
        unsettled in this boot until `settle()` has seen the disk catch up: should the machine go down
        first, the next lookup (another boot) reads the file back against its sha256 before serving it.
        "ephemeral" records nothing, for a cache that does not outlive the machine.

        `sha256=None` commits a file whose hash is computed later (`hash_pending`; a warmup copies from the
        user's own volume without reading the bytes back): the entry's sha256 is '' until then, it is never
        deduplicated, and a caller that compares hashes gets one through `with_sha256`.
        """
        laps = Laps(timings)
        final = self.path_for(key)
        try:
            sha = check_sha256(sha256) if sha256 is not None else ""
        except ValueError as exc:
            raise StoreError(key, str(exc)) from None
        part_path = Path(part_path)
        try:
            st = os.stat(part_path)
        except FileNotFoundError:
            raise StoreError(key, f"partial file {part_path} does not exist") from None
        if st.st_size != size:
            raise IntegrityError(key, f"partial file has {st.st_size} bytes, expected {size}")
        check_before_commit(key, part_path, final.name, source, content_type)
        final.parent.mkdir(parents=True, exist_ok=True)
        final = self.path_for(key)  # re-check: a folder could have been swapped for a symlink meanwhile

        placed = False
        twin = self._find_sha(sha) if sha else None
        if twin is not None and twin.entry.key == key:
            placed = True  # identical bytes already at the final path
        elif twin is not None:
            placed = self._link_twin(twin, final, size)
        laps.lap("index")
        if placed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(part_path)
            laps.lap("rename")
        else:
            self._move_into_place(key, part_path, final, laps, durable=durability == "durable")
        if durability == "durable":
            fsync_dir(final.parent)
        fst = os.stat(final)
        laps.lap("fsync")

        now = time.time()
        with self._index.write() as c:
            old = self._index.entry_history(c, key)
            hits = (old[0] + 1) if old else 1
            pinned = bool(pin or (old and old[1]))
            folder, filename = split_key(key)
            prio = self.policy.priority(size, hits, now, self._index.clock(c))
            self._index.put_entry(c, (key, folder, filename, size, sha, source, etag, last_modified, now, now,
                                      hits, int(pinned), prio, fst.st_dev, fst.st_ino))
            if durability == "deferred":
                self._index.mark_unsettled(c, key, now, boot_id())
            self._index.drop_own_reservations(c, key)
            self._index.log_access(c, now, key)  # a download is an access (the request that caused it)
            self._watermark(c, key)
            r = self._index.entry_row(key, c)
            in_use = key in self._index.live_leases(c)
        laps.lap("index")
        return self._row(r, in_use).entry

    def _link_twin(self, twin: _Row, final: Path, size: int) -> bool:
        """Hardlink an identical cached file to `final` (temp name + rename); False if not possible."""
        tmp = commit_temp(final)
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

    def _move_into_place(self, key: str, part: Path, final: Path, laps: Laps, *, durable: bool = True) -> None:
        if durable:
            fsync_file(part)
        laps.lap("fsync")
        try:
            os.replace(part, final)
            laps.lap("rename")
            return
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise StoreError(key, f"cannot move into place: {exc.strerror}") from exc
        # The folder is another filesystem (a mount inside the cache): copy beside it, then rename.
        tmp = commit_temp(final)
        try:
            import shutil  # only across file systems

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
        laps.lap("rename")  # a copy across file systems, fsync included

    def adopt(self, key: str, *, source: str = "local") -> Entry:
        """Index a file someone placed at the final path by hand (hashed, streamed)."""
        path = self.path_for(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            raise StoreError(key, f"no file at {path}") from None
        if not path.is_file():
            raise StoreError(key, f"{path} is not a regular file")
        sha = sha256_of(path)
        st2 = os.stat(path)
        if (st2.st_size, st2.st_mtime_ns, st2.st_ino) != (st.st_size, st.st_mtime_ns, st.st_ino):
            raise StoreError(key, f"{path} changed while it was being hashed; try again")
        now = time.time()
        with self._index.write() as c:
            old = self._index.entry_history(c, key)
            hits = old[0] if old else 1
            folder, filename = split_key(key)
            created = old[2] if old else now
            prio = self.policy.priority(st.st_size, hits, now, self._index.clock(c))
            self._index.put_entry(c, (key, folder, filename, st.st_size, sha, source, None, None, created, now,
                                      hits, int(bool(old and old[1])), prio, st.st_dev, st.st_ino))
            r = self._index.entry_row(key, c)
            in_use = key in self._index.live_leases(c)
        return self._row(r, in_use).entry

    def _set_pinned(self, key: str, value: bool) -> None:
        self.path_for(key)
        if not self._index.set_pinned(key, value):
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
        lease_id = self._index.add_lease(key, uuid.uuid4().hex, time.time())
        try:
            yield
        finally:
            self._index.drop_process_row("leases", lease_id)

    def evict(self, key: str, *, force: bool = False) -> Entry:
        """Remove one file and its row; pinned or in-use files only with force. A hardlink twin stays."""
        self.path_for(key)
        with self._index.write() as c:
            r = self._index.entry_row(key, c)
            if r is None:
                raise StoreError(key, "not in the cache")
            row = self._row(r, key in self._index.live_leases(c))
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
            self._feed_policy(c)
            self._index.reap(c)
            rows = self._load(c)
            protect = frozenset(k for _i, k, _n in self._index.live_reservations(c))
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
                victims = select_victims(self.policy, rest, unique_bytes(rest) - target)
            if dry_run:
                return [by_key[it.key].entry for it in stale + victims]
            removed = self._remove(c, [by_key[it.key] for it in stale], policy_eviction=False)
            removed += self._remove(c, [by_key[it.key] for it in victims], policy_eviction=True)
        return removed

    def verify(self, *, rehash: bool = False, fix: bool = True, stale_minutes: float = 60.0) -> VerifyReport:
        """Reconcile disk and index (see store.verify; it also reads back the entries a boot that has ended
        left unsettled)."""
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
