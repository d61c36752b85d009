"""`autocloud demo`: the whole fetch -> store -> evict path against a local origin, offline, in seconds."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from comfy_autocloud.cli.progress_view import FetchProgress
from comfy_autocloud.cli.store_cmds import render_status
from comfy_autocloud.config import default_settings
from comfy_autocloud.demo.models import read_safetensors_header, write_safetensors
from comfy_autocloud.demo.origin import DemoOrigin
from comfy_autocloud.errors import AutoCloudError
from comfy_autocloud.fetch import FetchResult
from comfy_autocloud.manifest import load_manifests
from comfy_autocloud.services import build
from comfy_autocloud.store import Store
from comfy_autocloud.units import human_rate, human_size

MiB = 2**20


@dataclass(frozen=True)
class DemoModel:
    folder: str
    filename: str
    size: int
    throttled: bool = False

    @property
    def rel(self) -> str:
        return f"{'throttled/' if self.throttled else ''}{self.folder}/{self.filename}"


LIBRARY = (
    DemoModel("checkpoints", "demo-sd15-tiny.safetensors", 96 * MiB, throttled=True),
    DemoModel("text_encoders", "demo-clip-l.safetensors", 40 * MiB),
    DemoModel("vae", "demo-vae.safetensors", 32 * MiB),
    DemoModel("controlnet", "demo-canny.safetensors", 48 * MiB),
    DemoModel("loras", "demo-style-lora.safetensors", 16 * MiB),
)
# Fetched last under a small cap, so the cache has to evict cold files to make room.
LATE = DemoModel("checkpoints", "demo-sdxl-tiny.safetensors", 112 * MiB, throttled=True)


@dataclass
class DemoSummary:
    files: int = 0
    bytes_downloaded: int = 0
    origin_bytes: int = 0
    fetch_seconds: float = 0.0
    hit_ms: float = 0.0
    evicted: list[str] = field(default_factory=list)
    usage_bytes: int = 0
    cap: int = 0

    def as_json(self) -> dict[str, object]:
        return self.__dict__.copy()


def _generate(origin_dir: Path, console: Console) -> dict[str, tuple[str, int]]:
    """Make (or reuse) the origin's files; returns rel -> (sha256, size)."""
    index_path = origin_dir / "index.json"
    known = json.loads(index_path.read_text()) if index_path.is_file() else {}
    out: dict[str, tuple[str, int]] = {}
    for i, m in enumerate((*LIBRARY, LATE)):
        path = origin_dir / m.rel
        if m.rel in known and path.is_file() and path.stat().st_size == m.size:
            out[m.rel] = (known[m.rel], m.size)
            continue
        out[m.rel] = (write_safetensors(path, m.size, seed=1000 + i), m.size)
    index_path.write_text(json.dumps({k: v[0] for k, v in out.items()}))
    total = sum(m.size for m in (*LIBRARY, LATE))
    console.print(f"[bold]1.[/bold] Origin library: {len(out)} generated safetensors files, {human_size(total)}")
    return out


def _write_manifest(path: Path, origin: DemoOrigin, hashes: dict[str, tuple[str, int]]) -> None:
    """Model-list format: {folder: {filename: {url, sha256, size}}}."""
    manifest: dict[str, dict[str, object]] = {}
    for m in (*LIBRARY, LATE):
        sha, size = hashes[m.rel]
        manifest.setdefault(m.folder, {})[m.filename] = {"url": origin.url(m.rel), "sha256": sha, "size": size}
    path.write_text(json.dumps(manifest, indent=2))


def run_demo(workdir: Path, console: Console, *, throttle: int = 24 * MiB) -> DemoSummary:
    summary = DemoSummary()
    origin_dir, cache_dir = workdir / "origin", workdir / "cache"
    hashes = _generate(origin_dir, console)
    with DemoOrigin(origin_dir, throttle=throttle) as origin:
        console.print(f"[bold]2.[/bold] Local origin at http://127.0.0.1:{origin.port} "
                      f"(checkpoints throttled to {human_rate(throttle)} per connection, like a CDN)")
        manifest_path = workdir / "models.json"
        _write_manifest(manifest_path, origin, hashes)
        specs = load_manifests([manifest_path])
        first = [s for s in specs if s.key != f"{LATE.folder}/{LATE.filename}"]
        late = [s for s in specs if s.key == f"{LATE.folder}/{LATE.filename}"]
        console.print(f"[bold]3.[/bold] Manifest {manifest_path} parsed: {len(specs)} entries")

        settings = default_settings()  # the demo is the same on every machine, whatever the user configured
        built = build(settings, cache_dir=cache_dir)
        store, service = built.store, built.fetch
        console.print(f"[bold]4.[/bold] Fetching {len(first)} models into {cache_dir} (verified, resumable):")
        t0 = time.perf_counter()
        with FetchProgress(console) as view:
            results = service.fetch_many(first, parallel=3, progress=view)
        summary.fetch_seconds = time.perf_counter() - t0
        for res in results:
            if not isinstance(res, FetchResult):
                assert isinstance(res, AutoCloudError)
                raise res
            summary.files += 1
            summary.bytes_downloaded += res.bytes_downloaded
            read_safetensors_header(res.path)  # every file is a valid container at its final path
        console.print(f"   {human_size(summary.bytes_downloaded)} in {summary.fetch_seconds:.2f}s "
                      f"({human_rate(summary.bytes_downloaded / summary.fetch_seconds)})")

        t0 = time.perf_counter()
        for spec in first:
            service.ensure(spec)
        summary.hit_ms = (time.perf_counter() - t0) * 1000 / len(first)
        console.print(f"[bold]5.[/bold] Second request for every model: cache hits, {summary.hit_ms:.2f} ms each")
        render_status(store, console)

        ckpt = first[0].key
        store.pin(ckpt)
        for _ in range(3):  # the encoder is hot; the controlnet and lora stay cold
            service.ensure(first[1])
        used = store.usage().bytes
        cap = used + LATE.size - 60 * MiB
        summary.cap = cap
        console.print(f"[bold]6.[/bold] Pinned {ckpt}; cap lowered to {human_size(cap)}, "
                      f"then {LATE.folder}/{LATE.filename} ({human_size(LATE.size)}) is requested:")
        store.close()
        before = {e.key for e in Store(cache_dir).entries()}
        capped_services = build(settings, cache_dir=cache_dir, max_size=cap)
        capped, service = capped_services.store, capped_services.fetch
        with FetchProgress(console) as view:
            res = service.fetch(late[0], progress=view)
        summary.bytes_downloaded += res.bytes_downloaded
        summary.files += 1
        after = {e.key for e in capped.entries()}
        summary.evicted = sorted(before - after)
        console.print(f"   evicted to make room: {', '.join(summary.evicted) or 'nothing'}")
        render_status(capped, console)
        summary.usage_bytes = capped.usage().bytes
        summary.origin_bytes = origin.bytes_served
        capped.close()
    console.print(
        f"[bold green]Demo done:[/bold green] {summary.files} files, {human_size(summary.bytes_downloaded)} "
        f"downloaded (origin served {human_size(summary.origin_bytes)}), cache hit {summary.hit_ms:.2f} ms, "
        f"{len(summary.evicted)} evicted, cache {human_size(summary.usage_bytes)} of {human_size(summary.cap)} cap")
    return summary
