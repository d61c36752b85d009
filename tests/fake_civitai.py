"""A fake Civitai on loopback: the model-version API, the download endpoint and a storage host.

Shaped after developer.civitai.com's reference for `GET /api/v1/model-versions/{id}` (files[] with
`name`, `type`, `sizeKB` (rounded), `metadata` {format, size, fp}, `hashes` with upper-case
`SHA256`, `downloadUrl`, `primary`; 404 `{"error": …}` for unknown or unpublished versions) and
`GET /api/v1/models/{id}` (`modelVersions`, newest first). `GET /api/download/models/{vid}` (optional
`?type=&format=&size=&fp=`) answers 307 to a signed URL on 127.0.0.2 (another origin, like
Civitai's storage), or 401 with a JSON reason when the creator requires a login and no valid
`Authorization: Bearer` / `?token=` came with it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlencode

from aiohttp import web

from fake_hub import LoopServer, serve_bytes

CIVITAI_TOKEN = "civitai_fakeKEY_NeverPrintMe_42"


@dataclass
class FakeFile:
    name: str
    data: bytes
    primary: bool = False
    type: str = "Model"
    metadata: dict[str, str] = field(default_factory=lambda: {"format": "SafeTensor", "size": "pruned", "fp": "fp16"})
    published_sha256: str | None = None  # what the API claims; default: the real sha256


@dataclass
class FakeVersion:
    vid: int
    model_id: int
    files: list[FakeFile]
    login_required: bool = False


class FakeCivitai(LoopServer):
    def __init__(self) -> None:
        super().__init__()
        self.versions: dict[int, FakeVersion] = {}
        self.rate_limit_once: set[str] = set()  # API paths answered 429 once

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def add_version(self, vid: int, model_id: int, files: list[FakeFile], *, login_required: bool = False) -> None:
        self.versions[vid] = FakeVersion(vid, model_id, files, login_required)

    def _download_url(self, v: FakeVersion, f: FakeFile) -> str:
        url = f"{self.base}/api/download/models/{v.vid}"
        if f.primary:
            return url
        return url + "?" + urlencode({"type": f.type, **f.metadata})

    def _file_json(self, v: FakeVersion, f: FakeFile) -> dict[str, object]:
        sha = f.published_sha256 or hashlib.sha256(f.data).hexdigest()
        return {"id": abs(hash((v.vid, f.name))) % 10**7, "name": f.name, "type": f.type,
                "sizeKB": round(len(f.data) / 1024, 2), "metadata": f.metadata,
                "pickleScanResult": "Success", "virusScanResult": "Success",
                "hashes": {"AutoV2": sha[:10].upper(), "SHA256": sha.upper(), "CRC32": "DAEE95B7"},
                "downloadUrl": self._download_url(v, f), **({"primary": True} if f.primary else {})}

    def _version_json(self, v: FakeVersion) -> dict[str, object]:
        return {"id": v.vid, "modelId": v.model_id, "name": f"v{v.vid}", "baseModel": "SD 1.5",
                "status": "Published", "availability": "Public",
                "model": {"name": f"model {v.model_id}", "type": "Checkpoint", "nsfw": False, "poi": False},
                "files": [self._file_json(v, f) for f in v.files], "images": [],
                "downloadUrl": f"{self.base}/api/download/models/{v.vid}"}

    async def handle(self, request: web.Request) -> web.StreamResponse:
        host = request.host.split(":")[0]
        path = request.path
        if host == "127.0.0.2":
            return self._storage(request)
        if path in self.rate_limit_once:
            self.rate_limit_once.discard(path)
            return web.json_response({"error": "Too many requests"}, status=429, headers={"Retry-After": "1"})
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "model-versions"] and len(parts) == 4 and parts[3].isdigit():
            v = self.versions.get(int(parts[3]))
            if v is None:
                return web.json_response({"error": f"No model version with id {parts[3]}"}, status=404)
            return web.json_response(self._version_json(v))
        if parts[:3] == ["api", "v1", "models"] and len(parts) == 4 and parts[3].isdigit():
            mine = sorted((v for v in self.versions.values() if v.model_id == int(parts[3])), key=lambda v: -v.vid)
            if not mine:
                return web.json_response({"error": f"No model with id {parts[3]}"}, status=404)
            return web.json_response({"id": int(parts[3]), "name": f"model {parts[3]}", "type": "Checkpoint",
                                      "modelVersions": [self._version_json(v) for v in mine]})
        if parts[:3] == ["api", "download", "models"] and len(parts) == 4 and parts[3].isdigit():
            return self._download(request, int(parts[3]))
        return web.json_response({"error": "Not found"}, status=404)

    def _download(self, request: web.Request, vid: int) -> web.Response:
        v = self.versions.get(vid)
        if v is None:
            return web.json_response({"error": "Model not found"}, status=404)
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else request.query.get("token")
        if v.login_required and token != CIVITAI_TOKEN:
            return web.json_response({"error": "Unauthorized", "message": "The creator of this asset requires you "
                                      "to be logged in to download it"}, status=401)
        want = {k: request.query[k] for k in ("type", "format", "size", "fp") if k in request.query}
        if want:
            hits = [f for f in v.files if all((f.type if k == "type" else f.metadata.get(k)) == val
                                              for k, val in want.items())]
        else:
            hits = [f for f in v.files if f.primary] or v.files[:1]
        if not hits:
            return web.json_response({"error": "File not found"}, status=404)
        f = hits[0]
        location = self.url(f"files/{vid}/{quote(f.name)}?X-Amz-Signature=r2sig{vid}&X-Amz-Expires=86400",
                            host="127.0.0.2")
        return web.Response(status=307, headers={"Location": location})

    def _storage(self, request: web.Request) -> web.Response:
        parts = request.path.strip("/").split("/")
        if len(parts) != 3 or parts[0] != "files" or not parts[1].isdigit():
            return web.Response(status=404, text="NoSuchKey")
        if "X-Amz-Signature" not in request.query:
            return web.Response(status=403, text="AccessDenied")
        v = self.versions.get(int(parts[1]))
        name = unquote(parts[2])
        f = next((f for f in v.files if f.name == name), None) if v else None
        if f is None:
            return web.Response(status=404, text="NoSuchKey")
        return serve_bytes(request, f.data, {"ETag": f'"{hashlib.md5(f.data).hexdigest()}"',
                                             "Content-Type": "application/octet-stream"})


