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
"""

from __future__ import annotations

import asyncio
import logging
import socket
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

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
        self._executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dns")
        # One semaphore per event loop (asyncio primitives bind to a loop); a slot is given
        # back when the lookup's thread returns, not when its caller stops waiting.
        self._slots: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
            weakref.WeakKeyDictionary()
        )

    async def __call__(self, host: str, port: int) -> list[str]:
        loop = asyncio.get_running_loop()
        slots = self._slots.setdefault(loop, asyncio.Semaphore(self._threads))
        await slots.acquire()
        try:
            job = self._executor.submit(self._lookup, host, port)
        except BaseException:
            slots.release()
            raise
        job.add_done_callback(lambda _: _release_from_thread(loop, slots, host))
        return await asyncio.wrap_future(job)  # cancelled while queued: the job is dropped


def _release_from_thread(loop: asyncio.AbstractEventLoop, slots: asyncio.Semaphore, host: str) -> None:
    """Give the slot back on its loop; a loop closed meanwhile has no waiter left to wake."""
    if loop.is_closed():
        logger.debug("DNS lookup of %s returned after its event loop closed", host)
        return
    loop.call_soon_threadsafe(slots.release)
