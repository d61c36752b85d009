"""The adapter's state inside one ComfyUI process: store, fetch service, catalog, downloads.

No ComfyUI import here: `hooks` and `setup` wire these methods into ComfyUI, tests call them directly.
Every download goes through `FetchService.fetch` on this adapter's thread pool, once per key: a
loader that needs a model a prefetch is already downloading waits on that same future.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from comfy_autocloud import services
from comfy_autocloud.comfy.catalog import Catalog, comfy_folder
from comfy_autocloud.comfy.prompt_prefetch import IsPresent, PrefetchPlan, allowed_hints, host_allowed, plan_prefetch
from comfy_autocloud.comfy.tracker import Tracker
from comfy_autocloud.config import Settings
from comfy_autocloud.errors import AutoCloudError, Cancelled, ManifestError, StoreError
from comfy_autocloud.fetch import FetchResult, FetchService
from comfy_autocloud.keys import split_key
from comfy_autocloud.manifest import load_manifest, load_manifests
from comfy_autocloud.manifest.locality import check_network_list
from comfy_autocloud.manifest.spec import ModelSpec, SpecError
from comfy_autocloud.manifest.workflow import LEGACY_FOLDERS, workflow_model_refs
from comfy_autocloud.progress import CancelToken
from comfy_autocloud.redact import redact_url
from comfy_autocloud.store import Store
from comfy_autocloud.transfer import RetryPolicy, probe

log = logging.getLogger(__name__)

MANIFEST_FOLDER = "autocloud-manifests"
FAILURE_MEMORY = 15.0  # seconds a failed download's error is reused (prefetch error -> the same prompt's loader)
STATUS_ENTRIES = 500


class ModelUnavailable(FileNotFoundError):
    """A listed model could not be downloaded; ComfyUI shows the message as the node's error."""


ProgressSink = Callable[[int, int], None]  # (bytes done, bytes total); may raise to stop waiting


def is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def manifest_paths(entries: Iterable[str], fetch: FetchService, local_dirs: Sequence[str] = ()) -> list[Path]:
    """AUTOCLOUD_MANIFEST entries as local paths; URLs are fetched into the cache by the FetchService.

    A list fetched from a URL may name only network sources, or files inside `local_dirs`
    (manifest.locality): ManifestError otherwise, and the previous catalog keeps serving.

    A URL is stored under a name derived from the origin's validator (ETag or Last-Modified + size), so a
    changed list is a new file and the previous one is kept until the new one is verified; if the origin
    cannot be reached the newest cached copy is used.
    """
    paths: list[Path] = []
    for entry in entries:
        if not is_url(entry):
            paths.append(Path(entry).expanduser())
            continue
        path = _fetch_manifest_url(entry, fetch)
        check_network_list(load_manifest(path), redact_url(entry), local_dirs)
        paths.append(path)
    return paths


def _fetch_manifest_url(url: str, fetch: FetchService) -> Path:
    url_id = hashlib.sha256(url.encode()).hexdigest()[:16]
    base = unquote(urlsplit(url).path.rsplit("/", 1)[-1]) or "manifest.json"
    base = "".join(c if c.isalnum() or c in "._-" else "_" for c in base)[:80]
    prefix = f"{MANIFEST_FOLDER}/{url_id}/"
    cached = sorted((e for e in fetch.store.entries() if e.key.startswith(prefix)), key=lambda e: -e.created)
    options = replace(fetch.options, retry=RetryPolicy(attempts=2, backoff_base=0.2, backoff_max=1.0),
                      connect_timeout=5.0, read_timeout=15.0)
    try:
        info = probe(url, options)
    except AutoCloudError as exc:
        if cached:
            log.warning("autocloud: manifest %s unreachable (%s); using the copy from %s", redact_url(url),
                        exc.reason, time.ctime(cached[0].created))
            return cached[0].path
        raise
    validator = f"{info.etag}|{info.last_modified}|{info.size}"
    version = hashlib.sha256(validator.encode()).hexdigest()[:12]
    spec = ModelSpec(folder=MANIFEST_FOLDER, filename=f"{url_id}/{version}-{base}", sources=(url,),
                     defined_in="AUTOCLOUD_MANIFEST")
    result = fetch.fetch(spec)
    for old in cached:
        if old.key != spec.key:
            try:
                fetch.store.evict(old.key, force=True)
            except StoreError:
                pass
    return result.path


class Adapter:
    """Ties the core services to ComfyUI's needs; every public method is safe from any thread."""

    def __init__(self, settings: Settings, store: Store, fetch: FetchService, catalog: Catalog, *,
                 is_present: IsPresent | None = None) -> None:
        self.settings = settings
        self.store = store
        self.fetch_service = fetch
        self.catalog = catalog
        self.tracker = Tracker()
        self.is_present: IsPresent = is_present or self._in_store
        self.allowed_hosts: tuple[str, ...] = tuple(settings.values.get("allowed_hosts", ()))
        parallel = int(settings.values.get("parallel") or 4)
        # Room for a full prefetch plus on-demand fetches that arrive meanwhile.
        self._pool = ThreadPoolExecutor(max_workers=parallel + 2, thread_name_prefix="autocloud-fetch")
        self._lock = threading.Lock()
        self._futures: dict[str, Future[FetchResult]] = {}
        self._failed: dict[str, tuple[float, AutoCloudError]] = {}
        self._on_commit: list[Callable[[str], None]] = []
        self.manifest_error: str | None = None
        self._manifest_keys: set[str] = set()  # catalog keys the manifests defined (not API-added ones)
        self._manifest_sig: tuple[tuple[str, int, int], ...] | None = None
        self._watch_stop = threading.Event()
        self._watcher: threading.Thread | None = None
        # Cancelled when the interpreter exits, before the pool's threads are joined: quitting ComfyUI
        # must not wait for a 10 GB download (its partial file is kept and resumed next time).
        self.peer_node: Any = None  # fleet.node.PeerNode when AUTOCLOUD_PEER_SERVE is on
        self._tokens: dict[str, CancelToken] = {}  # one per running download: the panel's cancel button
        self.layout_provider: Callable[[], Any] | None = None  # hooks.layout: the folders ComfyUI reads
        register = getattr(threading, "_register_atexit", None)
        if callable(register):
            try:
                register(self.cancel_all)
            except RuntimeError:  # already shutting down
                pass

    @classmethod
    def create(cls, settings: Settings, *, is_present: IsPresent | None = None) -> Adapter:
        """Open the store and load the manifests; a broken manifest is reported, not fatal."""
        built = services.build(settings, alone_on_fleet_error=True)  # ComfyUI starts even if Redis is wrong
        adapter = cls(settings, built.store, built.fetch, Catalog(), is_present=is_present)
        if built.fleet is not None and settings.values.get("peer_serve"):
            from comfy_autocloud.fleet.node import PeerNode

            try:
                adapter.peer_node = PeerNode.from_settings(built.store, built.fleet, settings).start()
            except OSError as exc:  # e.g. the port is taken: fetch through the fleet, just don't serve
                log.error("autocloud: peer server not started: %s", exc)
        adapter.load_manifests()
        interval = float(settings.values.get("manifest_reload") or 0)
        if interval > 0 and adapter._local_manifest_paths():
            adapter.watch_manifests(interval)
        return adapter

    def _local_manifest_paths(self) -> list[Path]:
        return [Path(e).expanduser() for e in self.settings.values.get("manifest", ()) if not is_url(e)]

    def load_manifests(self) -> int:
        """(Re)load AUTOCLOUD_MANIFEST into the catalog; returns how many entries it has.

        A reload replaces what the manifests defined (entries removed from a list disappear, changed ones
        change); entries added through the API stay. A broken manifest keeps the previous catalog. Local
        directories are read under `fetch.sync`'s shared lock, so a sync in progress is never half-seen.
        """
        from contextlib import ExitStack

        from comfy_autocloud.fetch.sync import directory_signature, locked_view

        entries = tuple(self.settings.values.get("manifest", ()))
        if not entries:
            return len(self.catalog)
        local = self._local_manifest_paths()
        try:
            with ExitStack() as stack:
                for p in local:
                    if p.is_dir():
                        stack.enter_context(locked_view(p))
                self._manifest_sig = directory_signature(local)
                specs = load_manifests(manifest_paths(entries, self.fetch_service,
                                                      self.settings.values.get("network_list_local_dirs", ())))
        except (AutoCloudError, OSError) as exc:
            self.manifest_error = str(exc)
            log.error("autocloud: manifest not loaded (the previous list keeps serving): %s", exc)
            return len(self.catalog)
        self.manifest_error = None
        with self._lock:
            self.catalog.replace(specs, "manifest")
            self._manifest_keys = {s.key for s in specs}
        log.info("autocloud: %d models offered from %s", len(self.catalog), ", ".join(map(redact_url, entries)))
        return len(self.catalog)

    def check_manifests(self) -> bool:
        """Reload when a local manifest file or directory changed since the last load (the watcher's step)."""
        from comfy_autocloud.fetch.sync import directory_signature

        if directory_signature(self._local_manifest_paths()) == self._manifest_sig:
            return False
        before = set(self._manifest_keys)
        self.load_manifests()
        for folder in sorted({k.partition("/")[0] for k in before | self._manifest_keys}):
            self._changed(f"{folder}/")  # ComfyUI caches each folder's file list (what the catalog offered)
        return True

    def watch_manifests(self, interval: float) -> threading.Thread:
        """Poll local manifests every `interval` s: `autocloud manifest sync` on this node (or a sidecar)
        changes the files, and running ComfyUI offers the new lists without a restart."""

        def loop() -> None:
            while not self._watch_stop.wait(interval):
                try:
                    self.check_manifests()
                except Exception:
                    log.exception("autocloud: manifest reload failed")

        if self._watcher is None:
            self._watcher = threading.Thread(target=loop, name="autocloud-manifest-watch", daemon=True)
            self._watcher.start()
        return self._watcher

    def on_commit(self, fn: Callable[[str], None]) -> None:
        """Call `fn(key)` after a file lands in (or leaves) the cache (ComfyUI's file-list cache)."""
        self._on_commit.append(fn)

    def _changed(self, key: str) -> None:
        for fn in self._on_commit:
            try:
                fn(key)
            except Exception:
                log.debug("autocloud: commit listener failed", exc_info=True)

    def _in_store(self, folder: str, filename: str) -> bool:
        spec = self.catalog.lookup(folder, filename)
        key = spec.key if spec is not None else f"{folder}/{filename}"
        try:
            return self.store.path_for(key).is_file()
        except StoreError:
            return False

    # ------------------------------------------------------------------ downloads
    def submit(self, spec: ModelSpec, reason: str) -> Future[FetchResult]:
        """Start (or join) the download of `spec` on the adapter's pool; one future per key."""
        with self._lock:
            fut = self._futures.get(spec.key)
            if fut is not None:
                return fut
            failed = self._failed.get(spec.key)
            if failed is not None and time.monotonic() - failed[0] < FAILURE_MEMORY:
                fut = Future()
                fut.set_exception(failed[1])
                return fut
            self._failed.pop(spec.key, None)
            self.tracker.begin(spec.key, reason)
            token = self._tokens[spec.key] = CancelToken()
            fut = self._pool.submit(self._run, spec, reason, token)
            self._futures[spec.key] = fut
            return fut

    def cancel(self, key: str) -> bool:
        """Stop a running download (its partial file is kept for resuming); False if none is running."""
        with self._lock:
            token = self._tokens.get(key)
        if token is None:
            return False
        token.cancel()
        return True

    def cancel_all(self) -> None:
        with self._lock:
            tokens = list(self._tokens.values())
        for token in tokens:
            token.cancel()

    def _run(self, spec: ModelSpec, reason: str, token: CancelToken) -> FetchResult:
        try:
            result = self.fetch_service.fetch(spec, progress=self.tracker.callback(reason), cancel=token)
        except AutoCloudError as exc:
            cancelled = isinstance(exc, Cancelled)
            with self._lock:
                if not cancelled:  # a cancelled download may be asked for again at once
                    self._failed[spec.key] = (time.monotonic(), exc)
                self._futures.pop(spec.key, None)
                self._tokens.pop(spec.key, None)
            self.tracker.finish(spec.key, error=str(exc), cancelled=cancelled)
            if not cancelled and self.catalog.remove(spec.folder, spec.filename):
                # a workflow's or a request's URL that failed is no longer offered (the manifest's stay)
                self._changed(spec.key)
            (log.info if cancelled else log.error)("autocloud: %s", exc)
            raise
        except BaseException as exc:
            with self._lock:
                self._futures.pop(spec.key, None)
                self._tokens.pop(spec.key, None)
            self.tracker.finish(spec.key, error=f"{spec.key}: {type(exc).__name__}: {exc}")
            raise
        with self._lock:
            self._futures.pop(spec.key, None)
            self._tokens.pop(spec.key, None)
        self.tracker.finish(spec.key, bytes_downloaded=result.bytes_downloaded, seconds=result.seconds,
                            cached=result.cached)
        self._changed(spec.key)
        return result

    def wait(self, spec: ModelSpec, reason: str, progress: ProgressSink | None = None, poll: float = 0.1) -> Path:
        """Block until `spec` is in the cache (joining a running download); ModelUnavailable on failure."""
        fut = self.submit(spec, reason)
        while True:
            try:
                return fut.result(timeout=poll).path
            except FutureTimeout:
                if progress is not None:
                    st = self.tracker.state(spec.key)
                    if st is not None and st.bytes_total:
                        try:
                            progress(st.bytes_done, st.bytes_total)
                        except BaseException:
                            # ComfyUI's ProgressBar raises when the user interrupts the prompt: stop the
                            # download as well (its partial file is kept and resumes on the next request).
                            self.cancel(spec.key)
                            raise
            except AutoCloudError as exc:
                raise ModelUnavailable(f"AutoCloud could not download {spec.key}: {exc.reason} "
                                       f"[{type(exc).__name__}]") from exc

    def resolve_missing(self, folder: str, filename: str, progress: ProgressSink | None = None) -> Path | None:
        """get_full_path's fallback: a catalog entry that is not on disk is downloaded now."""
        spec = self.catalog.lookup(folder, filename)
        if spec is None or not spec.sources:
            return None
        return self.wait(spec, "on-demand", progress)

    def record_access(self, path: str | os.PathLike[str]) -> None:
        """A file ComfyUI resolved: if it is ours, count a hit and touch its index row (eviction order)."""
        try:
            rel = Path(path).resolve().relative_to(self.store.root.resolve())
        except (ValueError, OSError):
            return
        try:
            key = rel.as_posix()
            split_key(key)
            self.store.touch(key)
            self.tracker.hit()
        except (ValueError, StoreError):
            pass

    def prefetch(self, json_data: Any) -> PrefetchPlan:
        """Start every missing model of a queued prompt now, in parallel; returns the plan."""
        plan = plan_prefetch(json_data, self.catalog, self.is_present, self.allowed_hosts)
        for spec in plan.fetch:
            self.submit(spec, "prefetch")
        if plan.fetch:
            log.info("autocloud: prefetching %d models: %s", len(plan.fetch), ", ".join(s.key for s in plan.fetch))
        if plan.unknown:
            log.info("autocloud: no source for %s", ", ".join(plan.unknown))
        return plan

    # ------------------------------------------------------------------ actions (routes)
    def spec_for_request(self, body: Any) -> ModelSpec:
        """`{key}` (a catalog entry) or `{url, folder, name?}` (an allowlisted URL) as a ModelSpec."""
        if not isinstance(body, dict):
            raise ManifestError("request", "expected a JSON object {key} or {url, folder, name}")
        if body.get("key"):
            key = str(body["key"])
            try:
                folder, filename = split_key(key)
            except ValueError as exc:
                raise ManifestError("request.key", str(exc)) from None
            spec = self.catalog.lookup(folder, filename)
            if spec is None or not spec.sources:
                raise ManifestError("request.key", f"{key} is not in any manifest; give {{url, folder, name}}")
            return spec
        url, folder = body.get("url"), body.get("folder")
        if not isinstance(url, str) or not isinstance(folder, str) or not url or not folder:
            raise ManifestError("request", "give {key} or {url, folder, name}")
        if not host_allowed(url, self.allowed_hosts):
            raise ManifestError("request.url", f"{redact_url(url)}: host not in AUTOCLOUD_ALLOWED_HOSTS "
                                               f"({', '.join(self.allowed_hosts) or 'empty'})")
        name = body.get("name") or unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        try:
            spec = ModelSpec(folder=folder, filename=str(name), sources=(url,), sha256=body.get("sha256"),
                             defined_in="POST /autocloud/fetch")
        except SpecError as exc:  # every bad field, each naming the value it refuses
            raise ManifestError("request", str(exc)) from None
        return self.catalog.add([spec], "request")[0]

    def request_fetch(self, body: Any) -> str:
        """The panel's fetch/retry/resume: tries again at once (a remembered failure is for loaders only)."""
        spec = self.spec_for_request(body)
        with self._lock:
            self._failed.pop(spec.key, None)
        self.submit(spec, "api")
        return spec.key

    def dismiss(self, key: str) -> bool:
        """Forget the finished (failed or cancelled) download of `key` shown by the panel."""
        return self.tracker.dismiss(key)

    def check_workflow(self, workflow: Any) -> dict[str, Any]:
        """What the browser asks when a workflow loads: each model it names, whether AutoCloud can provide
        it, and the workflow's allowlisted download hints added to the catalog (so Run finds them).

        A model is `cached` (in AutoCloud's cache), `on_disk` (in another folder ComfyUI reads),
        `downloading`, `available` (a source is known: it downloads on Run), `refused` (its URL's host
        is not in AUTOCLOUD_ALLOWED_HOSTS) or `missing` (nobody can provide it).
        """
        if not isinstance(workflow, dict):
            raise ManifestError("request.workflow", "expected the workflow object (the editor's JSON)")
        refs = workflow_model_refs(workflow, "request.workflow")
        hints, _ = allowed_hints(refs, self.allowed_hosts)
        if hints:
            self.catalog.add(hints, "workflow")
            for folder in sorted({h.folder for h in hints}):
                self._changed(f"{folder}/")
        active = {d["key"] for d in self.tracker.active()}
        models: list[dict[str, Any]] = []
        for ref in refs:
            spec = self.catalog.lookup(ref.folder, ref.filename)
            key = spec.key if spec is not None else ref.key
            folder = comfy_folder(ref.folder)
            row: dict[str, Any] = {"key": key, "folder": folder, "name": ref.filename,
                                   "directories": [folder, *(k for k, v in LEGACY_FOLDERS.items() if v == folder)],
                                   "origin": self.catalog.origin(ref.folder, ref.filename),
                                   "size": spec.size if spec is not None else None}
            if key in active:
                row["status"] = "downloading"
            elif self._in_store(ref.folder, ref.filename):
                row["status"] = "cached"
            elif self.is_present(ref.folder, ref.filename):
                row["status"] = "on_disk"
            elif spec is not None and spec.sources:
                row["status"] = "available"
            elif ref.sources:
                row["status"] = "refused"
                row["reason"] = (f"{', '.join(redact_url(u) for u in ref.sources)}: host not in "
                                 f"AUTOCLOUD_ALLOWED_HOSTS ({', '.join(self.allowed_hosts) or 'empty'})")
            else:
                row["status"] = "missing"
            models.append(row)
        return {"models": models}

    def doctor(self) -> dict[str, Any]:
        """`autocloud doctor`'s checks as this ComfyUI process sees them (GET /autocloud/doctor)."""
        from comfy_autocloud.doctor import report, run_checks

        lay = self.layout_provider() if self.layout_provider is not None else None
        checks = run_checks(self.settings, lay, cached_bytes=self.store.usage().bytes,
                            manifest_loaded=len(self._manifest_keys), manifest_error=self.manifest_error)
        return report(checks, lay)

    def evict(self, key: str, force: bool = False) -> dict[str, Any]:
        entry = self.store.evict(key, force=force)
        self._changed(key)
        return {"key": entry.key, "size": entry.size}

    def set_pinned(self, key: str, pinned: bool) -> None:
        (self.store.pin if pinned else self.store.unpin)(key)

    # ------------------------------------------------------------------ reading
    def status(self) -> dict[str, Any]:
        """The JSON of GET /autocloud/status (shape of `autocloud status --json`, plus downloads)."""
        usage = self.store.usage()
        entries = self.store.entries()
        cached = {e.key for e in entries}
        files = sorted(entries, key=lambda e: -e.last_access)[:STATUS_ENTRIES]
        downloads = self.tracker.active()
        busy = {d["key"] for d in downloads}
        origins = {s.key: o for s, o in self.catalog.entries()}
        available = [{"key": s.key, "size": s.size, "origin": o} for s, o in self.catalog.entries()
                     if s.key not in cached and s.key not in busy and s.sources
                     and not s.key.startswith(MANIFEST_FOLDER + "/")]
        recent = self.tracker.recent()
        for d in (*downloads, *recent):
            d["origin"] = origins.get(d["key"])
        return {
            "cache_dir": str(self.store.root),
            "policy": self.store.policy.name,
            **usage.as_dict(),
            "pinned": sum(e.pinned for e in entries),
            "in_use": sum(e.in_use for e in entries),
            "files": [{"key": e.key, "size": e.size, "hits": e.hits, "last_access": e.last_access,
                       "created": e.created, "pinned": e.pinned, "in_use": e.in_use, "source": redact_url(e.source),
                       "origin": origins.get(e.key)}
                      for e in files],
            "downloads": downloads,
            "recent": recent,
            "available": sorted(available, key=lambda a: a["key"])[:STATUS_ENTRIES],
            "catalog_entries": len(self.catalog),
            "manifest_error": self.manifest_error,
            "counters": self.tracker.counters_dict(),
        }

    def close(self) -> None:
        if self.peer_node is not None:
            self.peer_node.stop()
        if self.fetch_service.fleet is not None:
            self.fetch_service.fleet.close()
        self._watch_stop.set()
        if self._watcher is not None:
            self._watcher.join(5)
        self.cancel_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self.store.close()
