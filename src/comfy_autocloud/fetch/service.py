"""The one entry point every feature uses: `ensure(spec) -> Path`.

Hit: touch the index and return (no hashing). Miss: single-flight per key, make room before the
first byte, try each source in order, verify size and sha256, commit by atomic rename. A failed or
corrupt download never replaces what is already cached.

With a fleet (`fleet=`), a miss goes local -> peers -> origin: first the peers holding a verified copy
(announced with its sha256 in Redis), ranges from up to four of them at once; when the whole file
does not hash to the announced sha256 each peer is tried alone, and the one whose bytes are wrong is
marked bad fleet-wide and skipped;
else the fleet-wide lease for the key: the holder downloads from the origin (within the fleet's rate
limits) while the others stream a download in progress from a peer server (the downloader with the
fewest followers: a chain, see fleet/streams.py) and commit only when their bytes hash to what the
holder verified. A holder that dies loses its lease by expiry and the
next node takes over. Redis unreachable: the node downloads alone, exactly as without a fleet.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from comfy_autocloud.errors import (
    AutoCloudError,
    Cancelled,
    IntegrityError,
    ManifestError,
    NotEnoughSpace,
    SourceError,
    TransferError,
)
from comfy_autocloud.fetch.singleflight import single_flight
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.phases import Laps, in_order
from comfy_autocloud.progress import CancelToken, ProgressCallback, ProgressEvent
from comfy_autocloud.redact import redact_url
from comfy_autocloud.sources import ResolvedSource, resolve
from comfy_autocloud.store import Entry, Store
from comfy_autocloud.transfer import (
    NotFound,
    TransferOptions,
    TransferResult,
    Unauthorized,
    copy_file,
    discard_partial,
    download,
    probe,
)
from comfy_autocloud.transfer.ranges import remove_live
from comfy_autocloud.units import human_size

if TYPE_CHECKING:
    from comfy_autocloud.fleet.client import Fleet
    from comfy_autocloud.fleet.lease import LeaseInfo
    from comfy_autocloud.fleet.registry import Peer

log = logging.getLogger(__name__)

Expect = Callable[[TransferResult], "str | None"]


@dataclass(frozen=True)
class FetchResult:
    key: str
    path: Path
    size: int
    sha256: str
    seconds: float
    bytes_downloaded: int
    cached: bool  # True when served from the cache without downloading
    source: str  # redacted
    # Seconds per step of a download (probe, reserve, transfer, hash_tail, records, fsync, rename, index).
    phases: dict[str, float] = field(default_factory=dict, compare=False)

    def as_json(self, *, phases: bool = False) -> dict[str, object]:
        out: dict[str, object] = {
            "key": self.key, "path": str(self.path), "size": self.size, "sha256": self.sha256,
            "seconds": round(self.seconds, 4), "bytes_downloaded": self.bytes_downloaded,
            "cached": self.cached, "source": self.source}
        if phases:
            out["phases"] = {k: round(v, 4) for k, v in in_order(self.phases).items()}
        return out


class FetchService:
    """Produces verified model files in a Store; safe to share between threads."""

    def __init__(
        self,
        store: Store,
        *,
        options: TransferOptions | None = None,
        integrity_attempts: int = 2,
        fleet: Fleet | None = None,
    ) -> None:
        self.store = store
        self.options = options or TransferOptions()
        self.integrity_attempts = max(1, integrity_attempts)
        self.fleet = fleet
        self._inflight: dict[str, ProgressEvent] = {}
        self._inflight_lock = threading.Lock()

    # -- public -------------------------------------------------------------------------------------------

    def ensure(self, spec: ModelSpec, *, progress: ProgressCallback | None = None,
               cancel: CancelToken | None = None) -> Path:
        return self.fetch(spec, progress=progress, cancel=cancel).path

    def fetch(self, spec: ModelSpec, *, progress: ProgressCallback | None = None,
              cancel: CancelToken | None = None) -> FetchResult:
        t0 = time.perf_counter()
        hit = self._hit(spec, t0, progress)
        if hit is not None:
            return hit
        if not spec.sources:
            raise SourceError(spec.key, "not in the cache and no source is known for it (add it to a manifest)")
        if spec.bundle is not None:  # inside a zip: one download extracts every member of it
            from comfy_autocloud.fetch.bundle import fetch_bundle

            return fetch_bundle(self, spec, t0, progress, cancel)

        def on_wait() -> None:
            self._emit(progress, ProgressEvent(spec.key, "wait", message="another download of this file is running"))

        with single_flight(spec.key, self.store.lock_path(spec.key), cancel=cancel, on_wait=on_wait):
            hit = self._hit(spec, t0, progress)  # whoever held the lock may have finished it
            if hit is not None:
                return hit
            try:
                return self._download(spec, t0, progress, cancel)
            finally:
                with self._inflight_lock:
                    self._inflight.pop(spec.key, None)

    def fetch_many(self, specs: Sequence[ModelSpec], *, parallel: int = 4, progress: ProgressCallback | None = None,
                   cancel: CancelToken | None = None) -> list[FetchResult | AutoCloudError]:
        """Fetch several files at once; failures are returned in place so one bad file doesn't stop the rest.

        Ctrl-C (or any exception in the caller's thread) cancels every download promptly; partial files
        stay for resuming.
        """
        token = cancel or CancelToken()

        def one(spec: ModelSpec) -> FetchResult | AutoCloudError:
            try:
                return self.fetch(spec, progress=progress, cancel=token)
            except AutoCloudError as exc:
                self._emit(progress, ProgressEvent(spec.key, "error", message=exc.reason))
                return exc

        pool = ThreadPoolExecutor(max_workers=max(1, min(parallel, len(specs) or 1)),
                                  thread_name_prefix="autocloud-fetch")
        try:
            futures = [pool.submit(one, spec) for spec in specs]
            return [f.result() for f in futures]
        except BaseException:
            token.cancel()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def download_to(self, source: str, part: Path, *, sha256: str | None = None, key: str = "",
                    progress: ProgressCallback | None = None, cancel: CancelToken | None = None,
                    max_size: int | None = None) -> TransferResult:
        """Any source into `part`, a file outside the store's final paths (manifest lists, zip bundles).

        The same resolution, engine (ranged, resumable, retried) and sha256 check as `fetch`; the caller
        owns `part` and decides where the verified bytes go. A wrong hash discards the partial.
        """
        resolved = resolve(source)
        label = key or resolved.display
        expected = sha256 or resolved.expected_sha256
        options = replace(self.options, headers={**self.options.headers, **resolved.headers})
        size = resolved.expected_size
        if size is None and resolved.kind == "file":
            size = os.stat(resolved.url).st_size
        if size is not None and max_size is not None and size > max_size:
            raise TransferError(resolved.display, f"is {size} bytes, more than the {max_size} allowed here")
        if size is not None:
            options = replace(options, expected_size=size)
        Path(part).parent.mkdir(parents=True, exist_ok=True)

        def on_bytes(done: int, total: int | None) -> None:
            self._emit(progress, ProgressEvent(label, "download", done, total))

        self._emit(progress, ProgressEvent(label, "start", 0, size, message=resolved.display))
        try:
            result = self._transfer(resolved, Path(part), options, on_bytes, cancel)
        finally:
            with self._inflight_lock:
                self._inflight.pop(label, None)
        if max_size is not None and result.size > max_size:
            discard_partial(Path(part))
            raise TransferError(resolved.display, f"is {result.size} bytes, more than the {max_size} allowed here")
        if expected is not None and result.sha256 != expected:
            discard_partial(Path(part))
            raise IntegrityError(label, f"sha256 mismatch from {resolved.display}: expected {expected}, "
                                        f"got {result.sha256}")
        self._emit(progress, ProgressEvent(label, "done", result.size, result.size))
        return result

    def inflight(self) -> list[ProgressEvent]:
        """Downloads in progress in this process (for status pages)."""
        with self._inflight_lock:
            return list(self._inflight.values())

    # -- internals ----------------------------------------------------------------------------------------

    def _emit(self, progress: ProgressCallback | None, event: ProgressEvent) -> None:
        if event.phase in ("start", "download", "verify"):
            with self._inflight_lock:
                self._inflight[event.key] = event
        if progress is not None:
            progress(event)

    def _hit(self, spec: ModelSpec, t0: float, progress: ProgressCallback | None) -> FetchResult | None:
        entry = self.store.lookup(spec.key)
        if entry is None:
            return None
        if spec.sha256 is not None and entry.sha256 != spec.sha256:
            return None  # the manifest moved on: download the new version, keep serving the old until then
        self.store.touch(spec.key)
        self._emit(progress, ProgressEvent(spec.key, "hit", entry.size, entry.size))
        return FetchResult(spec.key, entry.path, entry.size, entry.sha256, time.perf_counter() - t0, 0, True,
                           entry.source)

    def _adopt_existing(self, spec: ModelSpec) -> FetchResult | None:
        """A file a person put at the final path by hand: index it if it is what the manifest asks for."""
        path = self.store.path_for(spec.key)
        if not path.is_file() or self.store.lookup(spec.key) is not None:
            return None
        entry = self.store.adopt(spec.key)
        if spec.sha256 is not None and entry.sha256 != spec.sha256:
            return None
        return FetchResult(spec.key, entry.path, entry.size, entry.sha256, 0.0, 0, True, entry.source)

    def _download(self, spec: ModelSpec, t0: float, progress: ProgressCallback | None,
                  cancel: CancelToken | None) -> FetchResult:
        adopted = self._adopt_existing(spec)
        if adopted is not None:
            self._announce(adopted.key, adopted.sha256, adopted.size)
            return adopted
        if self.fleet is not None:
            from comfy_autocloud.fleet.conn import FleetUnavailable

            try:
                shared = self._fleet_download(spec, t0, progress, cancel)
            except FleetUnavailable:
                shared = None  # logged once by the fleet; this node goes on alone
            if shared is not None:
                return shared
        return self._from_origin(spec, t0, progress, cancel)

    def _from_origin(self, spec: ModelSpec, t0: float, progress: ProgressCallback | None,
                     cancel: CancelToken | None) -> FetchResult:
        """Try each source of the spec in order (within the fleet's origin limits when there is one)."""
        options = self.options
        if self.fleet is not None:
            if self.fleet.downloads is not None:
                self.fleet.downloads.acquire(cancel, on_wait=lambda s: self._emit(progress, ProgressEvent(
                    spec.key, "wait", message=f"download rate limit: next download in {s:.1f}s")))
            options = self.fleet.origin_options(options)
        errors: list[str] = []
        for source in spec.sources:
            try:
                resolved = resolve(source)
            except SourceError as exc:
                errors.append(f"{exc.subject}: {exc.reason}")
                continue
            if spec.sha256 and resolved.expected_sha256 and resolved.expected_sha256 != spec.sha256:
                # Not a mirror of this file: skip it before downloading a byte.
                errors.append(f"{resolved.display}: publishes sha256 {resolved.expected_sha256}, but the entry "
                              f"asks for {spec.sha256}; not a mirror of this file")
                log.info("%s: skipping %s: it publishes another sha256", spec.key, resolved.display)
                continue
            try:
                return self._download_from(spec, resolved, t0, progress, cancel, options=options)
            except (Cancelled, IntegrityError, NotEnoughSpace):
                raise
            except AutoCloudError as exc:
                if isinstance(exc, Unauthorized) and len(spec.sources) == 1:
                    raise
                errors.append(f"{exc.subject}: {exc.reason}")
                log.info("%s: source %s failed: %s", spec.key, resolved.display, exc.reason)
        if len(errors) == 1:
            subject, _, reason = errors[0].partition(": ")
            raise TransferError(f"{spec.key} from {subject}", reason)
        raise TransferError(spec.key, "every source failed: " + "; ".join(errors))

    def _sized(self, spec: ModelSpec, resolved: ResolvedSource, options: TransferOptions) -> TransferOptions:
        """`options` with the expected size (known, or probed: the download then starts from that probe)."""
        if spec.size is not None:
            return replace(options, expected_size=spec.size)
        if resolved.expected_size is not None:
            return replace(options, expected_size=resolved.expected_size)
        if resolved.kind == "file":
            return replace(options, expected_size=os.stat(resolved.url).st_size)
        info = probe(resolved.url, options)
        return replace(options, expected_size=info.size, probed=info)

    def _download_from(self, spec: ModelSpec, resolved: ResolvedSource, t0: float,
                       progress: ProgressCallback | None, cancel: CancelToken | None, *,
                       options: TransferOptions | None = None, expect: Expect | None = None,
                       attempts: int | None = None,
                       on_mismatch: Callable[[Path, TransferResult], None] | None = None) -> FetchResult:
        """Download, verify (sha256 known up front, or `expect(result)` after the transfer), commit."""
        key = spec.key
        expected_sha = spec.sha256 or resolved.expected_sha256
        base = options or self.options
        attempts = attempts or self.integrity_attempts
        options = replace(base, headers={**base.headers, **resolved.headers},
                          keep_live_record=self.fleet is not None)  # peers streaming it get the tail at once
        laps = Laps()
        options = self._sized(spec, resolved, options)
        size = options.expected_size
        laps.lap("probe")
        part = self.store.partial_path(key, size)  # on the temp dir (RAM disk) when it has room
        part.parent.mkdir(parents=True, exist_ok=True)

        def on_bytes(done: int, total: int | None) -> None:
            self._emit(progress, ProgressEvent(key, "download", done, total))

        self._emit(progress, ProgressEvent(key, "start", 0, size, message=resolved.display))
        downloaded = 0
        with self.store.reserve(key, size or 0) as reservation:
            laps.lap("reserve")
            for attempt in range(1, attempts + 1):
                try:
                    result = self._transfer(resolved, part, options, on_bytes, cancel)
                except NotEnoughSpace:
                    if not self.store.in_temp_dir(part):
                        raise
                    # The RAM disk filled up under us (other downloads): start over on the cache disk.
                    log.warning("%s: temp dir full; downloading to the cache disk instead", key)
                    discard_partial(part)
                    part = self.store.partial_path(key, size, disk=True)
                    part.parent.mkdir(parents=True, exist_ok=True)
                    result = self._transfer(resolved, part, options, on_bytes, cancel)
                laps.lap_with("transfer", result.phases)  # the engine's own steps told apart
                downloaded += result.bytes_downloaded
                if len(result.by_source) > 1:
                    log.info("%s: bytes per source: %s", key,
                             ", ".join(f"{k} {human_size(v)}" for k, v in result.by_source.items()))
                if expect is not None:
                    expected_sha = spec.sha256 or expect(result)
                if expected_sha is None or result.sha256 == expected_sha:
                    break
                if on_mismatch is not None:
                    on_mismatch(part, result)  # may move the bytes away to find out who sent wrong ones
                discard_partial(part)
                log.warning("%s: sha256 mismatch from %s (attempt %d/%d)", key, resolved.display, attempt,
                            attempts)
            else:
                raise IntegrityError(
                    key, f"sha256 mismatch from {resolved.display}: expected {expected_sha}, got {result.sha256} "
                         f"({attempts} attempts); the cached copy, if any, is untouched")
            self._emit(progress, ProgressEvent(key, "commit", result.size, result.size))
            laps.skip()
            entry = self.store.commit(key, part, size=result.size, sha256=result.sha256, source=resolved.display,
                                      etag=result.etag, last_modified=result.last_modified, pin=spec.pin,
                                      timings=laps.times)
            remove_live(part)  # streaming readers now follow the committed file
        self._announce(key, entry.sha256, entry.size, reservation.evicted)
        self._emit(progress, ProgressEvent(key, "done", entry.size, entry.size))
        return FetchResult(key, entry.path, entry.size, entry.sha256, time.perf_counter() - t0, downloaded, False,
                           resolved.display, laps.times)

    # -- fleet ----------------------------------------------------------------------------------------------

    def _announce(self, key: str, sha256: str, size: int, evicted: Iterable[Entry] = ()) -> None:
        """Tell the fleet what this node now holds (and what making room for it evicted)."""
        if self.fleet is None:
            return
        for gone in evicted:
            self.fleet.withdraw(gone.key)
        self.fleet.announce(key, sha256, size)

    def _fleet_download(self, spec: ModelSpec, t0: float, progress: ProgressCallback | None,
                        cancel: CancelToken | None) -> FetchResult | None:
        """Peers, then the lease (origin), else stream a download in progress (see fleet/streams.py); None: alone."""
        fleet = self.fleet
        assert fleet is not None
        key = spec.key
        deadline = time.monotonic() + fleet.config.max_wait
        failed: set[str] = set()  # "files:<node>" / "partial:<node>:<fence>" that failed this time
        announced_wait = False
        while True:
            if cancel is not None and cancel.cancelled:
                raise Cancelled(key, "cancelled while waiting for the fleet")
            got = self._from_holders(spec, t0, progress, cancel, failed)
            if got is not None:
                return got
            lease = fleet.leases.try_acquire(key)
            if lease is not None:
                with lease, self._streamable(key):
                    return self._from_origin(spec, t0, progress, cancel)
            holder = fleet.leases.holder(key)
            holder_url = fleet.registry.node_url(holder.node) if holder is not None else None
            if holder is not None and holder.node != fleet.node_id and holder_url:
                dead = {f.split(":")[1] for f in failed if f.startswith("partial:") and f.endswith(f":{holder.fence}")}
                if holder.node not in dead:
                    upstream = fleet.streams.choose(key, holder.node, dead)  # now counted as its follower
                    got = self._from_holder(spec, holder, holder_url, upstream, t0, progress, cancel, failed)
                    if got is not None:
                        return got
            if time.monotonic() >= deadline:
                log.warning("%s: waited %.0fs for the fleet; downloading alone", key, fleet.config.max_wait)
                return None
            if not announced_wait:
                announced_wait = True
                who = f"node {holder.node}" if holder is not None else "another node"
                self._emit(progress, ProgressEvent(key, "wait", message=f"{who} is fetching it from the origin"))
            time.sleep(fleet.config.poll)

    def _from_holders(self, spec: ModelSpec, t0: float, progress: ProgressCallback | None,
                      cancel: CancelToken | None, failed: set[str]) -> FetchResult | None:
        """The peers announcing a verified copy of `spec`: several at once, then one by one; None if none."""
        fleet = self.fleet
        assert fleet is not None
        holders = [p for p in fleet.registry.holders(spec.key, spec.sha256) if f"files:{p.node}" not in failed]
        group = _same_copy(holders)
        if len(group) >= 2 and f"peers:{group[0].sha256}" not in failed:
            got = self._from_peers(spec, group[:fleet.config.peer_sources], t0, progress, cancel, failed)
            if got is not None:
                return got
        for peer in holders:
            if f"files:{peer.node}" not in failed:
                got = self._from_peer(spec, peer, t0, progress, cancel, failed)
                if got is not None:
                    return got
        return None

    def _from_peer(self, spec: ModelSpec, peer: Peer, t0: float, progress: ProgressCallback | None,
                   cancel: CancelToken | None, failed: set[str]) -> FetchResult | None:
        """A verified copy from one peer; a wrong hash marks the peer bad fleet-wide.

        Not when the download resumed bytes that came from elsewhere (a holder's stream): those may be
        the wrong ones, so the partial is dropped and this peer is asked again from the first byte.
        """
        fleet = self.fleet
        assert fleet is not None
        source = fleet.peer_source(peer, spec.key)
        resumed: list[int] = []
        try:
            return self._download_from(spec, source, t0, progress, cancel, options=fleet.peer_options(self.options),
                                       attempts=1, on_mismatch=lambda _part, r: resumed.append(r.resumed_bytes))
        except IntegrityError as exc:
            if resumed and resumed[0] > 0:
                log.warning("%s: resumed bytes did not check out; asking %s again from the start", spec.key,
                            peer.node)
                return self._from_peer(spec, peer, t0, progress, cancel, failed)  # the partial is gone now
            fleet.registry.mark_bad(peer.node, f"{spec.key}: {exc.reason}"[:200])
        except (Cancelled, NotEnoughSpace):
            raise
        except AutoCloudError as exc:
            if isinstance(exc, NotFound):
                fleet.withdraw(spec.key, peer.node)  # it evicted the file since announcing it
            log.info("%s: peer %s failed: %s", spec.key, peer.node, exc.reason)
        discard_partial(self.store.partial_path(spec.key))
        failed.add(f"files:{peer.node}")
        return None

    def _from_peers(self, spec: ModelSpec, peers: list[Peer], t0: float, progress: ProgressCallback | None,
                    cancel: CancelToken | None, failed: set[str]) -> FetchResult | None:
        """Ranges from several peers at once; the whole file must hash to the sha256 they announced.

        A wrong hash doesn't say which peer lied, so the mixed bytes are kept aside, the file is taken
        from one peer at a time (a peer whose own bytes are wrong is marked bad on the way), and the
        verified copy then tells which peers sent wrong ranges: those are marked bad too. A peer that
        fails mid-way is dropped by the engine and the others finish.
        """
        fleet = self.fleet
        assert fleet is not None
        source, mirrors = fleet.peers_source(peers, spec.key)
        by_display = {redact_url(source.url): peers[0]}
        by_display.update({m.display: p for m, p in zip(mirrors, peers[1:], strict=True)})
        options = fleet.peer_options(self.options)
        options = replace(options, mirrors=mirrors, connections=max(options.connections or 1, len(peers)))
        suspect: list[tuple[Path, TransferResult]] = []

        def keep_aside(part: Path, result: TransferResult) -> None:
            aside = part.with_name(part.name + ".suspect")
            os.replace(part, aside)
            suspect.append((aside, result))

        try:
            return self._download_from(spec, source, t0, progress, cancel, options=options, attempts=1,
                                       on_mismatch=keep_aside)
        except (Cancelled, NotEnoughSpace):
            self._drop_suspect(suspect)
            raise
        except AutoCloudError as exc:
            log.info("%s: ranges from %s failed: %s; trying them one by one", spec.key, source.display, exc.reason)
        discard_partial(self.store.partial_path(spec.key))
        failed.add(f"peers:{peers[0].sha256}")
        if not suspect:
            return None
        try:
            for peer in peers:
                if f"files:{peer.node}" in failed:
                    continue
                got = self._from_peer(spec, peer, t0, progress, cancel, failed)
                if got is not None:
                    aside, result = suspect[0]
                    for display, ranges in result.source_ranges.items():
                        who = by_display.get(display)
                        if who is not None and who.node != peer.node and not _same_ranges(aside, got.path, ranges):
                            log.warning("%s: peer %s sent bytes that differ from the verified copy", spec.key,
                                        who.node)
                            fleet.registry.mark_bad(who.node, f"{spec.key}: sent wrong byte ranges")
                    return got
            return None
        finally:
            self._drop_suspect(suspect)

    @staticmethod
    def _drop_suspect(suspect: list[tuple[Path, TransferResult]]) -> None:
        for aside, _ in suspect:
            with contextlib.suppress(FileNotFoundError):
                aside.unlink()

    def _from_holder(self, spec: ModelSpec, holder: LeaseInfo, holder_url: str, upstream: str, t0: float,
                     progress: ProgressCallback | None, cancel: CancelToken | None,
                     failed: set[str]) -> FetchResult | None:
        """Stream a download in progress (the lease holder's, or another follower's: see fleet/streams.py),
        `upstream` having counted this node as its follower; commit only bytes that hash to what the
        holder verified."""
        from comfy_autocloud.fleet.conn import FleetUnavailable

        fleet = self.fleet
        assert fleet is not None
        try:
            base_url = holder_url if upstream == holder.node else fleet.registry.node_url(upstream)
            if base_url is None:  # it stopped heartbeating: not a source
                failed.add(f"partial:{upstream}:{holder.fence}")
                return None
            return self._stream_from(spec, holder, holder_url, upstream, base_url, t0, progress, cancel, failed)
        finally:
            with contextlib.suppress(FleetUnavailable):
                fleet.streams.unfollow(spec.key, upstream)
                fleet.streams.done(spec.key)

    def _stream_from(self, spec: ModelSpec, holder: LeaseInfo, holder_url: str, upstream: str, base_url: str,
                     t0: float, progress: ProgressCallback | None, cancel: CancelToken | None,
                     failed: set[str]) -> FetchResult | None:
        fleet = self.fleet
        assert fleet is not None
        source = fleet.partial_source(base_url, holder, spec.key, upstream)

        def expect(result: TransferResult) -> str | None:
            sha = fleet.verified_sha(holder_url, spec.key, result.size, timeout=max(10.0, fleet.config.lease_ttl))
            if sha is None:
                raise TransferError(source.display, "the holder never produced a verified copy to compare with")
            return sha

        try:
            return self._download_from(spec, source, t0, progress, cancel, options=fleet.peer_options(self.options),
                                       expect=expect, attempts=1)
        except (Cancelled, NotEnoughSpace):
            raise
        except AutoCloudError as exc:
            if isinstance(exc, NotFound) and upstream == holder.node:
                return None  # its download has not started writing yet (or just ended): look again
            log.info("%s: streaming from %s failed: %s", spec.key, upstream, exc.reason)
        failed.add(f"partial:{upstream}:{holder.fence}")
        return None  # the partial stays: the next source resumes it (the final sha256 check covers it)

    @contextlib.contextmanager
    def _streamable(self, key: str) -> Iterator[None]:
        """While this node downloads `key`, other nodes may stream it from here (best effort)."""
        from comfy_autocloud.fleet.conn import FleetUnavailable

        fleet = self.fleet
        assert fleet is not None
        with contextlib.suppress(FleetUnavailable):
            fleet.streams.downloading(key)
        try:
            yield
        finally:
            with contextlib.suppress(FleetUnavailable):
                fleet.streams.done(key)

    def _transfer(self, resolved: ResolvedSource, part: Path, options: TransferOptions, on_bytes,
                  cancel: CancelToken | None) -> TransferResult:
        if resolved.kind == "file":
            return copy_file(Path(resolved.url), part, progress=on_bytes, cancel=cancel)
        return download(resolved.url, part, options, progress=on_bytes, cancel=cancel)


def _same_ranges(a: Path, b: Path, ranges: list[tuple[int, int]], block: int = 1 << 20) -> bool:
    """Whether files `a` and `b` hold the same bytes in every [start, end) of `ranges`."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for start, end in ranges:
            pos = start
            while pos < end:
                n = min(block, end - pos)
                if os.pread(fa.fileno(), n, pos) != os.pread(fb.fileno(), n, pos):
                    return False
                pos += n
    return True


def _same_copy(peers: list[Peer]) -> list[Peer]:
    """The largest group of peers announcing the same (sha256, size): only those can share a download."""
    groups: dict[tuple[str, int], list[Peer]] = {}
    for peer in peers:
        groups.setdefault((peer.sha256, peer.size), []).append(peer)
    return max(groups.values(), key=len, default=[])


def _name_from_source(url: str) -> str:
    """The file name a source stands for: Civitai ids name a version, so ask its API; else the last segment."""
    from urllib.parse import unquote, urlsplit

    from comfy_autocloud.sources.civitai import is_civitai_url

    if url.lower().startswith("civitai:") or is_civitai_url(url):
        return resolve(url).filename or ""
    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


def specs_from_urls(urls: Iterable[str], folder: str, name: str | None = None, sha256: str | None = None
                    ) -> list[ModelSpec]:
    """`autocloud fetch URL… --folder F [--name N]`: a ModelSpec per URL, named after the URL's last segment."""

    urls = list(urls)
    if name is not None and len(urls) > 1:
        raise SourceError("--name", "only one URL can be given a --name")
    specs = []
    for url in urls:
        filename = name or _name_from_source(url)
        if not filename:
            raise SourceError(url, "cannot derive a file name from this URL; pass --name")
        try:
            specs.append(ModelSpec(folder=folder, filename=filename, sources=(url,), sha256=sha256,
                                   defined_in="command line"))
        except ValidationError as exc:
            reasons = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
            raise ManifestError(f"command line {redact_url(url)}", reasons) from None
    return specs
