"""The preload registry: loaded models held by strong references, handed out as clones.

ComfyUI's own model cache keeps only weak references (`current_loaded_models`) and its execution cache
forgets a checkpoint as soon as a workflow uses another one, so switching A -> B -> A rereads A from
disk. The registry keeps every configured object alive, keyed by what was loaded (kind, file names,
options) and checked against the files' identity (size, mtime_ns, inode) so a replaced file is
reloaded instead of served stale; a deleted (or moved) one is not an error: the held copy is still exactly
what was loaded, so it is served and the entry says so. Loads go through a `WorkGate` (gate.py) so that
preloading never runs ComfyUI code beside a prompt. Everything ComfyUI-specific sits behind `Backend`; this
module imports neither torch nor ComfyUI, so its logic is tested on plain torch modules.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Protocol

from comfy_autocloud.preload.gate import WorkGate

log = logging.getLogger("comfy_autocloud.preload")

KINDS = ("checkpoint", "text_encoder", "diffusion_model", "vae")


_local = threading.local()


def in_preload() -> bool:
    """True inside the registry's preload pass (no prompt is running: no node progress bar to drive)."""
    return bool(getattr(_local, "preload", False))


class BudgetExceeded(RuntimeError):
    """Keeping one more object would take the registry past its RAM budget."""


class HeldState(str, Enum):
    QUEUED = "queued"
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"


@dataclass(frozen=True)
class FileIdentity:
    """What tells a file apart from a replaced one without reading it: size, mtime_ns, inode."""

    path: str
    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> FileIdentity:
        st = os.stat(path)
        return cls(str(path), st.st_size, st.st_mtime_ns, st.st_ino)


@dataclass(frozen=True)
class LoadRequest:
    """One loader call: kind, file names as the loader node gets them, loader options, optional key."""

    kind: str
    files: tuple[str, ...]
    options: tuple[tuple[str, str], ...] = ()
    cache_key: str = ""
    where: str = ""  # the config entry that asked for it, for messages

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown model kind {self.kind!r}; expected one of: {', '.join(KINDS)}")
        if not self.files:
            raise ValueError(f"{self.kind}: no file names")

    @classmethod
    def make(cls, kind: str, files: Iterable[str], options: dict[str, Any] | None = None, cache_key: str = "",
             where: str = "") -> LoadRequest:
        opts = tuple(sorted((str(k), str(v)) for k, v in (options or {}).items()))
        return cls(kind, tuple(files), opts, cache_key or "", where)

    @property
    def slot(self) -> tuple[str, tuple[str, ...], tuple[tuple[str, str], ...]]:
        """What was loaded; two requests with the same slot share one object."""
        return (self.kind, self.files, self.options)

    @property
    def name(self) -> str:
        """Stable, readable name: the given cache_key, else kind + files (+ non-default options)."""
        if self.cache_key:
            return self.cache_key
        opts = ",".join(f"{k}={v}" for k, v in self.options if v not in ("default", ""))
        return f"{self.kind}:{'+'.join(self.files)}" + (f"[{opts}]" if opts else "")

    def option(self, key: str, default: str = "default") -> str:
        return dict(self.options).get(key, default)


def derive_key(req: LoadRequest, identity: tuple[FileIdentity, ...]) -> str:
    """The cache key: the given one, else kind + names + options + file identity (a new file, a new key)."""
    if req.cache_key:
        return req.cache_key
    h = hashlib.sha256(repr((req.slot, [(i.size, i.mtime_ns, i.inode) for i in identity])).encode())
    return f"{req.name}@{h.hexdigest()[:12]}"


class Backend(Protocol):
    """How objects of each kind are found, loaded, cloned and measured (ComfyUI's loaders, or plain torch)."""

    def resolve(self, req: LoadRequest) -> list[Path]:
        """Local paths of the request's files (may download a missing one); FileNotFoundError if none."""

    def load(self, req: LoadRequest, paths: list[Path]) -> Any:
        """Load the object exactly as the stock loader would."""

    def clone(self, req: LoadRequest, value: Any) -> Any:
        """A copy sharing the weights whose patches never reach `value`."""

    def tensors(self, value: Any) -> dict[str, Any]:
        """The object's weight tensors by name (for its size and fingerprint)."""

    def to_device(self, value: Any, device: str) -> str:
        """Move (or fully load) the object onto `device` ('cpu' or 'gpu'); returns the device it is on."""

    # Optional: `warm_up(req, value) -> list[str]` runs the object once on a tiny input (first-call costs
    # paid at start-up); the registry calls it after `to_device` when present.


@dataclass
class HeldModel:
    """One model in the registry: its request, state, the held object and what loading it cost."""

    request: LoadRequest
    key: str = ""
    state: HeldState = HeldState.QUEUED
    error: str | None = None
    value: Any = None
    identity: tuple[FileIdentity, ...] = ()
    nbytes: int = 0
    load_seconds: float = 0.0
    loads: int = 0
    hits: int = 0
    device: str = ""
    loaded_at: float = 0.0
    fingerprint: str | None = None
    refs: dict[str, Any] = field(default_factory=dict, repr=False)
    cached: bool = True  # False: the last load was handed out but not kept (budget)
    warmed: tuple[str, ...] = ()
    warm_seconds: float = 0.0
    load_started: float = 0.0
    file_missing: bool = False  # ready, but its file was deleted or moved away since: served from memory
    note: str | None = None

    @property
    def name(self) -> str:
        return self.request.name

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "key": self.key or None, "kind": self.request.kind,
                "files": list(self.request.files), "options": dict(self.request.options),
                "state": self.state.value, "error": self.error, "bytes": self.nbytes,
                "load_seconds": round(self.load_seconds, 4), "loads": self.loads, "hits": self.hits,
                "device": self.device or None, "where": self.request.where or None,
                "paths": [i.path for i in self.identity], "file_missing": self.file_missing, "note": self.note,
                "load_started": self.load_started or None, "loaded_at": self.loaded_at or None,
                "warmed": list(self.warmed), "warm_seconds": round(self.warm_seconds, 4)}


def tensor_nbytes(tensors: dict[str, Any]) -> int:
    """Bytes of the distinct storages behind `tensors` (tied or viewed weights count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors.values():
        try:
            st = t.untyped_storage()
            seen[(str(t.device), st.data_ptr())] = st.nbytes()
        except (AttributeError, RuntimeError):
            seen[("?", id(t))] = int(t.numel() * t.element_size())
    return sum(seen.values())


def fingerprint(tensors: dict[str, Any]) -> str:
    """blake2b over every tensor's bytes: proves a cached base was not written in place (e.g. by a LoRA)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].detach()
        if t.device.type != "cpu":
            t = t.cpu()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.contiguous().reshape(-1).view(dtype=_uint8()).numpy().tobytes())
    return h.hexdigest()


def _uint8() -> Any:
    import torch

    return torch.uint8


class PreloadRegistry:
    """Entries by slot; one loader thread per entry at a time, everyone else waits for it."""

    def __init__(self, backend: Backend, *, ram_budget: int | None = None, fingerprints: bool = False,
                 gate: WorkGate | None = None) -> None:
        self.backend = backend
        self.gate = gate or WorkGate()  # inside ComfyUI: the process-wide one the prompt worker also holds
        self.ram_budget = ram_budget
        self.fingerprints = fingerprints
        self._cond = threading.Condition(threading.RLock())
        self._entries: dict[tuple[Any, ...], HeldModel] = {}
        self._names: dict[str, tuple[Any, ...]] = {}
        self.config_errors: list[str] = []
        self.config_path: str | None = None
        self.auto_gpu_load = False
        self.warm_up = True  # to_device also runs each object once (Backend.warm_up) when the backend can
        self.phase = "idle"  # start-up: "preloading" -> "device" (auto_gpu_load) -> "executor" -> "ready"
        self.executor_warmup: dict[str, Any] | None = None  # what the start-up's executor warm-up took
        self.loads_total = 0
        self.hits_total = 0
        self.misses_total = 0
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ registering
    def queue(self, requests: Iterable[LoadRequest]) -> list[HeldModel]:
        """Register requests as queued (no I/O); a cache_key used twice is reported, not registered."""
        out = []
        with self._cond:
            for req in requests:
                slot = self._names.get(req.name)
                if slot is not None and slot != req.slot:
                    msg = (f"{req.where or req.name}: cache_key {req.name!r} is already used by "
                           f"{self._entries[slot].request.where or self._entries[slot].name}")
                    self.config_errors.append(msg)
                    log.error("autocloud preload: %s", msg)
                    continue
                entry = self._entries.get(req.slot)
                if entry is None:
                    entry = HeldModel(req)
                    self._entries[req.slot] = entry
                    self._names[req.name] = req.slot
                out.append(entry)
        return out

    def report_error(self, message: str) -> None:
        """A config entry that could not even become a request (shown by status and the info node)."""
        with self._cond:
            self.config_errors.append(message)
        log.error("autocloud preload: %s", message)

    # ------------------------------------------------------------------ loading
    def preload(self, requests: Iterable[LoadRequest] | None = None) -> list[HeldModel]:
        """Load every queued entry in this thread; failures are recorded on the entry, never raised."""
        if requests is not None:
            self.queue(requests)
        with self._cond:
            todo = [e for e in self._entries.values() if e.state == HeldState.QUEUED]
        for entry in todo:
            with self._cond:
                if entry.state != HeldState.QUEUED:  # a loader node took it meanwhile
                    continue
            _local.preload = True
            try:
                self._get(entry.request, preload=True)
            except Exception as exc:
                with self._cond:
                    if entry.state != HeldState.FAILED:
                        entry.state, entry.error = HeldState.FAILED, _reason(exc)
                        self._cond.notify_all()
                log.error("autocloud preload: %s not preloaded: %s", entry.request.where or entry.name,
                          entry.error)
            finally:
                _local.preload = False
        return todo

    def startup(self, auto_gpu_load: bool = False, then: Callable[[], dict[str, Any]] | None = None) -> None:
        """ComfyUI start-up: preload every queued entry, then (auto_gpu_load) put each on the device and warm it
        up, then run `then` (the adapter's executor warm-up; its result goes in the status); `phase` in the
        status says how far it got ("ready": a first prompt pays none of it)."""
        self.phase = "preloading"
        try:
            self.preload()
            if auto_gpu_load:
                self.phase = "device"
                self.to_device("gpu")
            if then is not None:
                self.phase = "executor"
                self.executor_warmup = then()
        finally:
            self.phase = "ready"

    def start(self, requests: Iterable[LoadRequest] | None = None) -> threading.Thread:
        """Preload in a background thread; loaders that need an entry meanwhile wait for it."""
        if requests is not None:
            self.queue(requests)
        t = threading.Thread(target=self.preload, name="autocloud-preload", daemon=True)
        self._thread = t
        t.start()
        return t

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no entry is queued or loading; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while any(e.state in (HeldState.QUEUED, HeldState.LOADING) for e in self._entries.values()):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(0.5 if left is None else min(left, 0.5))
        return True

    def get(self, req: LoadRequest) -> Any:
        """A clone of the object for `req`: from memory, after waiting for a running load, or loaded now."""
        return self.backend.clone(req, self._get(req)[1])

    def get_by_name(self, name: str) -> Any:
        """Selector nodes: the entry registered under `name` (its cache_key or derived name)."""
        with self._cond:
            slot = self._names.get(name)
            entry = self._entries.get(slot) if slot is not None else None
        if entry is None:
            raise KeyError(f"{name!r} is not in the preload registry; known: {', '.join(sorted(self._names))}")
        return self.get(entry.request)

    def _budget_used(self, but: HeldModel) -> int:
        return sum(e.nbytes for e in self._entries.values() if e is not but and e.state == HeldState.READY)

    def _get(self, req: LoadRequest, *, preload: bool = False) -> tuple[HeldModel, Any]:
        held = self._held_without_file(req, preload)
        if held is not None:
            return held
        try:
            paths = self.backend.resolve(req)
            identity = tuple(FileIdentity.of(p) for p in paths)
        except Exception as exc:
            held = self._held_without_file(req, preload)  # deleted between the check and resolve()
            if held is not None:
                return held
            self._fail(req, exc, queued_only=not preload)
            raise
        with self._cond:
            hit = self._lookup(req, identity, preload)
        if hit is not None:
            return hit
        # A load calls ComfyUI's loaders: never while a prompt runs (background), never during a preload
        # step (foreground). See gate.py for why.
        with self.gate.background() if preload else self.gate.foreground():
            return self._load(req, paths, identity, preload)

    def _lookup(self, req: LoadRequest, identity: tuple[FileIdentity, ...], preload: bool
                ) -> tuple[HeldModel, Any] | None:
        """(under _cond) The held object when its files are unchanged, after waiting for a running load."""
        while True:
            entry = self._entries.get(req.slot)
            if entry is None or entry.state != HeldState.LOADING:
                break
            self._cond.wait(0.5)
        if entry is None or entry.state != HeldState.READY or entry.identity != identity:
            return None
        if not preload:
            entry.hits += 1
            self.hits_total += 1
        if entry.file_missing:
            entry.file_missing, entry.note = False, None
            log.info("autocloud preload: %s is back on disk, unchanged", entry.name)
        return entry, entry.value

    def _held_without_file(self, req: LoadRequest, preload: bool) -> tuple[HeldModel, Any] | None:
        """A ready entry whose file was deleted or moved away: the memory copy is still exactly what was
        loaded, so keep serving it (no error, no re-download through the fetch hook), and say so once."""
        with self._cond:
            entry = self._entries.get(req.slot)
            if entry is None or entry.state != HeldState.READY or not entry.identity:
                return None
            identity = entry.identity
        gone = [i.path for i in identity if not _exists(i.path)]
        if not gone:
            return None
        with self._cond:
            if entry.state != HeldState.READY or entry.identity != identity:  # reloaded meanwhile
                return None
            first = not entry.file_missing
            if first:
                entry.file_missing = True
                entry.note = (f"file gone from disk ({', '.join(gone)}); serving the copy loaded at "
                              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(entry.loaded_at))}")
            if not preload:
                entry.hits += 1
                self.hits_total += 1
            value = entry.value
        if first:
            log.warning("autocloud preload: %s: %s", entry.name, entry.note)
        return entry, value

    def _load(self, req: LoadRequest, paths: list[Path], identity: tuple[FileIdentity, ...],
              preload: bool) -> tuple[HeldModel, Any]:
        with self._cond:
            hit = self._lookup(req, identity, preload)  # loaded by someone else while we waited for the gate
            if hit is not None:
                return hit
            entry = self._entries.get(req.slot)
            if entry is None:
                entry = HeldModel(req)
                self._entries[req.slot] = entry
                self._names.setdefault(req.name, req.slot)
            stale = entry.state == HeldState.READY
            entry.state, entry.error = HeldState.LOADING, None
            if not preload:
                self.misses_total += 1
            used = self._budget_used(entry)
        if stale:
            log.info("autocloud preload: %s changed on disk; reloading", entry.name)
        keep = True
        estimate = sum(i.size for i in identity)
        if self.ram_budget is not None and used + estimate > self.ram_budget:
            msg = (f"RAM budget {_mib(self.ram_budget)} would be exceeded ({_mib(used)} held + ~{_mib(estimate)} "
                   f"for {entry.name})")
            if preload:
                with self._cond:
                    entry.state, entry.error, entry.value, entry.refs = HeldState.FAILED, msg, None, {}
                    entry.nbytes = 0
                    self._cond.notify_all()
                log.warning("autocloud preload: not preloading %s: %s", entry.name, msg)
                raise BudgetExceeded(msg)
            keep = False
            log.warning("autocloud preload: loading %s without keeping it: %s", entry.name, msg)
        with self._cond:
            entry.value, entry.refs = None, {}  # let a stale object go before its replacement is loaded
            entry.file_missing, entry.note = False, None
        t0 = time.perf_counter()
        try:
            value = self.backend.load(req, paths)
            tensors = self.backend.tensors(value)
            nbytes = tensor_nbytes(tensors)
            fp = fingerprint(tensors) if self.fingerprints and keep else None
        except BaseException as exc:
            with self._cond:
                entry.state, entry.error, entry.nbytes = HeldState.FAILED, _reason(exc), 0
                self._cond.notify_all()
            raise
        seconds = time.perf_counter() - t0
        with self._cond:
            self.loads_total += 1
            entry.loads += 1
            entry.load_seconds = seconds
            entry.load_started = time.time() - seconds
            entry.identity = identity
            entry.key = derive_key(req, identity)
            if keep and self.ram_budget is not None and used + nbytes > self.ram_budget:
                keep = False
                log.warning("autocloud preload: %s takes %s; not kept within the RAM budget %s", entry.name,
                            _mib(nbytes), _mib(self.ram_budget))
            if keep:
                # Held tensor references would pin CPU copies once ComfyUI moves the weights to the GPU:
                # keep them only when fingerprints are asked for.
                refs = tensors if self.fingerprints else {}
                entry.state, entry.value, entry.refs, entry.nbytes = HeldState.READY, value, refs, nbytes
                entry.fingerprint, entry.loaded_at, entry.cached = fp, time.time(), True
                entry.device = entry.device or "cpu"
            else:
                entry.state, entry.nbytes, entry.cached = HeldState.FAILED, 0, False
                entry.error = f"not kept: RAM budget {_mib(self.ram_budget or 0)}"
            self._cond.notify_all()
        log.info("autocloud preload: %s %s in %.2fs (%s)", "loaded" if keep else "loaded (not kept)", entry.name,
                 seconds, _mib(nbytes))
        return entry, value

    def _fail(self, req: LoadRequest, exc: BaseException, *, queued_only: bool) -> None:
        with self._cond:
            entry = self._entries.get(req.slot)
            if entry is None or (queued_only and entry.state != HeldState.QUEUED):
                return
            if entry.state in (HeldState.QUEUED, HeldState.READY, HeldState.FAILED):
                entry.state, entry.error, entry.value, entry.refs, entry.nbytes = (
                    HeldState.FAILED, _reason(exc), None, {}, 0)
                self._cond.notify_all()

    # ------------------------------------------------------------------ devices
    def to_device(self, device: str, warm_up: bool | None = None) -> dict[str, str]:
        """Move every ready entry to `device` (and warm it up, see `warm_up`); returns name -> device (or error)."""
        with self._cond:
            ready = [e for e in self._entries.values() if e.state == HeldState.READY]
        warm = self.warm_up if warm_up is None else warm_up
        out = {}
        for e in ready:
            try:
                with self.gate.background():  # load_models_gpu: ComfyUI's global model list
                    e.device = self.backend.to_device(e.value, device)
                    if warm:
                        self._warm_up(e)
                out[e.name] = e.device
                if self.fingerprints:  # the moved weights are new tensors: verify those from now on
                    with self._cond:
                        e.refs = self.backend.tensors(e.value)
            except Exception as exc:
                out[e.name] = f"error: {_reason(exc)}"
                log.error("autocloud preload: %s not moved to %s: %s", e.name, device, _reason(exc))
        return out

    def _warm_up(self, e: HeldModel) -> None:
        """First-call costs (device load, kernel set-up, library pages) paid now instead of in the first prompt."""
        fn = getattr(self.backend, "warm_up", None)
        if fn is None or e.value is None:
            return
        t0 = time.perf_counter()
        try:
            e.warmed = tuple(fn(e.request, e.value) or ())
        except Exception as exc:  # best effort: the entry stays ready, the first prompt just pays it
            log.warning("autocloud preload: %s not warmed up: %s", e.name, _reason(exc))
            return
        e.warm_seconds = time.perf_counter() - t0
        log.info("autocloud preload: %s warmed up (%s) in %.2fs", e.name, ", ".join(e.warmed), e.warm_seconds)

    # ------------------------------------------------------------------ reading
    def entries(self, kind: str | None = None) -> list[HeldModel]:
        with self._cond:
            return [e for e in self._entries.values() if kind is None or e.request.kind == kind]

    def names(self, kind: str) -> list[str]:
        return [e.name for e in self.entries(kind)]

    def entry(self, name: str) -> HeldModel | None:
        with self._cond:
            slot = self._names.get(name)
            return self._entries.get(slot) if slot is not None else None

    def verify(self, name: str) -> bool | None:
        """True when the held weights are byte-identical to when they were loaded (None: no fingerprint)."""
        e = self.entry(name)
        if e is None or e.state != HeldState.READY or e.fingerprint is None:
            return None
        return fingerprint(e.refs) == e.fingerprint

    def status(self) -> dict[str, Any]:
        with self._cond:
            entries = [e.info() for e in self._entries.values()]
            held = sum(e.nbytes for e in self._entries.values() if e.state == HeldState.READY)
            return {"config": self.config_path, "auto_gpu_load": self.auto_gpu_load, "phase": self.phase,
                    "executor_warmup": self.executor_warmup,
                    "entries": entries, "bytes_held": held, "ram_budget": self.ram_budget,
                    "loads": self.loads_total, "hits": self.hits_total, "misses": self.misses_total,
                    "config_errors": list(self.config_errors), "gate": self.gate.state(),
                    "counts": {s.value: sum(e["state"] == s.value for e in entries) for s in HeldState}}

    def clear(self) -> None:
        """Drop every held object (memory is freed once no clone refers to it)."""
        with self._cond:
            self._entries.clear()
            self._names.clear()


def _exists(path: str) -> bool:
    """False only when the path is gone (a symlink whose target is gone counts as gone)."""
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    except OSError:  # unreadable now (permissions, a stale mount): not proof that it is gone
        return True
    return True


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


_current: PreloadRegistry | None = None


def set_current(registry: PreloadRegistry | None) -> None:
    """Make `registry` the process-wide one (the nodes, routes and snapshot API use it)."""
    global _current
    _current = registry


def current() -> PreloadRegistry | None:
    return _current
