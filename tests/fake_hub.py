"""A fake Hugging Face Hub on loopback that answers resolve requests the way huggingface.co does.

The Hub cannot be reached from the test machines, so `hf://` is tested through the real
huggingface_hub client pointed here with `HF_ENDPOINT`. What it imitates (read from huggingface_hub's
`file_download.get_hf_file_metadata` and `utils/_http.hf_raise_for_status`):

- `HEAD|GET /{repo}/resolve/{rev}/{path}` (datasets under `/datasets/…`): `X-Repo-Commit`; for LFS
  files a 302 to a file host on 127.0.0.2 (another origin, like the Hub's CDN) carrying
  `X-Linked-Etag: "<sha256>"` and `X-Linked-Size`; for git-stored files a 200 with the body and an
  `ETag` that is the git blob sha1;
- errors with `X-Error-Code`: `RepoNotFound` (401 without a token, 404 with one), `GatedRepo`
  (401 without a token, 403 with a token that was not granted access), `RevisionNotFound`,
  `EntryNotFound` (404); a bad token gets 401 "Invalid credentials in Authorization header";
- a one-off 429 with `Retry-After` on chosen resolve paths or CDN files.

`LoopServer` (an aiohttp app on its own event-loop thread, listening on 127.0.0.1 and 127.0.0.2)
is shared with `fake_civitai.py`.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, field
from urllib.parse import unquote

from aiohttp import web

from comfy_autocloud.aiothread import AppThread

HUB_TOKEN = "hf_FAKEtok3nNeverPrintMe0123456789"
OTHER_TOKEN = "hf_OtherUserTok3nNotGranted98765"


@dataclass
class Seen:
    host: str
    path: str
    method: str
    headers: dict[str, str]


def serve_bytes(request: web.Request, data: bytes, headers: dict[str, str]) -> web.Response:
    """200 or 206 for `data` with Accept-Ranges and the given validators (If-Range honoured)."""
    total = len(data)
    out = {"Accept-Ranges": "bytes", **headers}
    rng = request.headers.get("Range")
    if_range = request.headers.get("If-Range")
    if rng and total and (if_range is None or if_range == out.get("ETag")):
        spec = rng.split("=", 1)[1].split(",")[0]
        lo, _, hi = spec.partition("-")
        start = int(lo)
        end = min(int(hi), total - 1) if hi else total - 1
        if start >= total:
            return web.Response(status=416, headers={"Content-Range": f"bytes */{total}"})
        out["Content-Range"] = f"bytes {start}-{end}/{total}"
        body = data[start : end + 1]
        status = 206
    else:
        body, status = data, 200
    if request.method == "HEAD":
        out["Content-Length"] = str(len(body))
        return web.Response(status=status, headers=out)
    return web.Response(status=status, body=body, headers=out)


class LoopServer:
    """An aiohttp server on its own loop thread, on 127.0.0.1 and 127.0.0.2 at one port."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self._server = AppThread(self._app, hosts=("127.0.0.1", "127.0.0.2"), name=type(self).__name__)
        self._lock = threading.Lock()

    async def handle(self, request: web.Request) -> web.StreamResponse:  # overridden
        raise NotImplementedError

    async def _entry(self, request: web.Request) -> web.StreamResponse:
        with self._lock:
            self.seen.append(Seen(request.host.split(":")[0], request.raw_path, request.method,
                                  dict(request.headers)))
        return await self.handle(request)

    def url(self, path: str = "", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}/{path.lstrip('/')}"

    def requests_to(self, host: str) -> list[Seen]:
        with self._lock:
            return [s for s in self.seen if s.host == host]

    @property
    def port(self) -> int:
        return self._server.port

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._entry)
        return app

    def start(self) -> LoopServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\x00" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    repo_type: str
    branches: dict[str, str] = field(default_factory=dict)            # branch/tag -> commit
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # commit -> {path: data}
    gated: bool = False
    granted: set[str] = field(default_factory=set)                     # tokens with access


class FakeHub(LoopServer):
    """Repos, commits and files in memory; LFS blobs served from 127.0.0.2 (`/lfs/<sha256>`)."""

    LFS_MIN = 1024  # files at least this big are "LFS" (the real threshold is 10 MB; small here to keep tests fast)

    def __init__(self) -> None:
        super().__init__()
        self.repos: dict[tuple[str, str], FakeRepo] = {}
        self.blobs: dict[str, bytes] = {}
        self.rate_limit_once: set[str] = set()   # resolve paths ("owner/name/path") answered 429 once
        self.cdn_rate_limit_once: set[str] = set()  # sha256 of blobs whose first GET gets 429
        self._counter = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_commit(self, repo_id: str, files: dict[str, bytes], *, branch: str = "main", repo_type: str = "model",
                   gated: bool = False) -> str:
        """Create the repo if needed and a commit holding `files` (plus the branch's earlier files)."""
        repo = self.repos.setdefault((repo_type, repo_id), FakeRepo(repo_type, gated=gated))
        repo.gated = repo.gated or gated
        self._counter += 1
        commit = hashlib.sha1(f"{repo_id}:{self._counter}".encode()).hexdigest()
        previous = repo.commits.get(repo.branches.get(branch, ""), {})
        repo.commits[commit] = {**previous, **files}
        repo.branches[branch] = commit
        for data in files.values():
            if len(data) >= self.LFS_MIN:
                self.blobs[hashlib.sha256(data).hexdigest()] = data
        return commit

    async def handle(self, request: web.Request) -> web.StreamResponse:
        host = request.host.split(":")[0]
        if host == "127.0.0.2":
            return self._cdn(request)
        return self._resolve(request)

    def _cdn(self, request: web.Request) -> web.Response:
        parts = request.path.split("/")
        if len(parts) != 3 or parts[1] != "lfs" or parts[2] not in self.blobs:
            return web.Response(status=404, text="NoSuchKey")
        if "X-Amz-Signature" not in request.query:
            return web.Response(status=403, text="AccessDenied: missing signature")
        sha = parts[2]
        if request.method == "GET" and sha in self.cdn_rate_limit_once:
            self.cdn_rate_limit_once.discard(sha)
            return web.Response(status=429, headers={"Retry-After": "1"}, text="SlowDown")
        return serve_bytes(request, self.blobs[sha], {"ETag": f'"{sha}"'})

    @staticmethod
    def _error(status: int, code: str | None, message: str) -> web.Response:
        headers = {"X-Error-Message": message, "X-Request-Id": "Root=1-fake"}
        if code:
            headers["X-Error-Code"] = code
        return web.Response(status=status, headers=headers, text=message)

    def _resolve(self, request: web.Request) -> web.Response:
        segs = request.raw_path.split("?", 1)[0].split("/")[1:]
        repo_type = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            repo_type = {"datasets": "dataset", "spaces": "space"}[segs.pop(0)]
        if len(segs) < 5 or segs[2] != "resolve":
            return self._error(404, None, "Not Found")
        repo_id = f"{segs[0]}/{segs[1]}"
        rev = unquote(segs[3])
        path = unquote("/".join(segs[4:]))
        auth = request.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        if token is not None and token not in (HUB_TOKEN, OTHER_TOKEN):
            return self._error(401, None, "Invalid credentials in Authorization header")
        key = f"{repo_id}/{path}"
        if key in self.rate_limit_once:
            self.rate_limit_once.discard(key)
            return web.Response(status=429, headers={"Retry-After": "1"}, text="rate limited")
        repo = self.repos.get((repo_type, repo_id))
        if repo is None:
            return self._error(404 if token else 401, "RepoNotFound", "Repository not found")
        if repo.gated and token not in repo.granted:
            if token is None:
                return self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted. You must have "
                                   "access to it and be authenticated to access it. Please log in.")
            return self._error(403, "GatedRepo", f"Access to model {repo_id} is restricted and you are not in the "
                               "authorized list. Visit the repo page to ask for access.")
        commit = repo.branches.get(rev) or (rev if rev in repo.commits else None)
        if commit is None:
            return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
        files = repo.commits[commit]
        if path not in files:
            return self._error(404, "EntryNotFound", "Entry not found")
        data = files[path]
        common = {"X-Repo-Commit": commit, "Access-Control-Expose-Headers": "X-Repo-Commit,X-Linked-Etag"}
        if len(data) >= self.LFS_MIN:
            sha = hashlib.sha256(data).hexdigest()
            location = self.url(f"lfs/{sha}?X-Amz-Signature=cdnsig0123&Expires=9999999999", host="127.0.0.2")
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {len(data)}\n".encode()
            headers = {**common, "Location": location, "X-Linked-Etag": f'"{sha}"', "X-Linked-Size": str(len(data)),
                       "ETag": f'"{git_blob_sha1(pointer)}"'}
            body = f"Found. Redirecting to {location}"
            if request.method == "HEAD":
                return web.Response(status=302, headers={**headers, "Content-Length": str(len(body))})
            return web.Response(status=302, headers=headers, text=body)
        return serve_bytes(request, data, {**common, "ETag": f'"{git_blob_sha1(data)}"'})
