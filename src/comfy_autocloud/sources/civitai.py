"""Civitai sources: a model-version id (or a civitai.com URL) -> download URL + sha256 from the API.

Accepted forms:

    civitai:<version-id>                         the version's primary file
    civitai:<version-id>/<file name>             another file of that version (a VAE, a pruned variant)
    https://civitai.com/models/<model-id>?modelVersionId=<version-id>
    https://civitai.com/models/<model-id>        the model's newest version (pinned by `manifest add`)
    https://civitai.com/api/download/models/<version-id>[?type=…&format=…&size=…&fp=…]

`GET {CIVITAI_API_BASE}/api/v1/model-versions/<id>` lists the version's files with `downloadUrl`,
`hashes.SHA256` (upper-case hex) and `primary`. `sizeKB` is rounded by the API, so it is never used
as the exact size (the engine learns that from the download server). `CIVITAI_TOKEN` goes out as
`Authorization: Bearer` (never in the URL), which the engine drops when the download redirects to
the storage host; a `?token=` pasted into a civitai.com URL is used the same way, and never recorded.
A one-byte preflight on the download URL turns "this file needs a login" into an error that says so
before any download starts.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

from ..errors import SourceError
from ..redact import redact_text, redact_url
from ..transfer.http_policy import Gone, NotFound, Retryable, Unauthorized
from . import ResolvedSource
from ._net import Answer, BadAnswer, request, with_retries

DEFAULT_BASE = "https://civitai.com"
_HOSTS = {"civitai.com", "www.civitai.com"}
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_FILE_FILTERS = ("type", "format", "size", "fp")


@dataclass(frozen=True)
class CivitaiRef:
    version_id: int | None
    model_id: int | None = None
    filename: str | None = None
    filters: tuple[tuple[str, str], ...] = ()  # download-URL query: type/format/size/fp
    url_token: str | None = field(default=None, repr=False)  # a `?token=` someone pasted; used, never recorded

    @property
    def text(self) -> str:
        if self.version_id is None:
            return f"civitai model {self.model_id}"
        name = f"/{self.filename}" if self.filename else ""
        return f"civitai:{self.version_id}{name}"


def api_base() -> str:
    return (os.environ.get("CIVITAI_API_BASE") or DEFAULT_BASE).rstrip("/")


def civitai_token() -> str | None:
    return os.environ.get("CIVITAI_TOKEN") or None


def _is_api_host(parts: Any) -> bool:
    host = (parts.hostname or "").lower()
    if host in _HOSTS:
        return True
    base = urlsplit(api_base())
    return (parts.scheme, parts.netloc.lower().rsplit("@", 1)[-1]) == (base.scheme, base.netloc.lower())


def is_civitai_url(url: str) -> bool:
    """A civitai.com model page or download URL (or one on CIVITAI_API_BASE's host)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return False
    if not _is_api_host(parts):
        return False
    return re.match(r"^/(models|api/download/models)/\d+(/[^/]*)?/?$", parts.path) is not None


def _int(text: str, subject: str, what: str) -> int:
    if not text.isdigit() or len(text) > 12:
        raise SourceError(subject, f"{what} {text!r} is not a number")
    return int(text)


def parse_civitai(source: str) -> CivitaiRef:
    text = source.strip()
    subject = redact_url(text)
    if text.lower().startswith("civitai:"):
        rest = text[len("civitai:"):].lstrip("/")
        vid, _, name = rest.partition("/")
        if not vid:
            raise SourceError(subject, "expected civitai:<model-version-id>[/<file name>]")
        name = unquote(name)
        if name and (any(c in name for c in "/\\\x00") or name in (".", "..")):
            raise SourceError(subject, "file name after the version id must be one plain file name")
        return CivitaiRef(_int(vid, subject, "model version id"), filename=name or None)
    parts = urlsplit(text)
    query = parse_qs(parts.query)
    m = re.match(r"^/api/download/models/(\d+)", parts.path)
    if m:
        filters = tuple((k, query[k][0]) for k in _FILE_FILTERS if query.get(k))
        return CivitaiRef(_int(m.group(1), subject, "model version id"), filters=filters,
                          url_token=query.get("token", [None])[0])
    m = re.match(r"^/models/(\d+)", parts.path)
    if m:
        model_id = _int(m.group(1), subject, "model id")
        vid = query.get("modelVersionId", [""])[0]
        return CivitaiRef(_int(vid, subject, "modelVersionId") if vid else None, model_id=model_id,
                          url_token=query.get("token", [None])[0])
    raise SourceError(subject, "not a Civitai model or download URL (expected /models/<id> or "
                               "/api/download/models/<version-id>)")


class _Api:
    """JSON GETs against the Civitai API with the token as a Bearer header, retried on 429/5xx."""

    def __init__(self, subject: str, url_token: str | None = None) -> None:
        self.subject = subject
        self.base = api_base()
        self.token = civitai_token() or url_token
        self.headers = {"Accept": "application/json", "User-Agent": "comfyui-autocloud"}
        if self.token:
            self.headers["Authorization"] = f"Bearer {self.token}"
        self.secrets = [self.token] if self.token else []

    def fail(self, reason: str) -> SourceError:
        return SourceError(self.subject, redact_text(reason, self.secrets))

    def fetch(self, url: str, *, preflight: bool = False) -> Answer:
        def once() -> Answer:
            if preflight:
                ans = request(url, {**self.headers, "Range": "bytes=0-0"}, follow=False, read_body=False)
            else:
                ans = request(url, self.headers)
            retry = ans.retryable()
            if retry is not None:
                raise retry
            return ans

        try:
            return with_retries(once)
        except Retryable as e:
            raise self.fail(f"Civitai at {redact_url(self.base)} did not answer: {e.reason}") from None
        except BadAnswer as e:
            raise self.fail(str(e)) from None

    def get_json(self, path: str, what: str) -> dict[str, Any]:
        ans = self.fetch(self.base + path)
        failure = ans.failure
        if failure is NotFound:
            raise self.fail(f"{what} not found (or not published) on Civitai")
        if failure is Unauthorized:
            raise self.fail(f"Civitai refused to show {what} (HTTP {ans.status}): "
                            + ("CIVITAI_TOKEN was refused" if self.token else "set CIVITAI_TOKEN"))
        if ans.status != 200:
            raise self.fail(f"Civitai API answered HTTP {ans.status} for {what}{_api_message(ans)}")
        try:
            data = ans.json()
        except (ValueError, UnicodeDecodeError):
            raise self.fail(f"Civitai API answered something that is not JSON for {what}") from None
        if not isinstance(data, dict):
            raise self.fail(f"Civitai API answer for {what} is not a JSON object")
        return data


def _api_message(ans: Answer) -> str:
    try:
        data = json.loads(ans.body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return ""
    msg = data.get("error") or data.get("message") if isinstance(data, dict) else None
    return f": {str(msg)[:200]}" if msg else ""


def _pick(files: list[dict[str, Any]], ref: CivitaiRef, api: _Api) -> dict[str, Any]:
    """The file the reference means: by name, by download filters, else the primary one."""
    names = ", ".join(repr(f.get("name")) for f in files) or "none"
    if ref.filename:
        hits = [f for f in files if f.get("name") == ref.filename]
        if not hits:
            raise api.fail(f"version {ref.version_id} has no file named {ref.filename!r} (files: {names})")
        return hits[0]
    if ref.filters:
        def matches(f: dict[str, Any]) -> bool:
            meta = f.get("metadata") or {}
            return all(str(f.get("type") if k == "type" else meta.get(k, "")).lower() == v.lower()
                       for k, v in ref.filters)

        hits = [f for f in files if matches(f)]
        if len(hits) != 1:
            want = "&".join(f"{k}={v}" for k, v in ref.filters)
            raise api.fail(f"{len(hits)} files of version {ref.version_id} match {want} (files: {names})")
        return hits[0]
    primary = [f for f in files if f.get("primary") is True]
    models = [f for f in files if f.get("type") == "Model"]
    if primary:
        return primary[0]
    if len(models) == 1:
        return models[0]
    if len(files) == 1:
        return files[0]
    raise api.fail(f"version {ref.version_id} has several files and none is primary; name one as "
                   f"civitai:{ref.version_id}/<file name> (files: {names})")


def resolve_civitai(source: str) -> ResolvedSource:
    """Model-version API -> the file's download URL, Bearer header, sha256; preflight for login-only files."""
    ref = parse_civitai(source)
    api = _Api(ref.text, ref.url_token)
    if ref.version_id is None:
        model = api.get_json(f"/api/v1/models/{ref.model_id}", f"model {ref.model_id}")
        versions = model.get("modelVersions") or []
        if not versions or not isinstance(versions[0], dict) or not isinstance(versions[0].get("id"), int):
            raise api.fail(f"model {ref.model_id} has no published version")
        ref = CivitaiRef(int(versions[0]["id"]), model_id=ref.model_id, url_token=ref.url_token)
        api.subject = ref.text
    version = api.get_json(f"/api/v1/model-versions/{ref.version_id}", f"model version {ref.version_id}")
    files = [f for f in version.get("files") or [] if isinstance(f, dict)]
    if not files:
        raise api.fail(f"model version {ref.version_id} lists no files")
    chosen = _pick(files, ref, api)
    name = str(chosen.get("name") or "")
    url = str(chosen.get("downloadUrl") or "")
    if not url.lower().startswith(("https://", "http://")):
        raise api.fail(f"the API gave no usable download URL for {name!r}")
    sha = str((chosen.get("hashes") or {}).get("SHA256") or "").strip().lower()
    explicit = bool(ref.filename or ref.filters) or chosen.get("primary") is not True
    canonical = f"civitai:{ref.version_id}" + (f"/{quote(name, safe='')}" if explicit and name else "")
    _preflight(api, url, ref)
    return ResolvedSource(
        kind="http",
        url=url,
        headers={"Authorization": api.headers["Authorization"]} if api.token else {},
        display=f"civitai:{ref.version_id} ({name})" if name else f"civitai:{ref.version_id}",
        expected_sha256=sha if _SHA256.match(sha) else None,
        filename=name or None,
        canonical=canonical,
    )


def _preflight(api: _Api, url: str, ref: CivitaiRef) -> None:
    """One request, redirects not followed: a login-only or vanished file fails here with a clear reason."""
    ans = api.fetch(url, preflight=True)
    failure = ans.failure
    if failure is Unauthorized:
        raise api.fail(f"model version {ref.version_id} requires a Civitai login to download (HTTP {ans.status}): "
                       + ("CIVITAI_TOKEN was refused or lacks access" if api.token else
                          "create an API key on civitai.com and set CIVITAI_TOKEN"))
    if failure in (NotFound, Gone):
        raise api.fail(f"the download server has no file for model version {ref.version_id} (HTTP {ans.status})")
    if failure is not None:
        raise api.fail(f"the download URL answered HTTP {ans.status}")


__all__ = ["CivitaiRef", "api_base", "civitai_token", "is_civitai_url", "parse_civitai", "resolve_civitai"]
