"""`autocloud manifest check | add | from-s3`: validate model lists, and grow them from sources.

Bad input raises ManifestError ('file:key: reason'); the main entry point prints it and exits 1.
`add` and `from-s3` resolve sources (network metadata only, or a verified download through the
fetch service when no hash is published) and write through `manifest.write` (atomic, all-or-nothing).
"""

from __future__ import annotations

import fnmatch
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import click
from rich.table import Table

from comfy_autocloud.cli.context import AppContext, pass_app
from comfy_autocloud.cli.output import console, emit_json, err_console
from comfy_autocloud.cli.progress_view import FetchProgress
from comfy_autocloud.errors import ManifestError, SourceError
from comfy_autocloud.fetch import FetchService
from comfy_autocloud.manifest import ModelSpec, SpecError, load_manifests, manifest_files, parse_warmup_conf
from comfy_autocloud.manifest.write import add_entries, document, render
from comfy_autocloud.progress import ProgressCallback
from comfy_autocloud.redact import REDACTED, redact_url
from comfy_autocloud.sources import ResolvedSource, resolve
from comfy_autocloud.transfer import TransferOptions, probe
from comfy_autocloud.units import human_size


def spec_record(spec: ModelSpec) -> dict[str, Any]:
    """A spec as printable JSON; sources are redacted because output ends up in logs and tickets."""
    record: dict[str, Any] = {
        "key": spec.key,
        "folder": spec.folder,
        "filename": spec.filename,
        "sources": [redact_url(s) for s in spec.sources],
        "sha256": spec.sha256,
        "size": spec.size,
        "pin": spec.pin,
        "tags": list(spec.tags),
        "preload": spec.preload,
        "defined_in": spec.defined_in,
    }
    if spec.bundle is not None:  # the zip this file arrives in
        record["bundle"] = spec.bundle.name
    return record


@click.group("manifest")
def manifest_cmd() -> None:
    """Model lists: JSON lists, split lists, warmup_models.conf, preload_config.json, workflows."""


@manifest_cmd.command("check")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per entry.")
def check_cmd(paths: tuple[Path, ...], as_json: bool) -> None:
    """Parse and merge FILE… (files or directories) and show every entry; exit 1 on the first problem."""
    specs = load_manifests(paths)
    files = manifest_files(paths)
    globs = sum(1 for f, fmt in files if fmt == "warmup_conf" for e in parse_warmup_conf(f) if e.is_glob)
    if as_json:
        for spec in specs:
            emit_json(spec_record(spec))
        return
    table = Table(title="model entries")
    for col in ("key", "sources", "sha256", "size", "pin", "defined in"):
        table.add_column(col, overflow="fold")
    for spec in specs:
        table.add_row(
            spec.key,
            "\n".join(redact_url(s) for s in spec.sources) or "-",
            f"{spec.sha256[:12]}…" if spec.sha256 else "-",
            human_size(spec.size) if spec.size is not None else "-",
            "yes" if spec.pin else "",
            spec.defined_in,
        )
    console.print(table)
    verified = sum(1 for s in specs if s.sha256)
    names_only = sum(1 for s in specs if not s.sources)
    summary = (f"{len(specs)} entries from {len(files)} file(s): {verified} with sha256, "
               f"{names_only} without a source")
    if globs:
        summary += f", {globs} warmup glob pattern(s) (expanded by warmup, not listed)"
    console.print(summary)


# ---------------------------------------------------------------------------------------------- add

@dataclass(frozen=True)
class NewEntry:
    """What `manifest add` learned about one file before writing it."""

    spec: ModelSpec
    display: str            # the main source, redacted
    hash_from: str          # "metadata" (published), "download" (hashed while fetching), "metadata+download", "none"


def _name_from(source: str, resolved: ResolvedSource) -> str:
    if resolved.filename:
        return resolved.filename
    return unquote(urlsplit(source).path.rsplit("/", 1)[-1])


def _refuse_credentials(source: str) -> None:
    """Manifests get committed and shared: a source that carries a password or token is not written into one."""
    parts = urlsplit(source)
    masked = parse_qsl(urlsplit(redact_url(source)).query, keep_blank_values=True)
    if parts.username or parts.password or any(v == REDACTED for _, v in masked):
        raise SourceError(redact_url(source), "this URL carries credentials (user:password@ or a token parameter); "
                                              "a manifest must not hold them: give the token through the "
                                              "environment (HF_TOKEN, CIVITAI_TOKEN, AWS_*) and a URL without it")


def _spec_or_error(subject: str, **fields: Any) -> ModelSpec:
    try:
        return ModelSpec(defined_in="command line", **fields)
    except SpecError as exc:
        raise ManifestError(subject, exc.problems[0][1]) from None


def build_entry(source: str, mirrors: Sequence[str], folder: str, name: str | None,
                service_factory: Callable[[], FetchService], download: bool | None = None,
                progress: ProgressCallback | None = None) -> NewEntry:
    """Resolve a source (and its mirrors), agree on size and sha256, download to hash when nothing is published.

    Every mirror's published sha256/size must agree with the others; a mirror that publishes neither is at
    least probed for its size. Downloading goes through the fetch service (into the cache, verified).
    """
    sources = [source, *mirrors]
    resolved = [resolve(s) for s in sources]
    main = resolved[0]
    subject = f"{folder}/{name}" if name else main.display
    recorded = tuple(dict.fromkeys(r.canonical or s.strip() for s, r in zip(sources, resolved, strict=True)))
    for src in recorded:
        _refuse_credentials(src)
    hashes = {r.display: r.expected_sha256 for r in resolved if r.expected_sha256}
    if len(set(hashes.values())) > 1:
        listed = "; ".join(f"{d} publishes {h}" for d, h in hashes.items())
        raise SourceError(subject, f"the sources disagree on the sha256, so they are not mirrors of one file: {listed}")
    sizes: dict[str, int] = {}
    for r in resolved:
        size = r.expected_size
        if size is None and r.kind == "http":
            size = probe(r.url, TransferOptions(headers=dict(r.headers))).size
        if size is not None:
            sizes[r.display] = size
    if len(set(sizes.values())) > 1:
        listed = "; ".join(f"{d}: {s} bytes" for d, s in sizes.items())
        raise SourceError(subject, f"the sources disagree on the size, so they are not mirrors of one file: {listed}")
    sha = next(iter(hashes.values()), None)
    size = next(iter(sizes.values()), None)
    filename = name or _name_from(source, main)
    if not filename:
        raise SourceError(main.display, "cannot derive a file name from this source; pass --name")
    spec = _spec_or_error(f"command line {main.display}", folder=folder, filename=filename, sources=recorded,
                          sha256=sha, size=size)
    hash_from = "metadata" if sha else "none"  # "none": --no-download and nothing published
    if download or (download is None and (sha is None or size is None)):
        result = service_factory().fetch(spec, progress=progress)
        spec = replace(spec, sha256=result.sha256, size=result.size)
        hash_from = "download" if sha is None else "metadata+download"
    return NewEntry(spec, main.display, hash_from)


@manifest_cmd.command("add")
@click.argument("urls", nargs=-1, required=True)
@click.option("--folder", "-f", required=True, metavar="FOLDER", help="Model folder, e.g. checkpoints, loras, vae.")
@click.option("--name", "-n", metavar="NAME", help="File name (default: the source's own file name).")
@click.option("--mirror", "mirrors", multiple=True, metavar="URL",
              help="Another source of the same file (repeatable, only with one URL); all must agree on the hash.")
@click.option("--manifest", "-m", "manifest_path", type=click.Path(path_type=Path), default=Path("manifest.json"),
              show_default=True, help="Seed-004 JSON file to add to (created if missing).")
@click.option("--download/--no-download", default=None,
              help="Download into the cache to hash the file (default: only when the source publishes no sha256).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry.")
@pass_app
def add_cmd(app: AppContext, urls: tuple[str, ...], folder: str, name: str | None, mirrors: tuple[str, ...],
            manifest_path: Path, download: bool | None, as_json: bool) -> None:
    """Resolve URL… (https, hf://, s3://, civitai:), learn size and sha256, add verified entries to a manifest.

    Nothing is written unless every entry resolved and none conflicts with what the manifest already lists.
    """
    if name is not None and len(urls) > 1:
        raise click.UsageError("--name needs exactly one URL")
    if mirrors and len(urls) > 1:
        raise click.UsageError("--mirror needs exactly one URL (the mirrors are sources of that one file)")
    service: list[FetchService] = []

    def factory() -> FetchService:
        if not service:
            service.append(app.services().fetch)
        return service[0]

    view = FetchProgress(err_console, enabled=sys.stderr.isatty() and not as_json)
    with view:
        entries = [build_entry(u, mirrors, folder, name, factory, download, progress=view) for u in urls]
    outcomes = add_entries(manifest_path, [e.spec for e in entries])
    for entry, outcome in zip(entries, outcomes, strict=True):
        spec = entry.spec
        if as_json:
            emit_json({"key": spec.key, "action": outcome.action, "manifest": str(manifest_path),
                       "sources": [redact_url(s) for s in spec.sources], "sha256": spec.sha256, "size": spec.size,
                       "hash_from": entry.hash_from})
            continue
        size = human_size(spec.size) if spec.size is not None else "size unknown"
        console.print(f"[green]{outcome.action}[/green] {spec.key}  {size}  sha256 {(spec.sha256 or '-')[:12]}…  "
                      f"({entry.hash_from})  from {entry.display} -> {manifest_path}", soft_wrap=True)


# ---------------------------------------------------------------------------------------------- from-s3

@manifest_cmd.command("from-s3")
@click.argument("prefix", metavar="s3://BUCKET/PREFIX")
@click.option("--folder", "-f", required=True, metavar="FOLDER", help="Model folder the objects belong to.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None,
              help="Add the entries to this model-list file (created if missing); default: print the document.")
@click.option("--glob", "patterns", multiple=True, metavar="PATTERN",
              help="Only keys whose file name matches (repeatable), e.g. '*.safetensors'.")
@click.option("--no-checksums", is_flag=True, help="Skip the per-object HEAD that reads sha256 checksums/metadata.")
def from_s3_cmd(prefix: str, folder: str, output: Path | None, patterns: tuple[str, ...], no_checksums: bool) -> None:
    """List s3://BUCKET/PREFIX (paginated) into manifest entries: keys below the prefix become file names."""
    from comfy_autocloud.sources.s3 import list_prefix, object_source

    ref, objects = list_prefix(prefix, checksums=not no_checksums)
    specs: list[ModelSpec] = []
    skipped = 0
    for obj in objects:
        if patterns and not any(fnmatch.fnmatchcase(obj.relpath.rsplit("/", 1)[-1], p) for p in patterns):
            continue
        try:
            specs.append(_spec_or_error(object_source(ref.bucket, obj.key), folder=folder, filename=obj.relpath,
                                        sources=(object_source(ref.bucket, obj.key),), sha256=obj.sha256,
                                        size=obj.size))
        except ManifestError as exc:
            skipped += 1
            err_console.print(f"[yellow]skipped[/yellow] {exc.subject}: {exc.reason}", soft_wrap=True, markup=True)
    if not specs:
        raise SourceError(ref.text, "no objects to list under this prefix" + (" (after --glob)" if patterns else ""))
    if output is None:
        sys.stdout.write(render(document(specs)))
        return
    outcomes = add_entries(output, specs)
    counts = {a: sum(1 for o in outcomes if o.action == a) for a in ("added", "merged", "unchanged")}
    hashed = sum(1 for s in specs if s.sha256)
    console.print(f"{len(specs)} objects from {ref.text} ({hashed} with sha256, {skipped} skipped): "
                  f"{counts['added']} added, {counts['merged']} merged, {counts['unchanged']} unchanged -> {output}",
                  soft_wrap=True)


# ---------------------------------------------------------------------------------------------- sync

@manifest_cmd.command("sync")
@click.argument("url", required=False)
@click.option("--dir", "-d", "directory", type=click.Path(path_type=Path), default=None,
              help="Directory the lists live in [env AUTOCLOUD_MANIFEST_DIR].")
@click.option("--every", type=float, default=None, metavar="SECONDS",
              help="Keep running: sync again every SECONDS (a failed sync is reported and retried next time).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per sync.")
@pass_app
def sync_cmd(app: AppContext, url: str | None, directory: Path | None, every: float | None, as_json: bool) -> None:
    """Download the lists a versions index URL names ({list: {url, md5|sha256, version}}) when they changed.

    Changed lists are verified and parsed before anything is replaced, then swapped in together; on any
    failure the last good lists stay. A running ComfyUI whose AUTOCLOUD_MANIFEST points at the directory
    reloads them within AUTOCLOUD_MANIFEST_RELOAD seconds.
    """
    import time

    from comfy_autocloud.errors import AutoCloudError
    from comfy_autocloud.fetch.sync import sync_manifests

    s = app.settings
    url = url or s.manifest_sync_url
    if not url:
        raise click.UsageError("give the index URL (or set AUTOCLOUD_MANIFEST_SYNC_URL)")
    target = directory or (Path(s.manifest_dir) if s.manifest_dir else None)
    if target is None:
        raise click.UsageError("give --dir (or set AUTOCLOUD_MANIFEST_DIR)")
    if every is not None and every <= 0:
        raise click.UsageError("--every must be positive")
    service = app.services().fetch
    while True:
        try:
            report = sync_manifests(url, target, service, local_dirs=s.network_list_local_dirs)
        except AutoCloudError as exc:
            if every is None:
                raise
            err_console.print(f"[red]sync failed:[/red] {exc.subject}: {exc.reason}", soft_wrap=True)
        else:
            if as_json:
                emit_json(report.as_json())
            else:
                for c in report.changes:
                    version = f" (version {c.old_version or '-'} -> {c.new_version or '-'})" \
                        if c.action != "unchanged" else ""
                    console.print(f"{c.action:9} {c.name}{version}", soft_wrap=True)
                console.print(f"{report.entries} model entries in {target} from {report.index}", soft_wrap=True)
        if every is None:
            return
        time.sleep(every)
