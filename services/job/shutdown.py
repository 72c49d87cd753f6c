"""SIGINT/SIGTERM stop every running job between steps, then the SDK (or uvicorn) shuts down as usual.

The RunPod SDK and uvicorn install their own signal handlers after :func:`rp_handler.start`
hands over, so ours are installed at the first job (from the main thread, where the event
loop runs) and call the handler they replace: the worker's graceful shutdown then finds the
jobs already stopping instead of waiting for a 14-minute ``generate`` to finish. Once no job
runs any more, the shared storage client is closed (a local ``--test_input`` run closes it itself).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

from services.job.context import running_job_count, stop_running_jobs
from services.storage import close_storages

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
SIGNALS = (signal.SIGINT, signal.SIGTERM)
_SHUTTING_DOWN = threading.Event()
_CLOSING: set[asyncio.Task[None]] = set()


def _close_storage_if_idle(loop: asyncio.AbstractEventLoop) -> None:
    """On the event loop: close the shared storage client unless a job still runs (it closes it then)."""
    if running_job_count() == 0:
        task = loop.create_task(close_storages())
        _CLOSING.add(task)
        task.add_done_callback(_CLOSING.discard)


def _stopping_handler(
    previous: Any, chain: bool, loop: asyncio.AbstractEventLoop
) -> Callable[[int, FrameType | None], None]:
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        count = stop_running_jobs("shutdown")
        log.warning("%s received: stopping %d running job(s)", signal.Signals(signum).name, count)
        if chain:  # serving: close the storage client at shutdown (a local run closes its own)
            _SHUTTING_DOWN.set()
            loop.call_soon_threadsafe(_close_storage_if_idle, loop)
        # Locally (--test_input) the first signal only stops the job, which then ends the run;
        # a second one is handed on (the SDK exits at once).
        if callable(previous) and (chain or len(received) > 1):
            previous(signum, frame)
        elif len(received) > 1:  # SIG_DFL or SIG_IGN: let the signal do what it did before
            signal.signal(signum, previous)
            signal.raise_signal(signum)

    on_signal._stops_jobs = True  # type: ignore[attr-defined]
    return on_signal


def install_signal_handlers(chain: bool) -> None:
    """Put a job-stopping handler in front of the current SIGINT/SIGTERM handlers (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    loop = asyncio.get_running_loop()
    for signum in SIGNALS:
        previous = signal.getsignal(signum)
        if not getattr(previous, "_stops_jobs", False):
            signal.signal(signum, _stopping_handler(previous, chain, loop))


def stop_jobs_on_signals(handler: Handler, *, chain: bool) -> Handler:
    """``handler`` that first makes sure SIGINT/SIGTERM stop the running jobs.

    ``chain``: also call the replaced handler on the first signal (the SDK's worker loop and
    the local API server shut down through it); off for a local ``--test_input`` run.
    """

    async def run(job: dict[str, Any]) -> dict[str, Any]:
        install_signal_handlers(chain)
        try:
            return await handler(job)
        finally:
            if _SHUTTING_DOWN.is_set() and running_job_count() == 0:
                await close_storages()

    return run
