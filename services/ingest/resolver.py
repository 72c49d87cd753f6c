"""DNS lookups for URL inputs, on threads of their own.

``loop.getaddrinfo`` runs the blocking ``socket.getaddrinfo`` on the event loop's default
executor, which local storage, image checks, zip extraction and the GPU runner share. A
lookup that never answers holds one of its threads until the system resolver gives up,
so a job with a few hundred unanswerable host names starved every other job on the worker
(issue 11, finding 2: a 50-file upload took 54 s instead of 0.5 s).

:class:`BoundedResolver` runs lookups on a small executor of its own, and admits at most as
many lookups as it has threads, so its queue never holds more than that. A lookup that
hangs holds its thread and its slot until the system resolver returns; waiting for a slot
counts toward the caller's timeout (``fetch`` wraps each lookup in
``DOWNLOAD_CONNECT_TIMEOUT``). Hung lookups can slow other URL inputs, never anything else.

Each lookup runs on a daemon thread of its own (at most ``threads`` alive at once): a
``ThreadPoolExecutor``'s threads are joined at interpreter exit, so one hung lookup would hold
a worker's shutdown (SIGTERM) until the system resolver gave up.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import weakref
from collections.abc import Callable

logger = logging.getLogger(__name__)

DNS_THREADS = 8
"""Threads (and so concurrent lookups) for URL inputs, per process."""

Lookup = Callable[[str, int], list[str]]
"""Blocking ``(host, port) -> addresses``, run on the resolver's own threads."""


def getaddrinfo_addresses(host: str, port: int) -> list[str]:
    """The system resolver's addresses for ``host`` (TCP), in answer order, deduplicated."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class BoundedResolver:
    """``await resolver(host, port)``: ``lookup`` on at most ``threads`` dedicated threads.

    Raises what ``lookup`` raises (``socket.gaierror`` for an unknown host); the caller
    bounds the wait with ``asyncio.timeout``, slot included.
    """

    def __init__(self, lookup: Lookup = getaddrinfo_addresses, threads: int = DNS_THREADS) -> None:
        if threads < 1:
            raise ValueError("threads must be at least 1")
        self._lookup = lookup
        self._threads = threads
        # One semaphore per event loop (asyncio primitives bind to a loop); a slot is given
        # back when the lookup's thread returns, not when its caller stops waiting.
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    async def __call__(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        slots = self._slots.setdefault(loop, asyncio.Semaphore(self._threads))
        await slots.acquire()
        answer: asyncio.Future[list[str]] = loop.create_future()

        def lookup() -> None:
            try:
                addresses = self._lookup(host, port)
            except Exception as exc:  # noqa: BLE001 - handed to the awaiting caller, who reports it
                _deliver(loop, slots, answer, host, error=exc)
            else:
                _deliver(loop, slots, answer, host, addresses=addresses)

        try:
            threading.Thread(target=lookup, name=f"dns-{host[:40]}", daemon=True).start()
        except RuntimeError:  # no thread could be started: give the slot back
            slots.release()
            raise
        return await answer  # the caller's timeout cancels the wait; the thread ends on its own


def _deliver(
    loop: asyncio.AbstractEventLoop,
    slots: asyncio.Semaphore,
    answer: asyncio.Future[list[str]],
    host: str,
    *,
    addresses: list[str] | None = None,
    error: Exception | None = None,
) -> None:
    """From the lookup's thread: free its slot and answer the caller (unless it stopped waiting)."""

    def on_loop() -> None:
        slots.release()
        if answer.done():  # the caller timed out or was cancelled meanwhile
            return
        if error is not None:
            answer.set_exception(error)
        else:
            answer.set_result(addresses or [])

    if loop.is_closed():
        logger.debug("DNS lookup of %s returned after its event loop closed", host)
        return
    try:
        loop.call_soon_threadsafe(on_loop)
    except RuntimeError:  # the loop closed between the check and the call
        logger.debug("DNS lookup of %s returned after its event loop closed", host)
