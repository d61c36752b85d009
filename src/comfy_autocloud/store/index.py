"""The SQLite index under `<cache>/.autocloud/index.sqlite`: one connection per thread and process.

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

from comfy_autocloud.errors import StoreError

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
CREATE TABLE IF NOT EXISTS access_log (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    key TEXT NOT NULL,
    size INTEGER NOT NULL
);
"""

BUSY_TIMEOUT_MS = 30_000
_MAX_ATTEMPTS = 20


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

    def _retry(self, fn: Callable[[], object]) -> object:
        for attempt in range(_MAX_ATTEMPTS):
            try:
                return fn()
            except sqlite3.OperationalError as exc:
                msg = str(exc).lower()
                if ("locked" not in msg and "busy" not in msg) or attempt == _MAX_ATTEMPTS - 1:
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
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            raise
        self._retry(lambda: conn.execute("COMMIT"))

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
