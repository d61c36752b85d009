"""Zip bundles: several models in one download, e.g. the five LoRAs of one style.

Asking for any member downloads the zip once (single-flight on the bundle's name; the fetch service's
engine, resumable, into the store's partial area), checks the zip's sha256 when given, then checks the
whole archive before writing a byte: every entry name is a safe relative path (no '..', no absolute
path, no backslash), no symlinks, no duplicate names, no encryption, declared sizes within limits and
no zip-bomb compression ratios. Each listed member is then streamed into its own partial file, hashed
(its own sha256 when given; else the verified zip vouches for it), and only when every member checks
out are they committed one by one through `Store.commit` (atomic rename each). The zip is deleted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
import time
import zipfile
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_autocloud.errors import AutoCloudError, Cancelled, IntegrityError, NotEnoughSpace, TransferError
from comfy_autocloud.fetch.request import FetchRequest, FetchResult
from comfy_autocloud.fetch.singleflight import single_flight
from comfy_autocloud.keys import check_relpath, split_key
from comfy_autocloud.manifest.spec import Bundle, BundleMember, ModelSpec
from comfy_autocloud.progress import CancelToken, ProgressEvent
from comfy_autocloud.store import Entry
from comfy_autocloud.transfer import discard_partial

if TYPE_CHECKING:  # the service imports this module; this one only needs its public methods
    from comfy_autocloud.fetch.fleet_path import FleetPath, Tried
    from comfy_autocloud.fetch.service import FetchService

log = logging.getLogger(__name__)

MAX_RATIO = 100  # uncompressed/compressed per member; safetensors barely compress, bombs compress ~1000x
RATIO_FLOOR = 4 * 2**20  # members smaller than this are not ratio-checked (tiny JSON/text files compress well)
MAX_MEMBERS = 10_000
CHUNK = 4 * 2**20


@dataclass(frozen=True)
class CheckedMember:
    member: BundleMember
    info: zipfile.ZipInfo


def check_archive(zf: zipfile.ZipFile, bundle: Bundle, *, zip_size: int) -> list[CheckedMember]:
    """Refuse a hostile or mismatching zip before extracting anything; the listed members, located."""
    subject = f"bundle {bundle.name}"
    infos = zf.infolist()
    if len(infos) > MAX_MEMBERS:
        raise IntegrityError(subject, f"has {len(infos)} entries (more than {MAX_MEMBERS})")
    names = Counter(i.filename for i in infos)
    dup = sorted(n for n, c in names.items() if c > 1)
    if dup:
        raise IntegrityError(subject, f"zip entry {dup[0]!r} appears twice (which one would be extracted?)")
    total = 0
    for info in infos:
        name = info.filename.rstrip("/") if info.is_dir() else info.filename
        try:
            check_relpath(name, "zip entry")
        except ValueError as exc:
            raise IntegrityError(subject, f"unsafe zip entry: {exc}") from None
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise IntegrityError(subject, f"zip entry {info.filename!r} is a symbolic link")
        if info.flag_bits & 0x1:
            raise IntegrityError(subject, f"zip entry {info.filename!r} is encrypted")
        if info.file_size > RATIO_FLOOR and info.file_size > MAX_RATIO * max(1, info.compress_size):
            raise IntegrityError(subject, f"zip entry {info.filename!r} expands {info.file_size} bytes from "
                                          f"{info.compress_size} (a zip bomb?)")
        total += info.file_size
    if total > MAX_RATIO * max(zip_size, 1) and total > RATIO_FLOOR:
        raise IntegrityError(subject, f"expands to {total} bytes from a {zip_size}-byte zip (a zip bomb?)")
    by_name = {i.filename: i for i in infos}
    out: list[CheckedMember] = []
    for m in bundle.members:
        info = by_name.get(m.member)
        if info is None or info.is_dir():
            raise IntegrityError(subject, f"member {m.member!r} is not in the zip")
        if m.size is not None and info.file_size != m.size:
            raise IntegrityError(subject, f"member {m.member!r} is {info.file_size} bytes, the manifest says "
                                          f"{m.size}")
        out.append(CheckedMember(m, info))
    return out


def _extract(zf: zipfile.ZipFile, c: CheckedMember, part: Path, cancel: CancelToken | None) -> str:
    """Stream one member into `part` (fsynced) and return its sha256; zipfile checks the CRC at the end."""
    h = hashlib.sha256()
    written = 0
    discard_partial(part)
    with zf.open(c.info) as src, open(part, "wb") as dst:
        while True:
            if cancel is not None and cancel.cancelled:
                raise Cancelled(c.member.key, "cancelled while extracting")
            block = src.read(CHUNK)
            if not block:
                break
            written += len(block)
            if written > c.info.file_size:
                raise IntegrityError(c.member.key, "member is longer than the zip declares")
            h.update(block)
            dst.write(block)
        dst.flush()
        os.fsync(dst.fileno())
    if written != c.info.file_size:
        raise IntegrityError(c.member.key, f"member has {written} bytes, the zip declares {c.info.file_size}")
    return h.hexdigest()


def _download_zip(service: FetchService, req: FetchRequest, part: Path) -> tuple[int, str, str]:
    """(bytes, sha256, source shown) of the zip, trying each source in order."""
    spec = req.spec
    bundle = spec.bundle
    assert bundle is not None
    errors: list[str] = []
    for source in spec.sources:
        try:
            result = service.download_to(source, part, sha256=bundle.sha256, key=bundle.name, progress=req.progress,
                                         cancel=req.cancel)
        except (Cancelled, NotEnoughSpace, IntegrityError):
            raise
        except AutoCloudError as exc:
            errors.append(f"{exc.subject}: {exc.reason}")
            continue
        from comfy_autocloud.redact import redact_url

        return result.bytes_downloaded, result.sha256, redact_url(source)
    raise TransferError(f"bundle {bundle.name}", "every source failed: " + "; ".join(errors))


def fetch_bundle(service: FetchService, req: FetchRequest) -> FetchResult:
    """Make every member of the request's bundle present (one download) and return the spec's own result."""
    spec = req.spec
    bundle = spec.bundle
    assert bundle is not None
    store = service.store

    def on_wait() -> None:
        service.notify(req.progress, ProgressEvent(spec.key, "wait", message=f"bundle {bundle.name} is being fetched"))

    with single_flight(bundle.name, store.lock_path(bundle.name), cancel=req.cancel, on_wait=on_wait):
        hit = service.cached(req)  # another member's fetch extracted this one meanwhile
        if hit is not None:
            return hit
        if service.fleet_path is not None:
            from comfy_autocloud.fleet.conn import FleetUnavailable

            try:
                shared = _via_fleet(service, service.fleet_path, req)
            except FleetUnavailable:
                shared = None  # logged once by the fleet; this node goes on alone
            if shared is not None:
                return shared
        return _from_origin(service, req)


def _via_fleet(service: FetchService, path: FleetPath, req: FetchRequest) -> FetchResult | None:
    """The members from peers once every one is announced somewhere; else the fleet lease on the bundle.

    The lease holder downloads the zip from the origin (once for the fleet) and announces the members
    it extracts; the other nodes wait for them and take them from the peers. None: download it here.
    """
    from comfy_autocloud.fetch.fleet_path import Tried

    fleet, spec = path.fleet, req.spec
    assert spec.bundle is not None
    name = spec.bundle.name
    deadline = time.monotonic() + fleet.config.max_wait
    tried = Tried()
    waiting = False
    while True:
        req.check_cancelled("waiting for the fleet")
        got = _members_from_peers(service, path, req, tried)
        if got is not None:
            return got
        lease = fleet.leases.try_acquire(name)
        if lease is not None:
            with lease:
                return _from_origin(service, req)
        if time.monotonic() >= deadline:
            log.warning("%s: waited %.0fs for the fleet; downloading bundle %s alone", spec.key,
                        fleet.config.max_wait, name)
            return None
        if not waiting:
            waiting = True
            service.notify(req.progress, ProgressEvent(spec.key, "wait",
                                                       message=f"another node is fetching bundle {name}"))
        time.sleep(fleet.config.poll)


def _members_from_peers(service: FetchService, path: FleetPath, req: FetchRequest, tried: Tried
                        ) -> FetchResult | None:
    """Every missing member from peers (verified like any peer download); None unless all of them came."""
    fleet, spec = path.fleet, req.spec
    bundle = spec.bundle
    assert bundle is not None
    missing = []
    for m in bundle.members:
        if service.has(m.key, m.sha256):
            continue
        if not fleet.registry.holders(m.key, m.sha256):
            return None  # not all of it is in the fleet yet: the zip is the one download
        missing.append(m)
    mine: FetchResult | None = None
    for m in missing:
        folder, filename = split_key(m.key)
        member_spec = ModelSpec(folder=folder, filename=filename, sha256=m.sha256, size=m.size, pin=spec.pin,
                                defined_in=spec.defined_in)
        got = path.from_holders(req.for_spec(member_spec), tried)
        if got is None:
            return None
        if m.key == spec.key:
            mine = got
    if mine is None:
        raise IntegrityError(spec.key, f"not among the members of bundle {bundle.name}")
    return replace(mine, source=f"{mine.source} ({bundle.name})")


def _from_origin(service: FetchService, req: FetchRequest) -> FetchResult:
    """Download the zip (resumable), check it, extract and commit every member; the zip is not kept."""
    spec = req.spec
    bundle = spec.bundle
    assert bundle is not None
    store = service.store
    if service.fleet_path is not None:
        service.fleet_path.wait_for_download_slot(req.cancel)  # one origin download for the whole bundle
    part = store.partial_path(bundle.name, bundle.size)
    part.parent.mkdir(parents=True, exist_ok=True)
    with store.reserve(bundle.name, bundle.size or 0):
        downloaded, zip_sha, shown = _download_zip(service, req, part)
    try:
        entries = _unpack(service, req, part, zip_sha, shown)
    finally:
        discard_partial(part)  # the zip is not kept (and a bad one is not resumed)
    mine = entries.get(spec.key)
    if mine is None:
        raise IntegrityError(spec.key, f"not among the members of bundle {bundle.name}")
    return FetchResult(spec.key, mine.path, mine.size, mine.sha256, req.elapsed(), downloaded, False,
                       f"{shown} ({bundle.name})")


def _unpack(service: FetchService, req: FetchRequest, part: Path, zip_sha: str, shown: str) -> dict[str, Entry]:
    spec, progress = req.spec, req.progress
    bundle = spec.bundle
    assert bundle is not None
    store = service.store
    zip_size = part.stat().st_size
    try:
        zf = zipfile.ZipFile(part)
    except (zipfile.BadZipFile, OSError) as exc:
        raise IntegrityError(f"bundle {bundle.name}", f"not a readable zip ({exc}) from {shown}") from None
    with zf, ExitStack() as held:
        members = check_archive(zf, bundle, zip_size=zip_size)
        staged: list[tuple[CheckedMember, Path, str]] = []
        parts: list[Path] = []
        try:
            for c in members:
                held.enter_context(store.reserve(c.member.key, c.info.file_size))
                mpart = store.partial_path(c.member.key, c.info.file_size)
                parts.append(mpart)
                mpart.parent.mkdir(parents=True, exist_ok=True)
                service.notify(progress, ProgressEvent(c.member.key, "verify", 0, c.info.file_size,
                                                      message=f"extracting from {bundle.name}"))
                try:
                    sha = _extract(zf, c, mpart, req.cancel)
                except (zipfile.BadZipFile, NotImplementedError, OSError) as exc:
                    raise IntegrityError(f"bundle {bundle.name}", f"cannot extract {c.member.member!r}: {exc}"
                                         ) from None
                staged.append((c, mpart, sha))
                if c.member.sha256 is not None and sha != c.member.sha256:
                    raise IntegrityError(c.member.key, f"sha256 mismatch in bundle {bundle.name} from {shown}: "
                                                       f"expected {c.member.sha256}, got {sha}")
            entries: dict[str, Entry] = {}
            for c, mpart, sha in staged:  # every member checked out: now they appear, each atomically
                entries[c.member.key] = store.commit(c.member.key, mpart, size=c.info.file_size, sha256=sha,
                                                     source=f"{shown} ({bundle.name}:{c.member.member})",
                                                     pin=spec.pin)
                service.announce(c.member.key, sha, c.info.file_size)
                service.notify(progress, ProgressEvent(c.member.key, "done", c.info.file_size, c.info.file_size))
        except BaseException:
            for mpart in parts:  # nothing of a failed bundle stays behind (committed parts are gone already)
                discard_partial(mpart)
            raise
    log.info("autocloud: bundle %s (zip sha256 %s…) gave %d files", bundle.name, zip_sha[:12], len(entries))
    return entries
