"""An aiohttp application served from its own event loop on a daemon thread.

Synchronous callers (the CLI's peer server, the demo's origin, test servers) need a real HTTP server
beside them; this is the one implementation of starting, binding (several hosts share one port),
and stopping it without stalled handlers holding the shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


class AppThread:
    """`AppThread(make_app, hosts=("127.0.0.1",), port=0).start()`; `.port` is known once started."""

    def __init__(self, make_app: Callable[[], web.Application], *, hosts: Sequence[str] = ("127.0.0.1",),
                 port: int = 0, name: str = "aiohttp-server", shutdown_timeout: float = 2.0) -> None:
        self.make_app = make_app
        self.hosts = tuple(hosts)
        self.port = port
        self.name = name
        self.shutdown_timeout = shutdown_timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def start(self, timeout: float = 15.0) -> AppThread:
        ready = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self.loop = loop
            asyncio.set_event_loop(loop)
            runner = web.AppRunner(self.make_app(), access_log=None)
            try:
                loop.run_until_complete(runner.setup())
                for host in self.hosts:  # the first bind picks the port when it is 0; the others share it
                    site = web.TCPSite(runner, host, self.port)
                    loop.run_until_complete(site.start())
                    server = site._server
                    if self.port == 0 and server is not None and server.sockets:  # type: ignore[union-attr]
                        self.port = int(server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
            except BaseException as exc:  # surfaced to the starting thread
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            # Stalled handlers (slow trickles, long downloads) must not hold the shutdown: cancel them first.
            for task in asyncio.all_tasks(loop):
                task.cancel()
            with contextlib.suppress(BaseException):
                loop.run_until_complete(asyncio.wait_for(runner.cleanup(), self.shutdown_timeout))
            loop.close()

        self._thread = threading.Thread(target=run, name=self.name, daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            raise RuntimeError(f"{self.name} did not start within {timeout:.0f}s")
        if errors:
            raise errors[0]
        return self

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run a coroutine on the server's loop from another thread and return its result."""
        if self.loop is None:
            raise RuntimeError(f"{self.name} is not running")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self.loop is not None:
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.loop = None
        self._thread = None

    def __enter__(self) -> AppThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
