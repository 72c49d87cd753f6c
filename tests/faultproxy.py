"""A small fault-injecting HTTP reverse proxy for tests and benchmarks.

Sits between an S3 client and the moto server and adds latency, error answers
(``503 SlowDown`` unless told otherwise, optionally only for the requests ``error_when``
picks), connection resets, or a full outage (``down``), and counts the requests that
reached it. Runs its own event loop in a background thread, so it serves synchronous and
asynchronous clients alike. :class:`StalledServer` is a store that accepts connections and
never answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import select
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

SLOW_DOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


def error_body(code: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{code}</Message></Error>'.encode()
    )


HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "host"}


@dataclass
class Faults:
    """What the proxy does to each request (change at any time)."""

    latency: float = 0.0
    error_rate: float = 0.0
    reset_rate: float = 0.0
    down: bool = False
    fail_after: int | None = None  # go down after this many forwarded requests
    error_status: int = 503
    error_code: str = "SlowDown"
    error_when: Callable[[str, str], bool] | None = None  # (method, path and query): inject here only


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class FaultProxy:
    """``with FaultProxy(upstream, Faults(latency=0.025)) as proxy: ... proxy.url``."""

    def __init__(self, upstream: str, faults: Faults | None = None, seed: int = 0) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = faults or Faults()
        self.port = free_port()
        self.requests = 0
        self.forwarded = 0
        self.injected_errors = 0
        self.injected_resets = 0
        self.in_flight = 0  # forwarded requests whose answer has not come back from upstream
        self._random = random.Random(seed)
        self._lock = threading.Condition()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="fault-proxy", daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> FaultProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if self._thread.is_alive():
            future = asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop)
            future.result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._start())
        self._ready.set()
        self._loop.run_forever()
        self._loop.close()

    async def _start(self) -> None:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        connector = aiohttp.TCPConnector(limit=256)
        self._session = aiohttp.ClientSession(connector=connector, auto_decompress=False)

    async def _shutdown(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def _decide(self, method: str, path_qs: str) -> str:
        with self._lock:
            self.requests += 1
            faults = self.faults
            if faults.down or (faults.fail_after is not None and self.forwarded >= faults.fail_after):
                return "down"
            roll = self._random.random()
            targeted = faults.error_when is None or faults.error_when(method, path_qs)
            error_rate = faults.error_rate if targeted else 0.0
            if roll < error_rate:
                self.injected_errors += 1
                return "error"
            if roll < error_rate + faults.reset_rate:
                self.injected_resets += 1
                return "reset"
            self.forwarded += 1
            self.in_flight += 1
            self._lock.notify_all()
            return "forward"

    def _answered(self) -> None:
        with self._lock:
            self.in_flight -= 1
            self._lock.notify_all()

    def wait_forwarded(self, count: int, timeout: float = 60) -> None:
        """Until ``count`` requests were forwarded (``timeout``: a hang guard only)."""
        with self._lock:
            if not self._lock.wait_for(lambda: self.forwarded >= count, timeout):
                raise AssertionError(f"only {self.forwarded} of {count} requests reached the proxy")

    def quiesce(self, timeout: float = 60) -> None:
        """Stop forwarding (later requests are reset) and wait until every request already
        forwarded has its answer back: after this, nothing more reaches the upstream."""
        with self._lock:
            self.faults.down = True
            if not self._lock.wait_for(lambda: self.in_flight == 0, timeout):
                raise AssertionError(f"{self.in_flight} requests still in flight")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        decision = self._decide(request.method, request.path_qs)
        if decision == "forward":
            try:
                return await self._forward(request, await request.read())
            finally:
                self._answered()
        await request.read()
        if decision == "down":
            return self._reset(request)
        return await self._inject(request, decision)

    async def _inject(self, request: web.Request, decision: str) -> web.StreamResponse:
        if self.faults.latency:
            await asyncio.sleep(self.faults.latency)
        if decision == "error":
            faults = self.faults
            body = SLOW_DOWN_BODY if faults.error_code == "SlowDown" else error_body(faults.error_code)
            return web.Response(status=faults.error_status, body=body, content_type="application/xml")
        return self._reset(request)

    async def _forward(self, request: web.Request, body: bytes) -> web.StreamResponse:
        if self.faults.latency:
            await asyncio.sleep(self.faults.latency)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = request.headers.get("Host", "")
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body, allow_redirects=False
        ) as upstream:
            payload = await upstream.read()
            out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
            if request.method == "HEAD" and "Content-Length" in upstream.headers:
                # No body to measure: pass the object's size on, or every HEAD reads as 0 bytes.
                out_headers["Content-Length"] = upstream.headers["Content-Length"]
            return web.Response(status=upstream.status, headers=out_headers, body=payload)

    @staticmethod
    def _reset(request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is not None:
            with contextlib.suppress(OSError):
                sock = transport.get_extra_info("socket")
                if sock is not None:  # RST instead of FIN, like a crashed server
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            transport.abort()
        raise asyncio.CancelledError


class StalledServer:
    """Accepts TCP connections, reads what arrives and never answers (a hung store).

    ``connections`` counts the connections accepted, so a test can tell that no request left.
    """

    def __init__(self) -> None:
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(128)
        self.port = int(self._listener.getsockname()[1])
        self.connections = 0
        self._held: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="stalled-server", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> StalledServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
        self._thread.join(5)
        for conn in self._held:
            conn.close()

    def _accept(self) -> None:
        self._listener.settimeout(0.1)
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.1)  # look at the stop flag 10x a second
                if not ready:
                    continue
                conn, _ = self._listener.accept()
            except (OSError, ValueError):  # ValueError: select on a closed listener
                return  # the listener was closed
            self.connections += 1
            self._held.append(conn)  # kept open, never read from, never answered
