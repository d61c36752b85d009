"""A persistent group of worker processes, one per device, that runs model calls together.

Why a separate group instead of making ComfyUI's process a rank: the server must never block inside
a collective. Workers are started once (``torch.distributed`` initialised once per worker), reused
across prompts, and receive weights as one shared-memory handle (``SharedWeights``), never from disk.
The dispatcher waits on every worker's pipe *and* process sentinel, so a worker that dies mid-run
becomes a clear ``WorkerDiedError`` instead of a hang; the group is then torn down and the next call
starts a fresh one (a new generation) and re-sends the registered weights.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import multiprocessing.connection as mpc
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.multiprocessing as tmp

from .shm import SharedWeights, mapped_shm_names, memory_status

__all__ = ["ParallelConfig", "WorkerDiedError", "WorkerError", "WorkerGroup", "get_worker_group",
           "shutdown_all_groups"]


class WorkerError(RuntimeError):
    """A parallel worker failed; the message carries the rank and the worker's traceback."""


class WorkerDiedError(WorkerError):
    """A worker process exited while the group was running a call."""


@dataclass(frozen=True)
class ParallelConfig:
    """What the dispatcher node hands to the sampler: one device string per rank and a strategy."""

    devices: tuple[str, ...]
    strategy: str = "auto"
    threads_per_rank: int | None = None

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @classmethod
    def parse(cls, devices: str, world_size: int = 0, strategy: str = "auto",
              threads_per_rank: int | None = None) -> ParallelConfig:
        """``devices``: "auto", "cpu", "cuda", or a list like "cuda:0,cuda:1"; ``world_size`` 0 = all listed."""
        spec = (devices or "auto").strip().lower()
        if spec == "auto":
            spec = "cuda" if torch.cuda.is_available() and torch.cuda.device_count() > 1 else "cpu"
            if spec == "cpu" and world_size <= 0:
                world_size = 1
        if spec == "cuda":
            n = torch.cuda.device_count()
            if n == 0:
                raise ValueError("devices 'cuda' requested but no CUDA device is visible")
            devs = [f"cuda:{i}" for i in range(n)]
        elif spec == "cpu":
            devs = ["cpu"] * max(world_size, 1)
        else:
            devs = [d.strip() for d in spec.split(",") if d.strip()]
            for d in devs:
                torch.device(d)  # raises a clear error for a malformed device string
        if world_size > 0:
            if world_size > len(devs):
                raise ValueError(f"world_size {world_size} is larger than the {len(devs)} devices listed ({spec})")
            devs = devs[:world_size]
        kinds = {torch.device(d).type for d in devs}
        if len(kinds) > 1:
            raise ValueError(f"mixed device types in one group: {', '.join(devs)}")
        return cls(tuple(devs), strategy, threads_per_rank)


# ------------------------------------------------------------------------------------------------ worker side

_INIT_COUNT = 0


def _worker_main(rank: int, world: int, init_file: str, device: str, threads: int | None, conn: Any,
                 timeout_s: float) -> None:
    """Entry point of one worker: init torch.distributed once, then serve requests until told to exit."""
    global _INIT_COUNT
    import torch.distributed as dist

    from .attention import CommCounter
    from .cfg import build_mesh, plan_for, run_plan

    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend, init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
    _INIT_COUNT += 1
    mesh = build_mesh(world, rank)
    counter = CommCounter()
    models: dict[str, tuple[torch.nn.Module, SharedWeights]] = {}
    conn.send(("ok", {"pid": os.getpid(), "rank": rank}))

    def forward(key: str, inputs: dict[str, Any], strategy: str) -> tuple[torch.Tensor, str]:
        model = models[key][0]
        x = inputs["x"].to(dev)
        plan = plan_for(world, strategy, model.params.num_heads, x.shape[0])
        args = [None if inputs.get(k) is None else inputs[k].to(dev)
                for k in ("timestep", "context", "y", "guidance")]
        with torch.inference_mode():
            out = run_plan(model, plan, mesh, counter, x, *args)
        return out, plan.describe()

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        op = msg[0]
        try:
            if op == "exit":
                conn.send(("ok", None))
                break
            if op == "load":
                _, key, shared = msg
                models[key] = (_build_model(shared, dev), shared)
                conn.send(("ok", None))
            elif op == "unload":
                models.pop(msg[1], None)
                conn.send(("ok", None))
            elif op == "forward":
                _, key, inputs, strategy = msg
                out, desc = forward(key, inputs, strategy)
                conn.send(("ok", {"out": out.cpu() if rank == 0 else None, "plan": desc}))
            elif op == "bench":
                _, key, inputs, strategy, steps = msg
                forward(key, inputs, strategy)  # warm-up
                counter.reset()
                times = []
                for _ in range(steps):
                    _sync(dev)
                    dist.barrier()
                    t0 = time.perf_counter()
                    out, desc = forward(key, inputs, strategy)
                    _sync(dev)
                    dist.barrier()
                    times.append(time.perf_counter() - t0)
                conn.send(("ok", {"step_s": sorted(times)[len(times) // 2], "times": times,
                                  "sent": {k: v // steps for k, v in counter.sent.items()},
                                  "plan": desc, "out": out.cpu() if rank == 0 else None}))
            elif op == "info":
                conn.send(("ok", {
                    "pid": os.getpid(), "rank": rank, "init_count": _INIT_COUNT, "threads": torch.get_num_threads(),
                    "memory": memory_status(),
                    "models": {k: {"shm": mapped_shm_names(s.buffer.data_ptr()),
                                   "ptrs_in_buffer": _ptrs_in_buffer(m, s), "nbytes": s.nbytes}
                               for k, (m, s) in models.items()},
                }))
            else:
                conn.send(("error", f"unknown op {op!r}"))
        except Exception:
            conn.send(("error", f"rank {rank}: {traceback.format_exc()}"))
    with contextlib.suppress(Exception):
        dist.destroy_process_group()


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _build_model(shared: SharedWeights, dev: torch.device) -> torch.nn.Module:
    """Model skeleton on the meta device, then the shared views assigned as its parameters (no copy on CPU)."""
    from .flux_sp import FluxConfig, FluxDiT

    builder = shared.meta.get("builder", "flux")
    if builder != "flux":
        raise ValueError(f"unknown model builder {builder!r}")
    with torch.device("meta"):
        model = FluxDiT(FluxConfig.from_any(shared.meta["config"]))
    model.load_state_dict(shared.unpack(dev), strict=True, assign=True)
    return model.eval()


def _ptrs_in_buffer(model: torch.nn.Module, shared: SharedWeights) -> bool:
    lo = shared.buffer.data_ptr()
    hi = lo + shared.nbytes
    return all(lo <= p.data_ptr() < hi for p in model.parameters() if p.device.type == "cpu")


# ------------------------------------------------------------------------------------------------ dispatcher side

@contextlib.contextmanager
def _neutral_main() -> Iterator[None]:
    """Start spawn children without re-running the parent's __main__ (ComfyUI's main.py, pytest's)."""
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "is not responding"
    if code < 0:
        try:
            return f"was killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def _join(errors: list[tuple[int, str]]) -> str:
    return "\n".join(text for _, text in sorted(errors))


@dataclass
class _Live:
    procs: list[Any]
    conns: list[Any]
    init_file: str
    pids: list[int] = field(default_factory=list)
    loaded: set[str] = field(default_factory=set)


class WorkerGroup:
    """One worker process per device; ``call`` runs one request on every rank and returns their replies."""

    def __init__(self, devices: Sequence[str], threads_per_rank: int | None = None, timeout_s: float = 600.0,
                 start_timeout_s: float = 120.0) -> None:
        if not devices:
            raise ValueError("a worker group needs at least one device")
        self.devices = tuple(devices)
        self.threads_per_rank = threads_per_rank
        if threads_per_rank is None and torch.device(self.devices[0]).type == "cpu":
            self.threads_per_rank = max(1, (os.cpu_count() or 1) // len(self.devices))
        self.timeout_s = timeout_s
        self.start_timeout_s = start_timeout_s
        self.generation = 0
        self._live: _Live | None = None
        self._models: dict[str, SharedWeights] = {}
        self._stale: list[str] = []
        self._lock = threading.RLock()

    @property
    def world_size(self) -> int:
        return len(self.devices)

    @property
    def alive(self) -> bool:
        return self._live is not None and all(p.is_alive() for p in self._live.procs)

    @property
    def pids(self) -> list[int]:
        return list(self._live.pids) if self._live else []

    def ensure_started(self) -> None:
        """Start the workers if there is no live group (first use, or after a worker died)."""
        with self._lock:
            if self._live is not None and not self.alive:
                self._teardown()
            if self._live is None:
                self._start()

    def _start(self) -> None:
        ctx = tmp.get_context("spawn")
        fd, init_file = tempfile.mkstemp(prefix="autocloud-dist-")
        os.close(fd)
        os.unlink(init_file)  # the file store must not exist yet
        procs, conns = [], []
        with _neutral_main():
            for rank, device in enumerate(self.devices):
                parent, child = ctx.Pipe()
                p = ctx.Process(target=_worker_main, name=f"autocloud-parallel-{rank}", daemon=True,
                                args=(rank, self.world_size, init_file, device, self.threads_per_rank, child,
                                      self.timeout_s))
                p.start()
                child.close()
                procs.append(p)
                conns.append(parent)
        self._live = _Live(procs, conns, init_file)
        self.generation += 1
        replies = self._collect("start", self.start_timeout_s)
        self._live.pids = [r["pid"] for r in replies]

    def register(self, key: str, shared: SharedWeights) -> None:
        """Remember weights under ``key``; they are sent (as a handle) to each generation that needs them."""
        with self._lock:
            self._models[key] = shared

    def has_model(self, key: str) -> bool:
        return key in self._models

    def forget(self, key: str) -> None:
        """Drop weights without talking to the workers (safe from a GC finalizer); they unload on the next call."""
        self._models.pop(key, None)
        self._stale.append(key)

    def _flush_stale(self) -> None:
        while self._stale:
            key = self._stale.pop()
            if self._live is not None and key in self._live.loaded and key not in self._models:
                self.call(("unload", key))
                self._live.loaded.discard(key)

    def unregister(self, key: str) -> None:
        with self._lock:
            self._models.pop(key, None)
            if self._live and key in self._live.loaded:
                self.call(("unload", key))
                self._live.loaded.discard(key)

    def _ensure_loaded(self, key: str) -> None:
        assert self._live is not None
        self._flush_stale()
        if key in self._live.loaded:
            return
        if key not in self._models:
            raise KeyError(f"no weights registered under {key!r}")
        self.call(("load", key, self._models[key]))
        self._live.loaded.add(key)

    def call(self, msg: tuple[Any, ...], timeout_s: float | None = None) -> list[Any]:
        """Send ``msg`` to every rank and return the replies in rank order (raises WorkerError/WorkerDiedError)."""
        with self._lock:
            self.ensure_started()
            assert self._live is not None
            for conn in self._live.conns:
                conn.send(msg)
            return self._collect(str(msg[0]), timeout_s or self.timeout_s)

    def forward(self, key: str, inputs: dict[str, torch.Tensor | None], strategy: str = "auto",
                ) -> tuple[torch.Tensor, str]:
        """One model call across the group; returns (output, description of the split used)."""
        with self._lock:
            self.ensure_started()
            self._ensure_loaded(key)
            reply = self.call(("forward", key, inputs, strategy))[0]
            return reply["out"], reply["plan"]

    def bench(self, key: str, inputs: dict[str, torch.Tensor | None], strategy: str, steps: int) -> list[dict]:
        """Time ``steps`` calls inside the workers (no dispatcher round trips); per-rank replies."""
        with self._lock:
            self.ensure_started()
            self._ensure_loaded(key)
            return self.call(("bench", key, inputs, strategy, steps))

    def info(self) -> list[dict[str, Any]]:
        return self.call(("info",))

    def _collect(self, op: str, timeout_s: float) -> list[Any]:
        live = self._live
        assert live is not None
        replies: list[Any] = [None] * len(live.procs)
        pending = set(range(len(live.procs)))
        errors: list[tuple[int, str]] = []
        deadline = time.monotonic() + timeout_s
        grace_deadline: float | None = None
        sentinels = {p.sentinel: r for r, p in enumerate(live.procs)}
        while pending:
            now = time.monotonic()
            limit = min(deadline, grace_deadline) if grace_deadline else deadline
            if now >= limit:
                self._teardown()
                if errors:
                    raise WorkerError(f"parallel '{op}' failed; the other ranks could not finish, the group "
                                      f"(generation {self.generation}) was shut down:\n" + _join(errors))
                raise WorkerError(f"parallel '{op}' timed out after {timeout_s:.0f} s waiting for rank(s) "
                                  f"{sorted(pending)}; the group was shut down and restarts on the next run")
            waitables = [live.conns[r] for r in pending] + list(sentinels)
            for obj in mpc.wait(waitables, timeout=limit - now):
                if obj in sentinels:
                    rank = sentinels[obj]
                    if rank in pending or op != "exit":
                        self._raise_died(rank, op)
                    continue
                rank = live.conns.index(obj)
                try:
                    status, payload = obj.recv()
                except (EOFError, OSError):
                    self._raise_died(rank, op)
                pending.discard(rank)
                if status == "ok":
                    replies[rank] = payload
                else:
                    errors.append((rank, str(payload)))
                    grace_deadline = time.monotonic() + 10.0
        if errors:
            raise WorkerError(f"parallel '{op}' failed:\n" + _join(errors))
        return replies

    def _raise_died(self, rank: int, op: str) -> None:
        assert self._live is not None
        proc = self._live.procs[rank]
        proc.join(0.5)
        what = _describe_exit(proc.exitcode)
        pid, gen = proc.pid, self.generation
        self._teardown()
        raise WorkerDiedError(
            f"parallel worker rank {rank} (pid {pid}, device {self.devices[rank]}) {what} during '{op}'; "
            f"worker group generation {gen} was shut down and a fresh group starts on the next run")

    def _teardown(self) -> None:
        live, self._live = self._live, None
        if live is None:
            return
        for p in live.procs:
            if p.is_alive():
                p.terminate()
        end = time.monotonic() + 3.0
        for p in live.procs:
            p.join(max(0.0, end - time.monotonic()))
            if p.is_alive():
                p.kill()
                p.join(1.0)
        for c in live.conns:
            with contextlib.suppress(Exception):
                c.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(live.init_file)

    def close(self) -> None:
        """Ask workers to exit, then make sure they are gone."""
        with self._lock:
            if self._live is not None and self.alive:
                with contextlib.suppress(WorkerError):
                    for conn in self._live.conns:
                        conn.send(("exit",))
                    self._collect("exit", 10.0)
            self._teardown()

    def __enter__(self) -> WorkerGroup:
        self.ensure_started()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_GROUPS: dict[tuple[tuple[str, ...], int | None], WorkerGroup] = {}
_GROUPS_LOCK = threading.Lock()


def get_worker_group(devices: Sequence[str], threads_per_rank: int | None = None) -> WorkerGroup:
    """The process-wide group for these devices (created on first use, reused by every later prompt)."""
    key = (tuple(devices), threads_per_rank)
    with _GROUPS_LOCK:
        group = _GROUPS.get(key)
        if group is None:
            group = _GROUPS[key] = WorkerGroup(devices, threads_per_rank)
        return group


def shutdown_all_groups() -> None:
    with _GROUPS_LOCK:
        groups = list(_GROUPS.values())
        _GROUPS.clear()
    for g in groups:
        g.close()


atexit.register(shutdown_all_groups)
