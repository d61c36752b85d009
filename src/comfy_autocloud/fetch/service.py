"""The one entry point every feature uses: `ensure(spec) -> Path`.

Hit: touch the index and return (no hashing). Miss: single-flight per key, make room before the
first byte, try each source in order, verify size and sha256, commit by atomic rename. A failed or
corrupt download never replaces what is already cached.

With a fleet (`fleet=`), a miss goes local -> peers -> origin through `fetch.fleet_path.FleetPath`
(peers holding a verified copy, else the fleet-wide lease, else a download in progress on another
node); zip bundles go through `fetch.bundle`. Both use this service's public download steps.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from comfy_autocloud.errors import (
    AutoCloudError,
    BadContent,
    Cancelled,
    IntegrityError,
    ManifestError,
    NotEnoughSpace,
    SourceError,
    StoreError,
    TransferError,
)
from comfy_autocloud.fetch.request import FetchRequest, FetchResult
from comfy_autocloud.fetch.singleflight import single_flight
from comfy_autocloud.manifest.spec import ModelSpec, SpecError
from comfy_autocloud.phases import Laps
from comfy_autocloud.progress import CancelToken, ProgressCallback, ProgressEvent, map_cancellable
from comfy_autocloud.redact import excerpt, redact_text, redact_url
from comfy_autocloud.sources import ResolvedSource, resolve
from comfy_autocloud.store import Durability, Entry, Store
from comfy_autocloud.store.content_check import content_problem
from comfy_autocloud.transfer import (
    TransferOptions,
    TransferResult,
    Unauthorized,
    copy_file,
    discard_partial,
    discard_unresumable,
)
from comfy_autocloud.transfer.ranges import remove_live
from comfy_autocloud.units import human_size

if TYPE_CHECKING:
    from comfy_autocloud.fetch.fleet_path import FleetPath
    from comfy_autocloud.fleet.client import Fleet

log = logging.getLogger(__name__)

Expect = Callable[[TransferResult], "str | None"]


class FetchService:
    """Produces verified model files in a Store; safe to share between threads."""

    def __init__(
        self,
        store: Store,
        *,
        options: TransferOptions | None = None,
        integrity_attempts: int = 2,
        fleet: Fleet | None = None,
        durability: Durability = "durable",
    ) -> None:
        """`durability` (Store.commit): "deferred" commits without waiting for the disk and asks for the
        store's detached flush after each download (services.build passes the `durability` setting, whose
        default is "deferred"; an embedder's service stays "durable" unless told)."""
        self.store = store
        self.durability = durability
        self.options = options or TransferOptions()
        self.integrity_attempts = max(1, integrity_attempts)
        self.fleet = fleet
        self.fleet_path: FleetPath | None = None
        if fleet is not None:
            from comfy_autocloud.fetch.fleet_path import FleetPath

            self.fleet_path = FleetPath(self, fleet)
        self._inflight: dict[str, ProgressEvent] = {}
        self._inflight_lock = threading.Lock()

    # -- public -------------------------------------------------------------------------------------------

    def ensure(self, spec: ModelSpec, *, progress: ProgressCallback | None = None,
               cancel: CancelToken | None = None) -> Path:
        return self.fetch(spec, progress=progress, cancel=cancel).path

    def fetch(self, spec: ModelSpec, *, progress: ProgressCallback | None = None,
              cancel: CancelToken | None = None) -> FetchResult:
        req = FetchRequest(spec, progress, cancel)
        hit = self.cached(req)
        if hit is not None:
            return hit
        if not spec.sources:
            raise SourceError(spec.key, "not in the cache and no source is known for it (add it to a manifest)")
        if spec.bundle is not None:  # inside a zip: one download extracts every member of it
            from comfy_autocloud.fetch.bundle import fetch_bundle  # zipfile: only for bundles

            return fetch_bundle(self, req)

        def on_wait() -> None:
            self.notify(progress, ProgressEvent(spec.key, "wait", message="another download of this file is running"))

        with single_flight(spec.key, self.store.lock_path(spec.key), cancel=cancel, on_wait=on_wait):
            hit = self.cached(req)  # whoever held the lock may have finished it
            if hit is not None:
                return hit
            try:
                return self._download(req)
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
                self.notify(progress, ProgressEvent(spec.key, "error", message=exc.reason))
                return exc
            except Exception as exc:  # a bug or an OS error in one file must not stop the others
                log.exception("%s: unexpected error", spec.key)
                err = AutoCloudError(spec.key, f"unexpected {type(exc).__name__}: {excerpt(redact_text(str(exc)))}")
                self.notify(progress, ProgressEvent(spec.key, "error", message=err.reason))
                return err

        return map_cancellable(one, specs, parallel=parallel, token=token, thread_name="autocloud-fetch")

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
            self.notify(progress, ProgressEvent(label, "download", done, total))

        self.notify(progress, ProgressEvent(label, "start", 0, size, message=resolved.display))
        try:
            result = self._transfer(resolved, Path(part), options, on_bytes, cancel, label)
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
        self.notify(progress, ProgressEvent(label, "done", result.size, result.size))
        return result

    def inflight(self) -> list[ProgressEvent]:
        """Downloads in progress in this process (for status pages)."""
        with self._inflight_lock:
            return list(self._inflight.values())

    def notify(self, progress: ProgressCallback | None, event: ProgressEvent) -> None:
        """Record `event` for `inflight()` and pass it to the caller's callback."""
        if event.phase in ("start", "download", "verify"):
            with self._inflight_lock:
                self._inflight[event.key] = event
        if progress is not None:
            progress(event)

    def cached(self, req: FetchRequest) -> FetchResult | None:
        """The cached copy of the request's spec (touched, counted as a hit), or None if it must be fetched."""
        return self.cached_key(req.key, req.spec.sha256, progress=req.progress, started=req.started)

    def has(self, key: str, sha256: str | None = None) -> bool:
        """Whether `key` is cached (as `sha256` when given), without counting a hit."""
        return self._current(key, sha256) is not None

    def cached_key(self, key: str, sha256: str | None = None, *, progress: ProgressCallback | None = None,
                   started: float | None = None) -> FetchResult | None:
        """`cached` by key: what a caller without a ModelSpec (a cache hit of `autocloud fetch URL`) asks."""
        t0 = time.perf_counter() if started is None else started
        entry = self._current(key, sha256)
        if entry is None:
            return None
        self.store.touch(key)
        self.notify(progress, ProgressEvent(key, "hit", entry.size, entry.size))
        return FetchResult(key, entry.path, entry.size, entry.sha256, time.perf_counter() - t0, 0, True,
                           entry.source)

    def announce(self, key: str, sha256: str, size: int, evicted: Iterable[Entry] = ()) -> None:
        """Tell the fleet (if any) what this node now holds and what making room for it evicted."""
        if self.fleet_path is not None:
            self.fleet_path.announce(key, sha256, size, evicted)

    def from_origin(self, req: FetchRequest) -> FetchResult:
        """Try each source of the spec in order (within the fleet's origin limits when there is one)."""
        spec, options = req.spec, self.options
        if self.fleet_path is not None:
            def on_wait(seconds: float) -> None:
                message = f"download rate limit: next download in {seconds:.1f}s"
                self.notify(req.progress, ProgressEvent(spec.key, "wait", message=message))

            self.fleet_path.wait_for_download_slot(req.cancel, on_wait=on_wait)
            options = self.fleet_path.origin_options(options)
        errors: list[str] = []
        bad: BadContent | None = None
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
                return self.download_from(req, resolved, options=options)
            except BadContent as exc:  # this source serves something else (an error page): try the next one
                bad = exc
                errors.append(exc.reason)  # "<source> sent ..."
                log.info("%s: %s", req.spec.key, exc.reason)
                continue
            except (Cancelled, IntegrityError, NotEnoughSpace):
                raise
            except AutoCloudError as exc:
                if isinstance(exc, Unauthorized) and len(spec.sources) == 1:
                    raise
                errors.append(f"{exc.subject}: {exc.reason}")
                log.info("%s: source %s failed: %s", spec.key, resolved.display, exc.reason)
        if len(errors) == 1 and bad is not None:
            raise bad
        if len(errors) == 1:
            subject, _, reason = errors[0].partition(": ")
            raise TransferError(f"{spec.key} from {subject}", reason)
        raise TransferError(spec.key, "every source failed: " + "; ".join(errors))

    # -- internals ----------------------------------------------------------------------------------------

    def _current(self, key: str, sha256: str | None) -> Entry | None:
        entry = self.store.lookup(key)
        if entry is not None and sha256 is not None and not entry.hashed:
            try:
                entry = self.store.with_sha256(entry)  # a warmup copy whose hash is still being computed
            except StoreError:
                return None
        if entry is None or (sha256 is not None and entry.sha256 != sha256):
            return None  # a new version is asked for: download it, keep serving the old until then
        return entry

    def _adopt_existing(self, spec: ModelSpec) -> FetchResult | None:
        """A file a person put at the final path by hand: index it if it is what the manifest asks for (and
        what its name says: an error page saved there is downloaded over, see store.content_check)."""
        path = self.store.path_for(spec.key)
        if not path.is_file() or self.store.lookup(spec.key) is not None:
            return None
        problem = content_problem(path, path.name)
        if problem is not None:
            log.warning("%s: the file already at %s holds %s; downloading it", spec.key, path, problem)
            return None
        entry = self.store.adopt(spec.key)
        if spec.sha256 is not None and entry.sha256 != spec.sha256:
            return None
        return FetchResult(spec.key, entry.path, entry.size, entry.sha256, 0.0, 0, True, entry.source)

    def _download(self, req: FetchRequest) -> FetchResult:
        adopted = self._adopt_existing(req.spec)
        if adopted is not None:
            self.announce(adopted.key, adopted.sha256, adopted.size)
            return adopted
        if self.fleet_path is not None:
            shared = self.fleet_path.fetch(req)  # None: no peer had it, or the fleet is unreachable
            if shared is not None:
                return shared
        return self.from_origin(req)

    def _sized(self, spec: ModelSpec, resolved: ResolvedSource, options: TransferOptions) -> TransferOptions:
        """`options` with the expected size (known, or probed: the download then starts from that probe)."""
        if spec.size is not None:
            return replace(options, expected_size=spec.size)
        if resolved.expected_size is not None:
            return replace(options, expected_size=resolved.expected_size)
        if resolved.kind == "file":
            return replace(options, expected_size=os.stat(resolved.url).st_size)
        from comfy_autocloud.transfer.remote import probe  # aiohttp: only when something is downloaded

        info = probe(resolved.url, options)
        return replace(options, expected_size=info.size, probed=info)

    def download_from(self, req: FetchRequest, resolved: ResolvedSource, *, options: TransferOptions | None = None,
                      expect: Expect | None = None, attempts: int | None = None,
                      on_mismatch: Callable[[Path, TransferResult], None] | None = None) -> FetchResult:
        """Download the spec from one resolved source, verify (sha256 known up front, or `expect(result)`
        after the transfer), commit; the step every path (origin, peers, streams) ends in."""
        spec, progress, cancel = req.spec, req.progress, req.cancel
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
            self.notify(progress, ProgressEvent(key, "download", done, total))

        self.notify(progress, ProgressEvent(key, "start", 0, size, message=resolved.display))
        downloaded = 0
        with self.store.reserve(key, size or 0) as reservation:
            laps.lap("reserve")
            for attempt in range(1, attempts + 1):
                try:
                    result = self._transfer(resolved, part, options, on_bytes, cancel, key)
                except NotEnoughSpace:
                    if not self.store.in_temp_dir(part):
                        raise
                    # The RAM disk filled up under us (other downloads): start over on the cache disk.
                    log.warning("%s: temp dir full; downloading to the cache disk instead", key)
                    discard_partial(part)
                    part = self.store.partial_path(key, size, disk=True)
                    part.parent.mkdir(parents=True, exist_ok=True)
                    result = self._transfer(resolved, part, options, on_bytes, cancel, key)
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
            self.notify(progress, ProgressEvent(key, "commit", result.size, result.size))
            laps.skip()
            try:
                entry = self.store.commit(key, part, size=result.size, sha256=result.sha256, source=resolved.display,
                                          etag=result.etag, last_modified=result.last_modified, pin=spec.pin,
                                          timings=laps.times, content_type=result.content_type,
                                          durability=self.durability)
            except BadContent:
                discard_partial(part)
                raise
            if self.durability == "deferred":
                self.store.settle_in_background()
            remove_live(part)  # streaming readers now follow the committed file
        self.announce(key, entry.sha256, entry.size, reservation.evicted)
        self.notify(progress, ProgressEvent(key, "done", entry.size, entry.size))
        return FetchResult(key, entry.path, entry.size, entry.sha256, req.elapsed(), downloaded, False,
                           resolved.display, laps.times)

    def _transfer(self, resolved: ResolvedSource, part: Path, options: TransferOptions, on_bytes,
                  cancel: CancelToken | None, label: str) -> TransferResult:
        """One transfer into `part`; when it fails, a partial nothing can resume is removed at once."""
        try:
            if resolved.kind == "file":
                return copy_file(Path(resolved.url), part, progress=on_bytes, cancel=cancel)
            from comfy_autocloud.transfer.engine import download  # aiohttp: only when something is downloaded

            return download(resolved.url, part, options, progress=on_bytes, cancel=cancel)
        except NotEnoughSpace as exc:
            kept = "the partial download was removed" if discard_unresumable(part) else \
                "the partial download is kept for resuming"
            raise NotEnoughSpace(label, f"{exc.reason} while downloading from {resolved.display}; {kept}") from None
        except BaseException:
            discard_unresumable(part)
            raise


def _is_civitai(url: str) -> bool:
    """Whether the source is a Civitai id or page: only Civitai's API knows the file name it stands for."""
    lower = url.lower()
    if lower.startswith("civitai:"):
        return True
    if lower.startswith(("http://", "https://")):  # only web URLs can be Civitai pages (its module is not small)
        from comfy_autocloud.sources.civitai import is_civitai_url

        return is_civitai_url(url)
    return False


def _last_segment(url: str) -> str:
    from urllib.parse import unquote, urlsplit

    return unquote(urlsplit(url).path.rsplit("/", 1)[-1])


def _url_spec(url: str, folder: str, filename: str, sha256: str | None) -> ModelSpec:
    return ModelSpec(folder=folder, filename=filename, sources=(url,), sha256=sha256, defined_in="command line")


def url_key(url: str, folder: str, name: str | None = None, sha256: str | None = None) -> tuple[str, str | None] | None:
    """(key, sha256) that `autocloud fetch URL --folder F [--name N] [--sha256 H]` asks for, known without
    the network (a cache hit is answered before anything is resolved); None when the name needs the
    network (a Civitai id or page) or the input is invalid (`specs_from_urls` then reports why)."""
    if url.lower().startswith("civitai:") or (name is None and _is_civitai(url)):
        return None
    try:
        spec = _url_spec(url, folder, name or _last_segment(url), sha256)
    except ValueError:  # a bad field (SpecError), or a URL urlsplit cannot read
        return None
    return spec.key, spec.sha256


def specs_from_urls(urls: Iterable[str], folder: str, name: str | None = None, sha256: str | None = None
                    ) -> list[ModelSpec]:
    """`autocloud fetch URL… --folder F [--name N]`: a ModelSpec per URL, named after the URL's last segment
    (a Civitai source: the file name its API gives)."""
    urls = list(urls)
    if name is not None and len(urls) > 1:
        raise SourceError("--name", "only one URL can be given a --name")
    specs = []
    for url in urls:
        filename = name or ((resolve(url).filename or "") if _is_civitai(url) else _last_segment(url))
        if not filename:
            raise SourceError(url, "cannot derive a file name from this URL; pass --name")
        try:
            specs.append(_url_spec(url, folder, filename, sha256))
        except SpecError as exc:  # every bad field at once, each naming the value it refuses
            raise ManifestError(f"command line {redact_url(url)}", str(exc)) from None
    return specs
