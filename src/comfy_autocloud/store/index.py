"""The SQLite index under `<cache>/.autocloud/index.sqlite`: every SQL statement of the store lives here.

`Index` holds one connection per thread and process and names each query as a method; methods that
take a connection `c` run inside the caller's `write()` transaction (read-then-write decisions such
as making room), the others on the thread's connection in autocommit.

Many ComfyUI threads and several processes (ComfyUI, `autocloud` CLI, cron `clean`) share one index, so:
WAL (readers never block the writer), synchronous=NORMAL (a commit costs no fsync; a power cut can lose
the last transactions, which `verify()` reconciles from the file system, the source of truth), a busy
timeout, every write in a short BEGIN IMMEDIATE transaction (takes the write lock up front, so no
deadlocking read->write upgrade), and a retry loop when the lock stays busy past the timeout.
"""

from __future__ import annotations

import contextlib
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from comfy_autocloud.errors import NotEnoughSpace, StoreError
from comfy_autocloud.redact import redact_url

SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    key TEXT PRIMARY KEY,
    folder TEXT NOT NULL,
    filename TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    source TEXT NOT NULL,
    etag TEXT,
    last_modified TEXT,
    created REAL NOT NULL,
    last_access REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 1,
    pinned INTEGER NOT NULL DEFAULT 0,
    priority REAL NOT NULL DEFAULT 0,
    dev INTEGER,
    ino INTEGER
);
CREATE INDEX IF NOT EXISTS entries_sha256 ON entries(sha256);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS reservations (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    nbytes INTEGER NOT NULL,
    pid INTEGER NOT NULL,
    pstart TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS leases (
    id INTEGER PRIMARY KEY,
    key TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pstart TEXT NOT NULL,
    token TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS leases_key ON leases(key);
CREATE TABLE IF NOT EXISTS unsettled (
    key TEXT PRIMARY KEY,
    created REAL NOT NULL,
    boot TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS access_log (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL
);
"""

BUSY_TIMEOUT_MS = 30_000
_MAX_ATTEMPTS = 20

# Entry rows are tuples in this column order (the store turns them into `Entry` objects).
COLUMNS = ("key, folder, filename, size, sha256, source, etag, last_modified, created, last_access, hits, "
           "pinned, priority, dev, ino")
_CLOCK_SQL = "COALESCE((SELECT CAST(value AS REAL) FROM meta WHERE name='clock'), 0.0)"
ACCESS_LOG_MAX = 50_000  # rows kept in the access log (a few MB); trimmed every ACCESS_LOG_TRIM inserts
ACCESS_LOG_TRIM = 1_000
_PROCESS_TABLES = ("reservations", "leases")  # rows owned by a running process (pid + start time)


def _proc_start(pid: int) -> str:
    """Process start time from /proc (field 22), so a recycled pid is not mistaken for a live owner."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            data = fh.read()
    except OSError:
        return ""
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    rest = data[data.rfind(b")") + 2:].split()
    return rest[19].decode() if len(rest) > 19 else ""


_SELF: tuple[int, str] | None = None


def self_proc() -> tuple[int, str]:
    """(pid, start time) of this process, recomputed after fork."""
    global _SELF
    pid = os.getpid()
    if _SELF is None or _SELF[0] != pid:
        _SELF = (pid, _proc_start(pid))
    return _SELF


def proc_alive(pid: int, pstart: str) -> bool:
    """True if the process that wrote (pid, pstart) still runs (pid reuse detected via start time)."""
    if pid == os.getpid():
        return pstart == self_proc()[1]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    except OSError:
        return False
    if pstart:
        current = _proc_start(pid)
        if current and current != pstart:
            return False
    return True


class Index:
    """Thread- and fork-aware connection holder with short, retried write transactions."""

    def __init__(self, path: Path, functions: dict[str, tuple[int, Callable[..., object]]]) -> None:
        self.path = path
        self._functions = functions
        self._local = threading.local()
        self._all: list[tuple[int, sqlite3.Connection]] = []
        self._lock = threading.Lock()
        self._closed = False
        conn = self.conn()
        self._retry(lambda: conn.execute("PRAGMA journal_mode=WAL"))
        with self.write() as c:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    c.execute(statement)
            row = c.execute("SELECT value FROM meta WHERE name='schema'").fetchone()
            if row is None:
                c.execute("INSERT INTO meta(name, value) VALUES('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(str(path), f"index schema {row[0]} is newer than this version "
                                            f"({SCHEMA_VERSION}); upgrade comfyui-autocloud")

    def conn(self) -> sqlite3.Connection:
        """This thread's connection (a fresh one in a forked child: SQLite handles must not cross fork)."""
        if self._closed:
            raise StoreError(str(self.path), "store is closed")
        local = self._local
        pid = os.getpid()
        conn = getattr(local, "conn", None)
        if conn is not None and local.pid == pid:
            return conn
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                               check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA foreign_keys=OFF")
        for name, (nargs, fn) in self._functions.items():
            conn.create_function(name, nargs, fn, deterministic=True)
        local.conn, local.pid = conn, pid
        with self._lock:
            self._all.append((pid, conn))
        return conn

    def _full(self, exc: sqlite3.Error) -> NotEnoughSpace | None:
        """SQLite's 'database or disk is full' as the store's own error (it names the index and says why)."""
        if isinstance(exc, sqlite3.OperationalError) and "full" in str(exc).lower():
            return NotEnoughSpace(str(self.path), "the cache index cannot be written: the disk is full")
        return None

    def _retry(self, fn: Callable[[], object]) -> object:
        for attempt in range(_MAX_ATTEMPTS):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                msg = str(exc).lower()
                if ("locked" not in msg and "busy" not in msg) or attempt == _MAX_ATTEMPTS - 1:
                    full = self._full(exc)
                    if full is not None:
                        raise full from None
                    raise
                time.sleep(min(0.5, 0.005 * 2**attempt) * (0.5 + random.random()))
        raise AssertionError("unreachable")

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """One short write transaction (BEGIN IMMEDIATE); rolled back if the body raises."""
        conn = self.conn()
        self._retry(lambda: conn.execute("BEGIN IMMEDIATE"))
        try:
            yield conn
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            full = self._full(exc) if isinstance(exc, sqlite3.Error) else None
            if full is not None:
                raise full from None
            raise
        try:
            self._retry(lambda: conn.execute("COMMIT"))
        except NotEnoughSpace:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        """One autocommit statement (its own implicit transaction), retried when busy."""
        conn = self.conn()
        return self._retry(lambda: conn.execute(sql, params))  # type: ignore[return-value]

    def get_meta(self, name: str, default: str | None = None) -> str | None:
        row = self.conn().execute("SELECT value FROM meta WHERE name=?", (name,)).fetchone()
        return row[0] if row else default

    def close(self) -> None:
        """Close every connection this process opened (other threads' too; never a parent's after fork)."""
        pid = os.getpid()
        with self._lock:
            conns, self._all = self._all, []
        for owner, c in conns:
            if owner == pid:
                with contextlib.suppress(sqlite3.Error):
                    c.close()
        self._local = threading.local()
        self._closed = True

    # ----------------------------------------------------------------- entries
    def _c(self, c: sqlite3.Connection | None) -> sqlite3.Connection:
        return c if c is not None else self.conn()

    def entry_rows(self, c: sqlite3.Connection | None = None) -> list[tuple[Any, ...]]:
        return self._c(c).execute(f"SELECT {COLUMNS} FROM entries ORDER BY key").fetchall()

    def entry_row(self, key: str, c: sqlite3.Connection | None = None) -> tuple[Any, ...] | None:
        return self._c(c).execute(f"SELECT {COLUMNS} FROM entries WHERE key=?", (key,)).fetchone()

    def entry_row_with_leases(self, key: str) -> tuple[tuple[Any, ...], list[tuple[int, str]], str | None] | None:
        """One read: the row, the (pid, start) of every lease on it, and the boot it was written in when its
        bytes were not yet known to be on disk (None: settled)."""
        r = self.conn().execute(
            f"SELECT {COLUMNS}, (SELECT group_concat(pid || ':' || pstart, ',') FROM leases l "
            f"WHERE l.key = e.key), (SELECT boot FROM unsettled u WHERE u.key = e.key AND u.created = e.created) "
            f"FROM entries e WHERE key=?", (key,)).fetchone()
        if r is None:
            return None
        leases = [(int(pid), ps) for pid, _, ps in (t.partition(":") for t in r[15].split(","))] if r[15] else []
        return tuple(r[:15]), leases, r[16]

    def rows_with_sha(self, sha: str) -> list[tuple[Any, ...]]:
        return self.conn().execute(f"SELECT {COLUMNS} FROM entries WHERE sha256=? ORDER BY created",
                                   (sha,)).fetchall()

    def entry_history(self, c: sqlite3.Connection, key: str) -> tuple[int, bool, float] | None:
        """(hits, pinned, created) of the row a new version of `key` replaces."""
        r = c.execute("SELECT hits, pinned, created FROM entries WHERE key=?", (key,)).fetchone()
        return (int(r[0]), bool(r[1]), float(r[2])) if r else None

    def put_entry(self, c: sqlite3.Connection, values: tuple[Any, ...]) -> None:
        """Insert or replace one row (values in COLUMNS order)."""
        c.execute(f"INSERT OR REPLACE INTO entries({COLUMNS}) VALUES(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", values)

    def drop_entry(self, key: str, created: float | None = None, c: sqlite3.Connection | None = None) -> None:
        """Forget `key`; with `created`, only that version (a concurrent commit of a new one is kept)."""
        if created is None:
            sql, params = "DELETE FROM entries WHERE key=?", (key,)
        else:
            sql, params = "DELETE FROM entries WHERE key=? AND created=?", (key, created)
        if c is not None:
            c.execute(sql, params)
        else:
            self.execute(sql, params)

    # ----------------------------------------------------------------- unsettled (written without fsync)
    def mark_unsettled(self, c: sqlite3.Connection, key: str, created: float, boot: str) -> None:
        c.execute("INSERT OR REPLACE INTO unsettled(key, created, boot) VALUES(?,?,?)", (key, created, boot))

    def settle(self, key: str | None = None, *, boot: str | None = None, before: float | None = None) -> int:
        """Forget the unsettled mark of `key`, or of every entry written in `boot` before `before`."""
        if key is not None:
            return self.execute("DELETE FROM unsettled WHERE key=?", (key,)).rowcount
        return self.execute("DELETE FROM unsettled WHERE boot=? AND created<=?", (boot, before)).rowcount

    def unsettled(self) -> list[tuple[str, float, str]]:
        return self.conn().execute("SELECT key, created, boot FROM unsettled ORDER BY key").fetchall()

    # ----------------------------------------------------------------- hashed later (sha256 '' until then)
    def unhashed_rows(self) -> list[tuple[Any, ...]]:
        return self.conn().execute(f"SELECT {COLUMNS} FROM entries WHERE sha256='' ORDER BY created").fetchall()

    def set_sha256(self, key: str, created: float, ino: int, sha: str) -> bool:
        """Record the sha256 of the version of `key` committed at `created` in inode `ino`, if that version is
        still the one indexed and still unhashed (False: replaced, evicted or hashed meanwhile)."""
        return self.execute("UPDATE entries SET sha256=? WHERE key=? AND created=? AND ino=? AND sha256=''",
                            (sha, key, created, ino)).rowcount > 0

    def set_identity(self, key: str, created: float, dev: int, ino: int) -> None:
        self.execute("UPDATE entries SET dev=?, ino=? WHERE key=? AND created=?", (dev, ino, key, created))

    def set_pinned(self, key: str, value: bool) -> bool:
        """False when `key` has no row."""
        return self.execute("UPDATE entries SET pinned=? WHERE key=?", (int(value), key)).rowcount > 0

    def touch(self, key: str, now: float) -> None:
        """One access: last_access, hits, the policy's priority (SQL function ac_priority), the access log."""
        with self.write() as c:
            cur = c.execute(
                f"UPDATE entries SET last_access=?1, hits=hits+1, "
                f"priority=ac_priority(size, hits+1, ?1, {_CLOCK_SQL}) WHERE key=?2", (now, key))
            if cur.rowcount:
                self.log_access(c, now, key)

    def redact_sources(self) -> None:
        """Once per index: re-redact the source of rows an older version stored with a query value it did
        not recognise as a secret (`?t=`, `?hdnea=`); every query value is masked now (redact.redact_url)."""
        if self.get_meta("sources_redacted") == "2":
            return
        with self.write() as c:
            for key, source in c.execute("SELECT key, source FROM entries").fetchall():
                clean = redact_url(source) if "://" in source else source
                if clean != source:
                    c.execute("UPDATE entries SET source=? WHERE key=?", (clean, key))
            c.execute("INSERT OR REPLACE INTO meta(name, value) VALUES('sources_redacted', '2')")

    def rerank(self, policy_name: str) -> None:
        """Recompute every priority when the cache was last used with another policy."""
        if self.get_meta("policy") == policy_name:
            return
        with self.write() as c:
            if self.get_meta("policy") == policy_name:
                return
            c.execute(f"UPDATE entries SET priority=ac_priority(size, hits, last_access, {_CLOCK_SQL})")
            c.execute("INSERT OR REPLACE INTO meta(name, value) VALUES('policy', ?)", (policy_name,))

    def clock(self, c: sqlite3.Connection | None = None) -> float:
        """The eviction policy's clock (GreedyDual's inflation value)."""
        row = self._c(c).execute("SELECT value FROM meta WHERE name='clock'").fetchone()
        return float(row[0]) if row else 0.0

    def set_clock(self, c: sqlite3.Connection, value: float) -> None:
        c.execute("INSERT OR REPLACE INTO meta(name, value) VALUES('clock', ?)", (repr(value),))

    # ----------------------------------------------------------------- access log
    def log_access(self, c: sqlite3.Connection, now: float, key: str) -> None:
        """The history predictive preloading learns from: one row per access, the newest ACCESS_LOG_MAX kept."""
        cur = c.execute("INSERT INTO access_log(ts, key, size) SELECT ?, key, size FROM entries WHERE key=?",
                        (now, key))
        row_id = int(cur.lastrowid or 0)
        if row_id and row_id % ACCESS_LOG_TRIM == 0:
            c.execute("DELETE FROM access_log WHERE id <= ?", (row_id - ACCESS_LOG_MAX,))

    def access_history(self, limit: int) -> list[tuple[float, str, int]]:
        """The newest `limit` accesses as (timestamp, key, size), oldest first."""
        rows = self.conn().execute(
            "SELECT ts, key, size FROM access_log ORDER BY id DESC LIMIT ?", (max(0, limit),)).fetchall()
        return [(float(ts), str(k), int(n)) for ts, k, n in reversed(rows)]

    def access_since(self, after: int, c: sqlite3.Connection | None = None) -> list[tuple[int, float, str, int]]:
        """Access-log rows (id, ts, key, size) newer than id `after`, oldest first."""
        return [(int(i), float(ts), str(k), int(n)) for i, ts, k, n in self._c(c).execute(
            "SELECT id, ts, key, size FROM access_log WHERE id > ? ORDER BY id", (after,))]

    def access_row(self, row_id: int) -> tuple[float, str] | None:
        """(ts, key) of one access-log row, None if the log does not hold it."""
        row = self.conn().execute("SELECT ts, key FROM access_log WHERE id=?", (row_id,)).fetchone()
        return (float(row[0]), str(row[1])) if row else None

    def last_access_id(self) -> int:
        row = self.conn().execute("SELECT MAX(id) FROM access_log").fetchone()
        return int(row[0] or 0)

    # ----------------------------------------------------------------- rows owned by processes
    def process_rows(self, table: str, c: sqlite3.Connection | None = None) -> list[tuple[int, str, int, int, str]]:
        """(id, key, nbytes or 0, pid, pstart) of every reservation or lease, live or dead."""
        if table not in _PROCESS_TABLES:
            raise ValueError(f"not a table of process rows: {table}")
        size = "nbytes" if table == "reservations" else "0"
        return self._c(c).execute(f"SELECT id, key, {size}, pid, pstart FROM {table}").fetchall()

    def live_leases(self, c: sqlite3.Connection | None = None) -> set[str]:
        """Keys leased by running processes (files being read now)."""
        return {k for _i, k, _n, pid, ps in self.process_rows("leases", c) if proc_alive(pid, ps)}

    def live_reservations(self, c: sqlite3.Connection | None = None) -> list[tuple[int, str, int]]:
        """(id, key, bytes) of room promised to downloads of running processes."""
        return [(i, k, n) for i, k, n, pid, ps in self.process_rows("reservations", c) if proc_alive(pid, ps)]

    def drop_process_row(self, table: str, row_id: int, c: sqlite3.Connection | None = None) -> None:
        if table not in _PROCESS_TABLES:
            raise ValueError(f"not a table of process rows: {table}")
        if c is not None:
            c.execute(f"DELETE FROM {table} WHERE id=?", (row_id,))
        else:
            self.execute(f"DELETE FROM {table} WHERE id=?", (row_id,))

    def reap(self, c: sqlite3.Connection) -> None:
        """Forget reservations and leases of processes that died without releasing them."""
        for table in _PROCESS_TABLES:
            dead = [(i,) for i, _k, _n, pid, ps in self.process_rows(table, c) if not proc_alive(pid, ps)]
            if dead:
                c.executemany(f"DELETE FROM {table} WHERE id=?", dead)

    def add_reservation(self, c: sqlite3.Connection, key: str, nbytes: int, now: float) -> int:
        pid, pstart = self_proc()
        cur = c.execute("INSERT INTO reservations(key, nbytes, pid, pstart, created) VALUES(?,?,?,?,?)",
                        (key, nbytes, pid, pstart, now))
        return int(cur.lastrowid or 0)

    def drop_own_reservations(self, c: sqlite3.Connection, key: str) -> None:
        """This process's reservations for `key` (its download committed)."""
        c.execute("DELETE FROM reservations WHERE key=? AND pid=?", (key, self_proc()[0]))

    def add_lease(self, key: str, token: str, now: float) -> int:
        pid, pstart = self_proc()
        cur = self.execute("INSERT INTO leases(key, pid, pstart, token, created) VALUES(?,?,?,?,?)",
                           (key, pid, pstart, token, now))
        return int(cur.lastrowid or 0)
