"""Which models a queued prompt needs that are not on disk, and where to get them.

Runs inside ComfyUI's `/prompt` handler (before validation and execution), so it must be quick and
must never raise: a malformed prompt is left to ComfyUI's own validation to report.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from comfy_autocloud.comfy.catalog import Catalog
from comfy_autocloud.errors import ManifestError
from comfy_autocloud.manifest.spec import ModelSpec
from comfy_autocloud.manifest.workflow import workflow_model_refs
from comfy_autocloud.redact import redact_url

log = logging.getLogger(__name__)

IsPresent = Callable[[str, str], bool]  # (ComfyUI folder, filename) -> already on disk somewhere ComfyUI looks


def host_allowed(url: str, hosts: Iterable[str]) -> bool:
    """http(s) URL whose host is one of `hosts` or a subdomain of one ('huggingface.co' allows
    'cdn-lfs.huggingface.co'); ports are ignored, a bare '*' allows every host."""
    try:
        parts = urlsplit(url)
        host = (parts.hostname or "").lower().rstrip(".")
    except ValueError:
        return False
    if parts.scheme not in ("http", "https") or not host:
        return False
    for allowed in hosts:
        a = allowed.strip().lower().rstrip(".")
        if a == "*" or host == a or (a and host.endswith("." + a)):
            return True
    return False


@dataclass
class PrefetchPlan:
    fetch: list[ModelSpec] = field(default_factory=list)  # missing, with a source: download now
    unknown: list[str] = field(default_factory=list)  # missing and no source known (ComfyUI will say so)
    present: list[str] = field(default_factory=list)  # already on disk
    refused: list[str] = field(default_factory=list)  # workflow URLs outside the allowlist (redacted)


def workflow_hints(json_data: dict[str, Any], allowed_hosts: Iterable[str]) -> tuple[list[ModelSpec], list[str]]:
    """`extra_data.extra_pnginfo.workflow.models[]` (the editor's download hints; the panel's script puts
    them back, the frontend drops them) as specs whose sources are only allowlisted URLs; returns
    (specs, refused redacted URLs)."""
    workflow = ((json_data.get("extra_data") or {}).get("extra_pnginfo") or {}).get("workflow")
    if not isinstance(workflow, dict):
        return [], []
    try:
        refs = workflow_model_refs(workflow, "prompt extra_pnginfo.workflow")
    except ManifestError as exc:
        log.warning("autocloud: ignoring the workflow's model hints: %s", exc)
        return [], []
    return allowed_hints(refs, allowed_hosts)


def allowed_hints(refs: Iterable[ModelSpec], allowed_hosts: Iterable[str]) -> tuple[list[ModelSpec], list[str]]:
    """The refs that carry URLs, each keeping only its allowlisted ones; returns (specs, refused URLs)."""
    hosts = tuple(allowed_hosts)
    specs: list[ModelSpec] = []
    refused: list[str] = []
    for spec in refs:
        if not spec.sources:
            continue
        ok = tuple(s for s in spec.sources if host_allowed(s, hosts))
        refused += [redact_url(s) for s in spec.sources if s not in ok]
        if ok:
            specs.append(replace(spec, sources=ok))
    return specs, refused


def plan_prefetch(json_data: Any, catalog: Catalog, is_present: IsPresent,
                  allowed_hosts: Iterable[str]) -> PrefetchPlan:
    """Every model the API prompt's loaders name that is missing and fetchable.

    Workflow hints are added to `catalog` first (so the loader hook can resolve them later), but a
    hint only gives a source; what is fetched is decided by the loaders' inputs in the API prompt.
    """
    plan = PrefetchPlan()
    if not isinstance(json_data, dict) or not isinstance(json_data.get("prompt"), dict):
        return plan
    try:
        refs = workflow_model_refs(json_data["prompt"], "prompt")
    except ManifestError as exc:
        log.info("autocloud: not prefetching for this prompt: %s", exc)
        return plan
    hints, plan.refused = workflow_hints(json_data, allowed_hosts)
    if plan.refused:
        log.warning("autocloud: workflow model URLs outside AUTOCLOUD_ALLOWED_HOSTS are not downloaded: %s",
                    " ".join(plan.refused))
    if hints:
        catalog.show(catalog.add(hints, "workflow"))
    seen: set[str] = set()
    for ref in refs:
        spec = catalog.lookup(ref.folder, ref.filename)
        if spec is None:
            if not is_present(ref.folder, ref.filename):
                plan.unknown.append(ref.key)
            continue
        if spec.key in seen:
            continue
        seen.add(spec.key)
        if is_present(ref.folder, ref.filename):
            plan.present.append(spec.key)
        elif spec.sources:
            plan.fetch.append(spec)
        else:
            plan.unknown.append(spec.key)
    return plan
