"""`hf://` sources: a file in a Hugging Face repo, resolved through huggingface_hub, fetched by our engine.

Syntax (the first is the project's, the second huggingface_hub's `HfFileSystem` form):

    hf://owner/repo/path/in/repo[@revision]
    hf://[datasets/|spaces/]owner/repo[@revision]/path/in/repo

and `https://huggingface.co/owner/repo/resolve/<rev>/<path>` (or `/blob/`) URLs, which get the same
treatment (auth, hash) when huggingface_hub is installed. A revision containing '/' (`refs/pr/3`)
is written `refs%2Fpr%2F3` in the second form.

Resolution is one HEAD on the file's resolve URL (`get_hf_file_metadata`): it gives the commit the
revision points to (`X-Repo-Commit`), the size (`X-Linked-Size` for LFS files) and, for LFS files,
the sha256 (`X-Linked-Etag`; a git-stored file's ETag is its git sha1, which is not used). The URL
handed to the engine is the resolve URL pinned to that commit, so a branch moving during a long
download cannot mix two versions, and resuming later finds the same URL key. The Hub answers it with
a 302 to its CDN; the engine follows it and drops `Authorization` on the way (another host).
`HF_ENDPOINT` is read at every call (mirrors, the test fake), the token from `HF_TOKEN` or the
huggingface_hub token store.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from ..errors import SourceError
from ..keys import check_relpath
from ..redact import excerpt, redact_text, redact_url
from ..transfer.http_policy import Retryable, Unauthorized, error_type
from . import ResolvedSource
from ._net import RESOLVE_RETRY, quiet_loggers, with_retries

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_REVISION = "main"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_TYPES = {"datasets": "dataset", "spaces": "space", "models": "model"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_HUB_HOSTS = {"huggingface.co", "hf.co", "www.huggingface.co"}


@dataclass(frozen=True)
class HfRef:
    repo_id: str          # owner/name
    path: str             # path of the file inside the repo
    revision: str | None  # branch, tag or commit; None = main
    repo_type: str = "model"

    @property
    def text(self) -> str:
        """The canonical `hf://` string (suffix form)."""
        rev = f"@{self.revision}" if self.revision else ""
        return f"hf://{_URL_PREFIX[self.repo_type]}{self.repo_id}/{self.path}{rev}"


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def parse_hf(source: str) -> HfRef:
    """Parse an `hf://` string; SourceError says what is wrong with it."""
    subject = redact_url(source)
    rest = source.strip()[len("hf://"):] if source.strip().lower().startswith("hf://") else ""
    if not rest or "?" in rest or "#" in rest:
        raise SourceError(subject, "expected hf://owner/repo/path/in/repo[@revision] (no query or fragment)")
    parts = rest.split("/")
    repo_type = "model"
    if parts[0] in _TYPES:
        repo_type = _TYPES[parts.pop(0)]
    if len(parts) < 3:
        raise SourceError(subject, "expected hf://owner/repo/path/in/repo[@revision]: owner, repo and a file path")
    owner, name, path_parts = parts[0], parts[1], parts[2:]
    revision: str | None = None
    if "@" in name:
        name, revision = name.split("@", 1)
        revision = unquote(revision)
    if "@" in path_parts[-1]:
        if revision is not None:
            raise SourceError(subject, "revision given twice (after the repo and after the path)")
        path_parts[-1], revision = path_parts[-1].rsplit("@", 1)
    path = "/".join(path_parts)
    return _checked(HfRef(f"{owner}/{name}", path, revision, repo_type), subject)


def _checked(ref: HfRef, subject: str) -> HfRef:
    owner, name = ref.repo_id.split("/", 1)
    for part, what in ((owner, "owner"), (name, "repo name")):
        if not _NAME.match(part) or ".." in part:
            raise SourceError(subject, f"{what} {part!r} is not a valid Hugging Face name")
    try:
        check_relpath(ref.path, "path in repo")
    except ValueError as e:
        raise SourceError(subject, str(e)) from None
    if ref.revision is not None and (not ref.revision or any(c in ref.revision for c in "\x00\r\n\t ")):
        raise SourceError(subject, "revision is empty or contains whitespace")
    return ref


def hf_ref_from_url(url: str) -> HfRef | None:
    """`https://huggingface.co/<repo>/resolve|blob/<rev>/<path>` -> HfRef; None for any other URL.

    Only when huggingface_hub is installed: without it such URLs stay plain https downloads.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    host = (parts.hostname or "").lower()
    hub = urlsplit(endpoint())
    same_as_endpoint = (parts.scheme, parts.netloc.lower().rsplit("@", 1)[-1]) == (hub.scheme, hub.netloc.lower())
    if host not in _HUB_HOSTS and not same_as_endpoint:
        return None
    segs = parts.path.split("/")[1:]
    repo_type = "model"
    if segs and segs[0] in ("datasets", "spaces"):
        repo_type = _TYPES[segs.pop(0)]
    if len(segs) < 5 or segs[2] not in ("resolve", "blob") or parts.query or parts.username or parts.password:
        return None
    if importlib.util.find_spec("huggingface_hub") is None:
        return None
    try:
        return _checked(HfRef(f"{segs[0]}/{segs[1]}", unquote("/".join(segs[4:])), unquote(segs[3]), repo_type),
                        redact_url(url))
    except SourceError:
        return None


def hf_token() -> str | None:
    """`HF_TOKEN`, else the token huggingface_hub stored at login."""
    from huggingface_hub import get_token

    return os.environ.get("HF_TOKEN") or get_token() or None


def resolve_hf(source: str) -> ResolvedSource:
    return resolve_hf_ref(parse_hf(source))


def resolve_hf_ref(ref: HfRef) -> ResolvedSource:
    """One metadata HEAD through huggingface_hub -> pinned resolve URL, Bearer header, sha256, size."""
    subject = ref.text
    try:
        import huggingface_hub  # noqa: F401
    except ImportError:
        raise SourceError(subject, "hf:// sources need huggingface_hub: pip install 'comfyui-autocloud[hf]'") from None
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    quiet_loggers("httpcore", "httpcore2", "hpack")
    base = endpoint()
    token = hf_token()
    secrets = [token] if token else []
    repo_type = None if ref.repo_type == "model" else ref.repo_type
    revision = ref.revision or DEFAULT_REVISION
    url = hf_hub_url(ref.repo_id, ref.path, repo_type=repo_type, revision=revision, endpoint=base)
    kwargs: dict[str, Any] = {"token": token or False, "endpoint": base}
    if "retry_on_errors" in inspect.signature(get_hf_file_metadata).parameters:
        kwargs["retry_on_errors"] = False  # 429/5xx are retried below, honouring Retry-After

    def head() -> Any:
        try:
            return get_hf_file_metadata(url, **kwargs)
        except Exception as e:  # classified below; anything unknown is re-raised untouched
            retry = _retryable(e)
            if retry is not None:
                raise retry from None
            raise

    try:
        meta = with_retries(head)
    except Retryable as e:
        raise SourceError(subject, redact_text(f"the Hub at {base} did not answer: {e.reason}", secrets)) from None
    except Exception as e:
        raise SourceError(subject, _reason(e, ref, base, token is not None, secrets)) from None
    commit = meta.commit_hash if meta.commit_hash and _COMMIT.match(meta.commit_hash) else None
    etag = (meta.etag or "").lower()
    pinned = hf_hub_url(ref.repo_id, ref.path, repo_type=repo_type, revision=commit, endpoint=base) if commit else url
    return ResolvedSource(
        kind="http",
        url=pinned,
        headers={"Authorization": f"Bearer {token}"} if token else {},
        display=ref.text + (f" (commit {commit[:12]})" if commit and commit != ref.revision else ""),
        expected_sha256=etag if _SHA256.match(etag) else None,
        expected_size=meta.size if isinstance(meta.size, int) and meta.size >= 0 else None,
        filename=ref.path.rsplit("/", 1)[-1],
    )


def _status(e: BaseException) -> int | None:
    response = getattr(e, "response", None)
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def _retryable(e: BaseException) -> Retryable | None:
    """429/5xx answers and network failures may pass: say so with the server's Retry-After."""
    status = _status(e)
    if status is not None:
        if RESOLVE_RETRY.is_retryable_status(status):
            headers = getattr(getattr(e, "response", None), "headers", {}) or {}
            return Retryable(f"HTTP {status}", status, headers.get("Retry-After"))
        return None
    module = type(e).__module__.split(".", 1)[0]
    if module in ("httpx", "httpx2", "requests", "urllib3") or isinstance(e, (OSError, TimeoutError)):
        return Retryable(f"connection failed ({type(e).__name__})")
    return None


def _reason(e: BaseException, ref: HfRef, base: str, have_token: bool, secrets: list[str]) -> str:
    """The Hub's error classes -> a sentence that says which thing is missing and what to do."""
    from huggingface_hub.utils import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    page = f"{base}/{_URL_PREFIX[ref.repo_type]}{ref.repo_id}"
    status = _status(e)
    if isinstance(e, GatedRepoError):
        how = ("the token in use has no access: accept the conditions on " + page + " with its account"
               if have_token else "set HF_TOKEN (or `hf auth login`) for an account that accepted them on " + page)
        return f"gated repo {ref.repo_id}: its files need an accepted access request; {how}"
    if isinstance(e, RepositoryNotFoundError):
        hint = "check the name" if have_token else "check the name, or set HF_TOKEN if it is private"
        return f"repository {ref.repo_id} not found ({hint})"
    if isinstance(e, RevisionNotFoundError):
        return f"revision {ref.revision or DEFAULT_REVISION!r} not found in {ref.repo_id}"
    if isinstance(e, EntryNotFoundError):
        return f"file {ref.path!r} not found in {ref.repo_id} at revision {ref.revision or DEFAULT_REVISION!r}"
    if isinstance(e, HfHubHTTPError):
        if error_type(status) is Unauthorized:
            return redact_text(f"HTTP {status}: access refused; " + (
                "the token in use cannot read this repo" if have_token else "set HF_TOKEN"), secrets)
        return redact_text(f"the Hub answered HTTP {status}", secrets)
    if type(e).__name__ == "OfflineModeIsEnabled":
        return "HF_HUB_OFFLINE is set; unset it to resolve hf:// sources"
    return redact_text(f"cannot resolve through huggingface_hub ({type(e).__name__}: {excerpt(str(e))})", secrets)


__all__ = ["HfRef", "endpoint", "hf_ref_from_url", "hf_token", "parse_hf", "resolve_hf", "resolve_hf_ref"]
