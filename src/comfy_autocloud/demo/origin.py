"""A small HTTP origin on loopback for the demo: Range, HEAD, ETag, and per-connection throttling.

Paths under /throttled/ are served at `throttle` bytes/s per connection, like a CDN that caps each
stream, which is where many parallel connections pay off.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from email.utils import formatdate
from pathlib import Path

from aiohttp import web

from comfy_autocloud.aiothread import AppThread

_CHUNK = 256 * 1024


class DemoOrigin:
    def __init__(self, root: Path, *, throttle: int = 16 * 2**20, host: str = "127.0.0.1") -> None:
        self.root = root.resolve()
        self.throttle = throttle
        self.host = host
        self.bytes_served = 0
        self._server = AppThread(self._app, hosts=(host,), name="demo-origin")

    def url(self, rel: str) -> str:
        return f"http://{self.host}:{self.port}/{rel}"

    @property
    def port(self) -> int:
        return self._server.port

    def _app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/{path:.*}", self._handle)
        return app

    def start(self) -> DemoOrigin:
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> DemoOrigin:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405)
        rel = request.match_info["path"]
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or not path.is_file():
            return web.Response(status=404)
        st = path.stat()
        etag = '"' + hashlib.sha1(f"{rel}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16] + '"'
        headers = {"Accept-Ranges": "bytes", "ETag": etag,
                   "Last-Modified": formatdate(st.st_mtime, usegmt=True), "Content-Type": "application/octet-stream"}
        start, end, status = 0, st.st_size - 1, 200
        rng = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if rng and rng.startswith("bytes=") and (if_range is None or if_range == etag):
            first, _, last = rng[6:].split(",")[0].partition("-")
            try:
                if first:
                    start = int(first)
                    end = min(int(last), st.st_size - 1) if last else st.st_size - 1
                else:
                    start = max(st.st_size - int(last), 0)
            except ValueError:
                return web.Response(status=416)
            if start > end or start >= st.st_size:
                return web.Response(status=416, headers={"Content-Range": f"bytes */{st.st_size}"})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{st.st_size}"
        length = end - start + 1 if st.st_size else 0
        headers["Content-Length"] = str(length)
        resp = web.StreamResponse(status=status, headers=headers)
        await resp.prepare(request)
        if request.method == "HEAD":
            return resp
        throttled = rel.startswith("throttled/")
        t0 = time.monotonic()
        sent = 0
        fd = os.open(path, os.O_RDONLY)
        try:
            while sent < length:
                block = os.pread(fd, min(_CHUNK, length - sent), start + sent)
                if not block:
                    break
                await resp.write(block)
                sent += len(block)
                self.bytes_served += len(block)
                if throttled:
                    ahead = sent / self.throttle - (time.monotonic() - t0)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        finally:
            os.close(fd)
        await resp.write_eof()
        return resp
