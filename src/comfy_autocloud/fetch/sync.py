"""`autocloud manifest sync URL`: bring a directory of model lists up to a published versions index.

Every node compares its lists with `{list: {url, md5|sha256, version}}` and downloads
only the changed ones. Here that is made safe to run on a live node:

1. the index and every changed list are downloaded through the fetch service into a staging folder
   `<dir>/.sync-XXXX/` (same filesystem, so the final step is renames);
2. each list is checked against the index's hash, parsed with the strict `load_manifest`, and the whole
   new set is merged once (contradictions between lists are caught before anything changes);
3. a journal `<dir>/.sync-journal.json` is written atomically, then the lists are renamed into place,
   lists a previous sync installed and the index no longer names are removed, the index is saved as
   `<dir>/model_versions.json`, and the journal is deleted.

Any failure before step 3 (bad index, 404, hash mismatch, invalid list) leaves the directory exactly as
it was: the last good lists keep serving. A sync killed during step 3 is rolled forward from the
journal by the next sync or the next reader. Everything happens under an exclusive `flock` on the
directory; readers (`locked_view`) take a shared one, so a ComfyUI adapter never loads a half-applied set.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from comfy_autocloud.errors import AutoCloudError, ManifestError, TransferError
from comfy_autocloud.fsutil import fsync_dir
from comfy_autocloud.manifest.common import decode_utf8, parse_json_text, read_bytes
from comfy_autocloud.manifest.load import load_manifest, load_manifests
from comfy_autocloud.manifest.locality import check_network_list, check_source, is_network_source
from comfy_autocloud.manifest.versions import VersionedList, matches, stale_lists, versions_from_data
from comfy_autocloud.manifest.write import write_atomic
from comfy_autocloud.progress import CancelToken, ProgressCallback
from comfy_autocloud.redact import redact_url

if TYPE_CHECKING:
    from comfy_autocloud.fetch.service import FetchService

log = logging.getLogger(__name__)

INDEX_NAME = "model_versions.json"
JOURNAL_NAME = ".sync-journal.json"
STAGE_PREFIX = ".sync-"
MAX_LIST_BYTES = 64 * 2**20  # a model list is metadata: refuse anything this large before parsing it

Action = Literal["added", "updated", "removed", "unchanged"]


@dataclass(frozen=True)
class ListChange:
    name: str
    action: Action
    path: str
    old_version: str | None = None
    new_version: str | None = None


@dataclass
class SyncReport:
    index: str  # redacted
    directory: str
    changes: list[ListChange] = field(default_factory=list)
    entries: int = 0  # model entries the synced lists define together

    @property
    def changed(self) -> bool:
        return any(c.action != "unchanged" for c in self.changes)

    def as_json(self) -> dict[str, Any]:
        return {"index": self.index, "directory": self.directory, "changed": self.changed,
                "entries": self.entries, "lists": [asdict(c) for c in self.changes]}


def as_source(text: str) -> str:
    """A local path (relative or absolute) becomes a file:// source; URLs pass through."""
    if "://" in text or text.lower().startswith("civitai:"):
        return text
    return Path(text).expanduser().absolute().as_uri()


@contextlib.contextmanager
def _flock(directory: Path, kind: int) -> Iterator[None]:
    """flock on the directory itself: its files are replaced by rename, so none of them can hold a lock."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, kind)
        yield
    finally:
        os.close(fd)


def _apply(directory: Path, journal: dict[str, Any]) -> None:
    """Roll a journal forward (idempotent: a file already moved is simply not in the stage any more)."""
    stage = directory / journal["stage"]
    for name in journal["install"]:
        src = stage / name
        if src.exists():
            os.replace(src, directory / name)
    for name in journal["remove"]:
        with contextlib.suppress(FileNotFoundError):
            (directory / name).unlink()
    index = stage / INDEX_NAME
    if index.exists():
        os.replace(index, directory / INDEX_NAME)
    fsync_dir(directory)
    with contextlib.suppress(FileNotFoundError):
        (directory / JOURNAL_NAME).unlink()
    shutil.rmtree(stage, ignore_errors=True)
    fsync_dir(directory)


def _safe_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and "/" not in name and name not in (".", "..") and "\x00" not in name


def recover(directory: Path) -> bool:
    """Finish a sync that was killed while renaming; drop stages of syncs killed before that. Caller holds
    the exclusive lock. Returns True when a journal was rolled forward."""
    journal_path = directory / JOURNAL_NAME
    rolled = False
    if journal_path.exists():
        try:
            journal = json.loads(journal_path.read_text(encoding="utf-8"))
            names = [journal["stage"], *journal["install"], *journal["remove"]]
            if not all(_safe_name(n) for n in names) or not journal["stage"].startswith(STAGE_PREFIX):
                raise ValueError("unexpected names")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("autocloud: ignoring unreadable sync journal %s: %s", journal_path, exc)
            journal_path.unlink()
        else:
            log.warning("autocloud: finishing an interrupted manifest sync in %s", directory)
            _apply(directory, journal)
            rolled = True
    for stale in directory.glob(f"{STAGE_PREFIX}*"):
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
    return rolled


@contextlib.contextmanager
def locked_view(directory: Path) -> Iterator[None]:
    """Read a synced directory consistently: finish an interrupted sync first, then hold a shared lock."""
    directory = Path(directory)
    if (directory / JOURNAL_NAME).exists() and os.access(directory, os.W_OK):
        with _flock(directory, fcntl.LOCK_EX):
            recover(directory)
    with _flock(directory, fcntl.LOCK_SH):
        yield


def _about(exc: AutoCloudError, subject: str) -> AutoCloudError:
    """The same error, about the list or index (not the staging file); the last good lists are kept."""
    reason = f"{exc.reason}; the last good lists are kept"
    if isinstance(exc, TransferError):
        return type(exc)(subject, reason, status=exc.status, retryable=exc.retryable)
    return type(exc)(subject, reason)


def _kept(check: Callable[..., None], *args: Any) -> None:
    """Run a locality check; its ManifestError says that the last good lists are kept."""
    try:
        check(*args)
    except ManifestError as exc:
        raise ManifestError(exc.subject, f"{exc.reason}; the last good lists are kept") from None


def _read_index(path: Path, where: str) -> list[VersionedList]:
    return versions_from_data(parse_json_text(decode_utf8(read_bytes(path), where), where), where)


def _saved_index(directory: Path) -> dict[str, VersionedList]:
    path = directory / INDEX_NAME
    if not path.exists():
        return {}
    try:
        return {v.name: v for v in _read_index(path, str(path))}
    except ManifestError as exc:
        log.warning("autocloud: the saved index is unreadable (%s); treating every list as new", exc.reason)
        return {}


def _fetch_list(fetch: FetchService, v: VersionedList, stage: Path, progress: ProgressCallback | None,
                cancel: CancelToken | None) -> Path:
    """Download one list into the stage, check its hash(es) and parse it; the path of the checked file."""
    part = stage / f"{v.filename}.part"
    shown = redact_url(v.url)
    try:
        fetch.download_to(v.url, part, sha256=v.sha256, key=f"manifest {v.name}", progress=progress,
                          cancel=cancel, max_size=MAX_LIST_BYTES)
    except AutoCloudError as exc:
        raise _about(exc, f"list {v.name!r} from {shown}") from None
    staged = stage / v.filename
    os.replace(part, staged)
    if not matches(v, staged):
        raise ManifestError(f"list {v.name!r} from {shown}",
                            "content does not have the md5/sha256 the index gives (a stale CDN copy or a "
                            "partial upload?); the last good list is kept")
    try:
        load_manifest(staged)
    except ManifestError as exc:
        raise ManifestError(f"list {v.name!r} from {shown}",
                            f"not a valid model list ({exc.reason}); the last good list is kept") from None
    return staged


def sync_manifests(index_url: str, directory: Path, fetch: FetchService, *,
                   progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                   local_dirs: Sequence[str] = ()) -> SyncReport:
    """Make `directory` hold exactly the lists the index names, at the hashes it gives (all or nothing).

    An index fetched over the network may name, for its lists and their entries, only network sources,
    or local files inside `local_dirs` (manifest.locality).
    """
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    source = as_source(index_url)
    shown = redact_url(source)
    report = SyncReport(index=shown, directory=str(directory))
    with _flock(directory, fcntl.LOCK_EX):
        recover(directory)
        stage = Path(tempfile.mkdtemp(prefix=STAGE_PREFIX, dir=directory))
        try:
            part = stage / f"{INDEX_NAME}.part"
            try:
                fetch.download_to(source, part, key="manifest index", progress=progress, cancel=cancel,
                                  max_size=MAX_LIST_BYTES)
            except AutoCloudError as exc:
                raise _about(exc, f"versions index {shown}") from None
            os.replace(part, stage / INDEX_NAME)
            try:
                index = _read_index(stage / INDEX_NAME, f"versions index {shown}")
            except ManifestError as exc:
                raise ManifestError(exc.subject, f"{exc.reason}; the last good lists are kept") from None
            network = is_network_source(source)
            for v in index if network else ():
                _kept(check_source, v.url, f"versions index {shown}: list {v.name!r}", local_dirs)
            names = [v.filename for v in index]
            if len(set(names)) != len(names) or INDEX_NAME in names:
                raise ManifestError(f"versions index {shown}",
                                    f"two lists map to the same file, or a list is named like the index "
                                    f"({INDEX_NAME}); the last good lists are kept")
            previous = _saved_index(directory)
            stale = {v.name for v in stale_lists(index, directory)}
            staged: dict[str, Path] = {}
            for v in index:
                if v.name in stale:
                    staged[v.name] = _fetch_list(fetch, v, stage, progress, cancel)
            final_set = [staged.get(v.name, directory / v.filename) for v in index]
            try:
                merged = load_manifests(final_set)
            except ManifestError as exc:
                raise ManifestError(f"versions index {shown}",
                                    f"the new lists contradict each other ({exc.subject}: {exc.reason}); "
                                    "the last good lists are kept") from None
            if network:
                _kept(check_network_list, merged, f"a list of {shown}", local_dirs)
            report.entries = len(merged)
            gone = [p for name, p in previous.items() if name not in {v.name for v in index}]
            removed = [p.filename for p in gone if (directory / p.filename).exists()
                       and p.filename not in names]
            for v in index:
                old = previous.get(v.name)
                action: Action = "unchanged"
                if v.name in staged:
                    action = "updated" if (directory / v.filename).exists() else "added"
                report.changes.append(ListChange(v.name, action, str(directory / v.filename),
                                                 old.version if old else None, v.version))
            for p in gone:
                report.changes.append(ListChange(p.name, "removed", str(directory / p.filename), p.version, None))
            journal = {"stage": stage.name, "install": [staged[n].name for n in staged], "remove": removed}
            write_atomic(directory / JOURNAL_NAME, json.dumps(journal))
            _apply(directory, journal)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    if report.changed:
        log.info("autocloud: manifest sync %s: %s", shown,
                 ", ".join(f"{c.name} {c.action}" for c in report.changes if c.action != "unchanged"))
    return report


def directory_signature(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    """(path, mtime_ns, size) of every manifest file under `paths` (and the directories themselves):
    what the adapter's watcher compares to notice a sync or an edit."""
    out: list[tuple[str, int, int]] = []
    for p in paths:
        try:
            st = p.stat()
        except OSError:
            out.append((str(p), -1, -1))
            continue
        out.append((str(p), st.st_mtime_ns, st.st_size))
        if p.is_dir():
            for child in sorted(p.iterdir()):
                if child.is_file() and not child.name.startswith("."):
                    with contextlib.suppress(OSError):
                        cst = child.stat()
                        out.append((str(child), cst.st_mtime_ns, cst.st_size))
    return tuple(out)


__all__ = ["INDEX_NAME", "JOURNAL_NAME", "ListChange", "SyncReport", "as_source", "directory_signature",
           "locked_view", "recover", "sync_manifests"]
