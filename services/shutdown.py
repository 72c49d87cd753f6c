"""SIGINT/SIGTERM stop every running job between steps, then the SDK (or uvicorn) shuts down as usual.

The RunPod SDK and uvicorn install their own signal handlers after :func:`rp_handler.start`
hands over, so ours are installed at the first job (from the main thread, where the event
loop runs) and call the handler they replace: the worker's graceful shutdown then finds the
jobs already stopping instead of waiting for a 14-minute ``generate`` to finish.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

from services.context import stop_running_jobs

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stopping_handler(previous: Any, chain: bool) -> Callable[[int, FrameType | None], None]:
    received: list[int] = []

    def on_signal(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        count = stop_running_jobs("shutdown")
        log.warning("%s received: stopping %d running job(s)", signal.Signals(signum).name, count)
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
    for signum in SIGNALS:
        previous = signal.getsignal(signum)
        if not getattr(previous, "_stops_jobs", False):
            signal.signal(signum, _stopping_handler(previous, chain))


def stop_jobs_on_signals(handler: Handler, *, chain: bool) -> Handler:
    """``handler`` that first makes sure SIGINT/SIGTERM stop the running jobs.

    ``chain``: also call the replaced handler on the first signal (the SDK's worker loop and
    the local API server shut down through it); off for a local ``--test_input`` run.
    """

    async def run(job: dict[str, Any]) -> dict[str, Any]:
        install_signal_handlers(chain)
        return await handler(job)

    return run
