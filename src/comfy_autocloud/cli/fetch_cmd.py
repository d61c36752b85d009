"""`autocloud fetch`: URLs or manifests -> verified files in the cache, with progress bars or JSON lines."""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from comfy_autocloud.cli import output
from comfy_autocloud.cli.context import AppContext, pass_app
from comfy_autocloud.cli.output import emit_json
from comfy_autocloud.phases import in_order, process_age
from comfy_autocloud.units import human_rate, human_size, parse_rate

if TYPE_CHECKING:  # imported when the command runs, after the download path's imports have started
    from comfy_autocloud.fetch.request import FetchResult
    from comfy_autocloud.fetch.service import FetchService
    from comfy_autocloud.manifest.spec import ModelSpec


def _sha_text(sha: str) -> str:
    """'sha256 1234abcd5678…', or what a warmup copy whose hash is still being computed shows."""
    return f"sha256 {sha[:12]}…" if sha else "sha256 being computed in the background"


def breakdown(res: FetchResult, startup: float | None, total: float | None) -> str:
    """One line: where the wall-clock time of this process went (`-v`)."""
    steps = in_order(({"startup": startup} if startup is not None else {}) | res.phases)
    parts = [f"{k.replace('_', ' ').replace('startup', 'start-up')} {v:.3f}" for k, v in steps.items()]
    if total is not None:
        parts.append(f"other {max(0.0, total - sum(steps.values())):.3f}")
        return f"{res.key}: {total:.3f} s = " + " + ".join(parts)
    return f"{res.key}: " + " + ".join(parts)


_importing: list[threading.Thread] = []


def import_download_path() -> None:
    """Import the HTTP download path (aiohttp, which also loads the system's CA certificates: 0.2-0.9 s
    measured with a cold page cache) on a thread while this one imports the fetch service, opens the
    store and plans the fetch: both mostly wait on reads, so they overlap. Once per process; a failing
    import is left for the download itself to report."""
    if _importing:
        return

    def load() -> None:
        with contextlib.suppress(ImportError):
            import comfy_autocloud.transfer.engine
            import comfy_autocloud.transfer.remote  # noqa: F401

    _importing.append(threading.Thread(target=load, name="autocloud-imports", daemon=True))
    _importing[0].start()


def may_download(cache: Path, urls: tuple[str, ...], manifests: tuple[Path, ...], folder: str | None,
                 name: str | None) -> bool:
    """Whether this fetch is likely to download over the network, judged before anything is imported or
    opened: manifests may name anything; local files never do; one URL whose file is at its final path
    already is most likely a cache hit (the index decides; a miss then starts the imports itself)."""
    if manifests:
        return True
    if all(u.startswith(("file:", "/")) for u in urls):
        return False
    if len(urls) == 1 and folder:
        from urllib.parse import unquote, urlsplit

        with contextlib.suppress(ValueError, OSError):
            filename = name or unquote(urlsplit(urls[0]).path.rsplit("/", 1)[-1])
            return not (filename and (cache / folder / filename).is_file())
    return True


def run_fetch(service: FetchService, build_specs: Callable[[], list[ModelSpec]], *, as_json: bool, parallel: int,
              phases: bool = False, startup: float | None = None, cached: tuple[str, str | None] | None = None
              ) -> int:
    """Fetch and report; returns the exit code (1 if any file failed).

    `phases`: also say where the time went (start-up, probe, transfer, hash tail, fsync, rename,
    index), on stderr and in each JSON object. `cached`: the (key, sha256) of the one file asked for,
    known to be in the cache: its hit is reported without building specs (nor resolving the source);
    were it evicted meanwhile, it is fetched as usual.
    """
    from comfy_autocloud.errors import AutoCloudError
    from comfy_autocloud.fetch.request import FetchResult
    from comfy_autocloud.progress import CancelToken

    specs = build_specs() if cached is None else []  # bad input is reported before any bar is drawn
    cancel = CancelToken()
    view = None
    if sys.stderr.isatty() or not as_json:  # bars for people; scripts reading --json lines get none (nor rich)
        from comfy_autocloud.cli.progress_view import FetchProgress

        view = FetchProgress(output.err_console if as_json else output.console)
    with view if view is not None else contextlib.nullcontext():
        hit = service.cached_key(*cached, progress=view) if cached is not None else None
        if cached is not None and hit is None:
            specs = build_specs()
        # Ctrl-C: fetch_many cancels every download, keeps partials, and re-raises
        results = [hit] if hit is not None else service.fetch_many(specs, parallel=parallel, progress=view,
                                                                    cancel=cancel)
    keys = [hit.key] if hit is not None else [s.key for s in specs]
    failed = 0
    for key, res in zip(keys, results, strict=True):
        if isinstance(res, FetchResult):
            if phases:  # the process's age first: printing may import rich
                line = breakdown(res, startup, process_age())
                output.err_console.print(line, soft_wrap=True, highlight=False)
            if as_json:
                emit_json(res.as_json(phases=phases) | ({"startup": round(startup, 4)} if phases and startup else {}))
            else:
                rate = res.bytes_downloaded / res.seconds if res.seconds > 0 and res.bytes_downloaded else 0
                how = "cached" if res.cached else f"{human_size(res.bytes_downloaded)} in {res.seconds:.2f}s" + (
                    f" ({human_rate(rate)})" if rate else "")
                line = f"[green]✓[/green] {res.key}  {human_size(res.size)}  {_sha_text(res.sha256)}  {how}"
                output.console.print(line)
        else:
            failed += 1
            assert isinstance(res, AutoCloudError)
            if as_json:
                emit_json({"key": key, "error": f"{res.subject}: {res.reason}"})
            else:
                output.err_console.print(f"[red]✗[/red] {res.subject}: {res.reason}", soft_wrap=True)
    return 1 if failed else 0


@click.command("fetch")
@click.argument("urls", nargs=-1)
@click.option("--folder", "-f", metavar="FOLDER", help="Model folder for URLs, e.g. checkpoints, loras, vae.")
@click.option("--name", "-n", metavar="NAME", help="File name (default: the URL's last path segment).")
@click.option("--sha256", metavar="HEX", help="Expected sha256; a mismatch is an error and nothing is stored.")
@click.option("--manifest", "-m", "manifests", multiple=True, type=click.Path(path_type=Path),
              help="Manifest file or directory (repeatable): fetch every entry.")
@click.option("--connections", "-c", type=click.IntRange(1, 256), default=None,
              help="Connections per download (default: adaptive).")
@click.option("--rate-limit", metavar="RATE", default=None, help="Total download rate limit, e.g. 50M (bytes/s).")
@click.option("--parallel", "-p", type=click.IntRange(1, 32), default=4, show_default=True,
              help="Files downloaded at the same time.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per file on stdout.")
@pass_app
def fetch_cmd(app: AppContext, urls: tuple[str, ...], folder: str | None, name: str | None, sha256: str | None,
              manifests: tuple[Path, ...], connections: int | None, rate_limit: str | None, parallel: int,
              as_json: bool) -> None:
    """Download model files into the cache (verified, resumable, once per key).

    With -v, each file's line says where the time went (start-up, probe, transfer, hash tail, fsync,
    rename, index).
    """
    startup = process_age()
    if not urls and not manifests:
        raise click.UsageError("give URLs (with --folder) or --manifest FILE")
    if urls and not folder:
        raise click.UsageError("--folder is required with URLs (e.g. --folder checkpoints)")
    if may_download(app.settings.cache_path, urls, manifests, folder, name):
        import_download_path()  # first: the rest of this command imports and opens meanwhile
    from comfy_autocloud.fetch.service import specs_from_urls, url_key

    def build_specs() -> list[ModelSpec]:
        specs: list[ModelSpec] = []
        if urls:
            specs += specs_from_urls(urls, folder or "", name, sha256)
        if manifests:
            from comfy_autocloud.manifest import load_manifests

            specs += [s for s in load_manifests(manifests) if s.sources]
        return specs

    service = app.services(connections=connections, rate_limit=parse_rate(rate_limit) if rate_limit else None).fetch
    verbose = click.get_current_context().find_root().params.get("verbose") or 0
    one = url_key(urls[0], folder or "", name, sha256) if len(urls) == 1 and not manifests else None
    cached = one if one is not None and service.has(*one) else None
    if cached is None and (manifests or not all(u.startswith(("file:", "/")) for u in urls)):
        import_download_path()  # something may come over HTTP after all (a file at the final path, not indexed)
    code = run_fetch(service, build_specs, as_json=as_json, parallel=parallel, phases=verbose > 0, startup=startup,
                     cached=cached)
    if code:
        raise SystemExit(code)
