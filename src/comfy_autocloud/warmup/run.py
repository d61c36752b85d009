"""Warmup: copy hot models from the slow volume into a Store on local NVMe, then warm RAM.

"Already identical" is the volume file's size + mtime recorded as the entry's etag when it was copied
(rsync's quick check), so a rerun stats 2 files per entry, copies nothing and imports no network or
validation stack; a changed volume file is copied again. The copies themselves (copier.py) keep the
store's guarantees: single-flight across processes, room reserved before the first byte, atomic
rename (a killed warmup never leaves a half file at a final path). The sha256 the store records comes
from the volume's hash sidecar (hashes.py) when an earlier warmup hashed the file; else, by default
(`--hash later`), the file is committed without one and a detached hasher (hash_later.py) computes it
from the page cache at the lowest CPU priority after warmup returns, recording it in the index and the
sidecar (hashing on the critical path made a first warmup 0.70x `cp`); `--hash now` hashes while copying.

Durability (`--durability`, Store.commit): by default ("deferred") nothing waits for the disk, as with
`cp`: the files are complete in the page cache and at their final paths when warmup returns, each
entry is recorded as unsettled in this boot, and a detached process (store/settle.py) flushes the
cache's file system once (syncfs) and then settles them. Should the machine go down before that, the
next lookup or `verify` (in the next boot) reads such a file back against its sha256 before ComfyUI may
use it, so a power cut costs a re-check, never a corrupt model. "durable" fsyncs every file before its
rename instead (writeback started block by block during the copy so the disk writes overlap the reads):
on this disk it cannot beat `cp -r && sync`, as the disk's write rate is the floor either way.
"ephemeral", for a cache that dies with the machine (a RunPod pod's container disk), skips the flush
and the marks.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from comfy_autocloud.detach import run_detached
from comfy_autocloud.errors import ManifestError, StoreError
from comfy_autocloud.manifest.warmup_conf import WarmupEntry, parse_warmup_conf
from comfy_autocloud.progress import CancelToken, ProgressCallback, ProgressEvent
from comfy_autocloud.store.durability import DURABILITIES, Durability
from comfy_autocloud.warmup import memo, pagecache
from comfy_autocloud.warmup.copier import FileOutcome, copy_items, current
from comfy_autocloud.warmup.extra_paths import MergeResult, merge_extra_paths, search_order, section_folders
from comfy_autocloud.warmup.plan import Plan, WarmupItem, build_plan, volume_identity

if TYPE_CHECKING:  # a rerun that its memo proves current imports neither the store nor SQLite
    from comfy_autocloud.store import Entry, Store

DEFAULT_COMFYUI = "/workspace/ComfyUI"
DEFAULT_CACHE = "/root/fast_cache"
DEFAULT_CONF = "warmup_models.conf"
STATE_DIR = "warmup"  # inside the store's private dir: never a model key, skipped by `verify`
DURABILITY_ENV = "AUTOCLOUD_WARMUP_DURABILITY"
DEFAULT_DURABILITY: Durability = "deferred"
Hashing = Literal["later", "now"]
HASHINGS: tuple[Hashing, ...] = ("later", "now")
HASHING_ENV = "AUTOCLOUD_WARMUP_HASH"
DEFAULT_HASHING: Hashing = "later"
T = TypeVar("T", bound=str)


def durability_from(value: str | None, env: Mapping[str, str] | None = None) -> Durability:
    """The option, else $AUTOCLOUD_WARMUP_DURABILITY, else "deferred"; an unknown name is an error."""
    return _choice(value, "--durability", DURABILITY_ENV, DEFAULT_DURABILITY, DURABILITIES, "durability", env)


def hashing_from(value: str | None, env: Mapping[str, str] | None = None) -> Hashing:
    """The option, else $AUTOCLOUD_WARMUP_HASH, else "later"; an unknown name is an error."""
    return _choice(value, "--hash", HASHING_ENV, DEFAULT_HASHING, HASHINGS, "hashing", env)


def _choice(value: str | None, option: str, env_name: str, default: T, known: tuple[T, ...], what: str,
            env: Mapping[str, str] | None) -> T:
    """One of `known`: the option's value, else the environment variable's, else `default`; an unknown
    name is an error naming where it came from."""
    env = os.environ if env is None else env
    raw = (value or env.get(env_name) or default).strip().lower()
    for name in known:
        if raw == name:
            return name
    raise ManifestError(env_name if not value else option, f"unknown {what} {raw!r} (known: {', '.join(known)})")


@dataclass(frozen=True)
class WarmupPaths:
    """Where the volume's ComfyUI and the fast cache are (seed env: COMFYUI_PATH, CACHE_PATH)."""

    comfyui: Path
    cache: Path

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, *, comfyui: str | Path | None = None,
                 cache: str | Path | None = None) -> WarmupPaths:
        env = os.environ if env is None else env
        c = comfyui or env.get("COMFYUI_PATH") or DEFAULT_COMFYUI
        k = cache or env.get("CACHE_PATH") or DEFAULT_CACHE
        return cls(Path(c).expanduser().absolute(), Path(k).expanduser().absolute())

    @property
    def models(self) -> Path:
        return self.comfyui / "models"

    @property
    def extra_paths_yaml(self) -> Path:
        return self.comfyui / "extra_model_paths.yaml"

    @property
    def yaml_memo(self) -> Path:
        """What the last merge found current in the yaml (extra_paths.merge_extra_paths' memo). On the volume,
        beside the hash sidecar, like the yaml it describes: a new pod's empty cache does not lose it, so its
        first warmup compares bytes instead of importing and parsing YAML."""
        return self.models / ".autocloud" / "extra_model_paths.current"

    @property
    def state_dir(self) -> Path:
        return self.cache / ".autocloud" / STATE_DIR

    @property
    def volume_prefix(self) -> str:
        """How the store's `source` column starts for files warmup copied from this volume."""
        return f"file://{self.models}/"


def runpod_dir() -> Path | None:
    """`runpod/` of a cloned checkout (the wrappers also export AUTOCLOUD_RUNPOD_DIR)."""
    env = os.environ.get("AUTOCLOUD_RUNPOD_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parents[3] / "runpod"  # <repo>/src/comfy_autocloud/warmup/run.py
    return here if here.is_dir() else None


def resolve_conf(name: str | Path | None, paths: WarmupPaths, env: Mapping[str, str] | None = None) -> Path:
    """The warmup list: as given (or $WARMUP_CONFIG), tried in cwd, the runpod dir, then COMFYUI_PATH."""
    env = os.environ if env is None else env
    raw = Path(str(name or env.get("WARMUP_CONFIG") or DEFAULT_CONF)).expanduser()
    if raw.is_absolute():
        candidates = [raw]
    else:
        rp = runpod_dir()
        candidates = [Path.cwd() / raw, *([rp / raw] if rp else []), paths.comfyui / raw]
    for c in candidates:
        if c.is_file():
            return c
    raise ManifestError(str(raw), "warmup list not found; looked in " + ", ".join(str(c) for c in candidates))


def load_plan(conf: Path, paths: WarmupPaths) -> Plan:
    return build_plan(parse_warmup_conf(conf), paths.models)


# ------------------------------------------------------------------------------------------------- copy

@dataclass
class WarmupReport:
    outcomes: list[FileOutcome] = field(default_factory=list)
    seconds: float = 0.0
    warmed_bytes: int = 0
    warming_bytes: int = 0  # of warmed_bytes, what a detached reader is still reading into the page cache
    setup: MergeResult | None = None

    @property
    def failed(self) -> list[FileOutcome]:
        return [o for o in self.outcomes if o.status in ("failed", "missing")]

    @property
    def bytes_copied(self) -> int:
        return sum(o.bytes_copied for o in self.outcomes)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> dict[str, Any]:
        counts: dict[str, int] = {}
        for o in self.outcomes:
            counts[o.status] = counts.get(o.status, 0) + 1
        return {"files": len(self.outcomes), **counts, "bytes_copied": self.bytes_copied,
                "bytes_total": sum(o.size for o in self.outcomes if o.status not in ("failed", "missing")),
                "seconds": round(self.seconds, 4),
                "rate": round(self.bytes_copied / self.seconds) if self.seconds > 0 else 0,
                "hash_pending": sum(1 for o in self.outcomes if o.hash_pending),
                "page_cache_bytes": self.warmed_bytes, "page_cache_background_bytes": self.warming_bytes,
                "setup": self.setup.as_dict() if self.setup else None}


class TotalProgress:
    """Forwards per-file events and adds one 'total' bar (bytes over all files, so its speed is the total)."""

    def __init__(self, inner: ProgressCallback, total: int, label: str) -> None:
        self.inner = inner
        self.total = total
        self.label = label
        self._done: dict[str, int] = {}
        self._lock = threading.Lock()
        inner(ProgressEvent(label, "start", 0, total))  # the total bar first, above the files

    def __call__(self, ev: ProgressEvent) -> None:
        self.inner(ev)
        with self._lock:
            if ev.phase == "error":
                self._done.pop(ev.key, None)
            elif ev.phase in ("hit", "start", "download", "commit", "done"):
                self._done[ev.key] = ev.bytes_done
            done = sum(self._done.values())
        self.inner(ProgressEvent(self.label, "download", min(done, self.total), self.total))


def run_warmup(store: Store, plan: Plan, *, parallel: int = 4, progress: ProgressCallback | None = None,
               cancel: CancelToken | None = None, warm_page_cache: bool = True,
               durability: Durability = DEFAULT_DURABILITY, hashing: Hashing = DEFAULT_HASHING,
               memo_dir: Path | None = None) -> WarmupReport:
    """Copy every planned file not already cached as it is on the volume; report each file.

    `hashing` "later": files the volume's hash sidecar does not know are committed without a sha256 and a
    detached hasher (hash_later.py) computes it after this returns; "now": while copying.

    A cached entry whose recorded identity differs (the volume file changed, or the entry came from
    another source such as a download) is replaced: the list names the volume file. Files already
    current cost a lookup each; the hash sidecar is read only when something must be copied.
    `memo_dir`: where to write the rerun memo (memo.py) when every file ended up current, so that the
    next rerun (`rerun_from_memo`) need not open the store.
    """
    t0 = time.perf_counter()
    report = WarmupReport()
    by_key: dict[str, FileOutcome] = {}
    todo: list[WarmupItem] = []
    for item in plan.items:
        done = current(store, item, progress)
        if done is not None:
            by_key[item.key] = done
        else:
            todo.append(item)
    if todo:
        from comfy_autocloud.warmup.hashes import HashBook  # here: a rerun with nothing to copy reads no sidecar

        book = HashBook(plan.models_dir)
        for outcome in copy_items(store, todo, book, parallel=parallel, durability=durability,
                                  hash_later=hashing == "later", progress=progress, cancel=cancel):
            by_key[outcome.key] = outcome
        book.save()
        if durability == "deferred" and any(by_key[i.key].status in ("copied", "recopied") for i in todo):
            store.settle_in_background()
        if any(by_key[i.key].hash_pending for i in todo):
            from comfy_autocloud.warmup import hash_later  # not at the top: it is also `python -m`'s main module

            hash_later.start(store.root, plan.models_dir)

    report.outcomes = [by_key[i.key] for i in plan.items]
    report.outcomes += [FileOutcome(m.key, "missing", error=m.reason, line=m.line) for m in plan.missing]
    if memo_dir is not None:
        memo.save(memo_dir, store, plan)
    if warm_page_cache:
        warmed = pagecache.warm((store.path_for(o.key) for o in report.outcomes
                                 if o.status in ("copied", "recopied", "cached")), background=True)
        report.warmed_bytes, report.warming_bytes = warmed.bytes, warmed.background_bytes
    report.seconds = time.perf_counter() - t0
    return report


def rerun_from_memo(plan: Plan, paths: WarmupPaths, open_store: Callable[[], Store], *,
                    progress: ProgressCallback | None = None, warm_page_cache: bool = True) -> WarmupReport | None:
    """`run_warmup`'s report for a rerun its memo proves has nothing to copy, without opening the store;
    None when the memo proves nothing (then `run_warmup` decides, through the store).

    The store is opened (`open_store`) by a detached process, which records the files' accesses (as
    `run_warmup` does for files already current) and writes the memo again; the page-cache reads, if any
    are needed, follow in that same process. A caller that has SQLite loaded records them itself.
    """
    t0 = time.perf_counter()
    proven = memo.load(paths.state_dir, paths.cache, plan)
    if proven is None:
        return None
    report = WarmupReport(outcomes=[o for o, _ in proven])
    if progress is not None:
        for o in report.outcomes:
            progress(ProgressEvent(o.key, "hit", o.size, o.size))

    def record_accesses() -> None:
        memo.touch_and_save(paths.state_dir, open_store(), plan)

    # A forked child must not use SQLite state it inherited (a connection open in a library caller that
    # already holds stores): where this process has loaded SQLite, the accesses are recorded here.
    detach = "sqlite3" not in sys.modules
    if not detach:
        record_accesses()
    if warm_page_cache:
        warmed = pagecache.warm((p for _, p in proven), background=True,
                                first=record_accesses if detach else None)
        report.warmed_bytes, report.warming_bytes = warmed.bytes, warmed.background_bytes
    elif detach and not run_detached(record_accesses):
        record_accesses()
    report.seconds = time.perf_counter() - t0
    return report


def setup_extra_paths(paths: WarmupPaths, plan: Plan | None = None) -> MergeResult:
    """Merge our cache-first section into `<COMFYUI_PATH>/extra_model_paths.yaml`."""
    if not paths.comfyui.is_dir():
        raise ManifestError(str(paths.comfyui), "ComfyUI not found here, so there is no extra_model_paths.yaml "
                                                "to set up (set COMFYUI_PATH)")
    cached_folders: list[str] = []
    if paths.cache.is_dir():
        cached_folders = [p.name for p in paths.cache.iterdir() if p.is_dir() and not p.name.startswith(".")]
    folders = section_folders(plan.folders if plan else (), cached_folders)
    return merge_extra_paths(paths.extra_paths_yaml, paths.cache, folders,
                             memo=paths.yaml_memo)


# ------------------------------------------------------------------------------------------------- --list

@dataclass(frozen=True)
class ListRow:
    line: str  # 'conf:line'
    pattern: str  # 'folder/pattern' as written
    key: str  # the file ('folder/filename'); the pattern itself for a line that selected nothing
    on_volume: bool
    cache: Literal["yes", "stale", "no"]
    size: int | None
    in_ram: int | None  # bytes of the cached copy resident in the page cache
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_rows(plan: Plan, store: Store) -> list[ListRow]:
    """For each list line (globs expanded): on the volume? in the cache, and is it the same file?"""
    rows: list[ListRow] = []
    reasons = {(m.line, m.key): m.reason for m in plan.missing}
    for entry, items in plan.lines:
        for item in items:
            e = store.lookup(item.key)
            state: Literal["yes", "stale", "no"] = "no" if e is None else (
                "yes" if e.etag == item.identity else "stale")
            rows.append(ListRow(entry.defined_in, entry.key, item.key, True, state, item.size,
                                _in_ram(e), "" if state != "stale" else "the volume file changed since the copy"))
        if not items:
            rows.append(_missing_row(entry, store, reasons))
    return rows


def _missing_row(entry: WarmupEntry, store: Store, reasons: dict[tuple[str, str], str]) -> ListRow:
    e = None
    if not entry.is_glob:
        try:
            e = store.lookup(entry.key)
        except StoreError:
            e = None
    reason = next((r for (line, _k), r in reasons.items() if line == entry.defined_in), "not on the volume")
    return ListRow(entry.defined_in, entry.key, entry.key, False, "no" if e is None else "yes",
                   e.size if e else None, _in_ram(e), reason)


def _in_ram(e: Entry | None) -> int | None:
    if e is None:
        return None
    try:
        return pagecache.resident_bytes(e.path)
    except OSError:
        return None


# ------------------------------------------------------------------------------------------------- --status / --clean

def warmup_entries(store: Store, paths: WarmupPaths) -> list[Entry]:
    """Cache entries warmup copied from this volume (file:// sources under `<COMFYUI_PATH>/models/`)."""
    return [e for e in store.entries() if e.source.startswith(paths.volume_prefix)]


def status_info(store: Store, paths: WarmupPaths) -> dict[str, Any]:
    """Space on both sides, what warmup holds, whether ComfyUI is set to read the cache first, any job."""
    usage = store.usage()
    ours = warmup_entries(store, paths)
    info: dict[str, Any] = {
        "cache": {"path": str(paths.cache), "disk_free": usage.disk_free, "disk_total": usage.disk_total,
                  "entries": usage.entries, "bytes": usage.bytes, "cap": usage.cap,
                  "warmup_entries": len(ours), "warmup_bytes": sum(e.size for e in ours)},
        "volume": {"path": str(paths.models), "exists": paths.models.is_dir()},
        "extra_model_paths": _yaml_state(paths),
        "background": background_state(paths),
    }
    if paths.models.is_dir():
        import shutil  # here: a rerun needs none (shutil brings zlib, bz2 and lzma)

        du = shutil.disk_usage(paths.models)
        info["volume"].update(disk_free=du.free, disk_total=du.total)
    return info


def _yaml_state(paths: WarmupPaths) -> dict[str, Any]:
    y = paths.extra_paths_yaml
    state: dict[str, Any] = {"path": str(y), "exists": y.is_file(), "cache_first": False}
    if y.is_file():
        try:
            order = search_order(y.read_text(encoding="utf-8"), y.parent, "checkpoints", paths.models / "checkpoints")
            state["cache_first"] = order[0] == paths.cache / "checkpoints"
        except (OSError, UnicodeDecodeError, ManifestError) as exc:
            state["error"] = str(exc)
    return state


@dataclass
class CleanResult:
    removed: list[Entry] = field(default_factory=list)
    kept: list[tuple[Entry, str]] = field(default_factory=list)

    @property
    def bytes_freed(self) -> int:
        return sum(e.size for e in self.removed)


def clean(store: Store, paths: WarmupPaths) -> CleanResult:
    """Remove what warmup copied from this volume; pinned or in-use files stay (and are reported)."""
    result = CleanResult()
    for e in warmup_entries(store, paths):
        try:
            result.removed.append(store.evict(e.key))
        except StoreError as exc:
            result.kept.append((e, exc.reason))
    return result


# ------------------------------------------------------------------------------------------------- --background

def _pid_file(paths: WarmupPaths) -> Path:
    return paths.state_dir / "background.pid"


def log_file(paths: WarmupPaths) -> Path:
    return paths.state_dir / "background.log"


def background_state(paths: WarmupPaths) -> dict[str, Any] | None:
    """The detached warmup job: pid, whether it still runs, its log; None if there never was one."""
    from comfy_autocloud.store.index import proc_alive

    try:
        pid_s, _, pstart = _pid_file(paths).read_text().strip().partition(" ")
        pid = int(pid_s)
    except (OSError, ValueError):
        return None
    return {"pid": pid, "running": proc_alive(pid, pstart), "log": str(log_file(paths))}


def start_background(argv: list[str], paths: WarmupPaths, env: Mapping[str, str]) -> dict[str, Any]:
    """Start `argv` (a foreground warmup) detached from this process and terminal; record its pid.

    The child rewrites the pid file with its start time (`record_pid`) so a recycled pid never looks
    like a running warmup.
    """
    import subprocess

    state = background_state(paths)
    if state and state["running"]:
        return {**state, "started": False}
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    log = log_file(paths)
    with open(log, "ab") as out:
        out.write(f"--- warmup started {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n".encode())
        out.flush()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=dict(env), start_new_session=True, close_fds=True)
    state = background_state(paths)
    if not state or state["pid"] != proc.pid:  # the child may already have written it, with its start time
        _write_pid(paths, proc.pid, "")
    return {"pid": proc.pid, "running": True, "log": str(log), "started": True}


def _write_pid(paths: WarmupPaths, pid: int, pstart: str) -> None:
    paths.state_dir.mkdir(parents=True, exist_ok=True)
    tmp = _pid_file(paths).with_name(f"background.pid.{pid}.tmp")
    tmp.write_text(f"{pid} {pstart}\n")
    os.replace(tmp, _pid_file(paths))


def record_pid(paths: WarmupPaths) -> None:
    """Called in the background child: the pid file names this process with its start time."""
    from comfy_autocloud.store.index import self_proc

    pid, pstart = self_proc()
    _write_pid(paths, pid, pstart)


def identity_of(path: Path) -> str:
    """Volume identity of a file now (what a fresh copy would record)."""
    st = os.stat(path)
    return volume_identity(st.st_size, st.st_mtime_ns)
