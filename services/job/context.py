"""Per-job context: job id, settings, storage, a private workspace, progress reports and the stop signal."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from config.settings import Settings
from services.errors import JobStopped
from services.job.stop import StopSignal
from services.storage import Storage, get_storage

log = logging.getLogger(__name__)

T = TypeVar("T")

PROGRESS_INTERVAL = 1.0  # seconds; RunPod's progress_update starts a thread and a session per call
_GPU_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
_RUNNING: dict[int, StopSignal] = {}  # the stop signal of every running job, by id(signal)


def gpu_lock() -> asyncio.Lock:
    """The lock that serializes GPU jobs on this worker (one per event loop)."""
    return _GPU_LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())


def running_job_count() -> int:
    """How many jobs are running on this worker now."""
    return len(_RUNNING)


def stop_running_jobs(reason: str) -> int:
    """Set the stop signal of every running job (SIGTERM/SIGINT); returns how many were running."""
    signals = list(_RUNNING.values())
    for signal in signals:
        signal.set(reason)
    return len(signals)


@dataclass
class JobContext:
    """What an action needs besides its validated input.

    ``stage`` names what the job is doing now (``downloading the dataset``), for the error of a
    job that runs out of time; ``stopped`` holds the :class:`JobStopped` a worker thread raised
    after the job was cancelled or timed out.
    """

    job: dict[str, Any]
    job_id: str
    settings: Settings
    storage: Storage
    workspace: Path
    key_id: str = ""
    stop: StopSignal = field(default_factory=StopSignal)
    stage: str = "starting"
    stopped: JobStopped | None = None
    deadline: float | None = None  # the job deadline in event-loop time (time.monotonic()); None: none
    _last_progress: float = field(default=0.0, repr=False)
    _progress_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def progress(self, update: dict[str, Any], final: bool = False) -> None:
        """Report progress at most once a second; a ``final`` update is always sent.

        Thread-safe: the GPU runner calls it from its worker thread. On RunPod (where
        ``RUNPOD_WEBHOOK_POST_OUTPUT`` is set) it goes to ``runpod.serverless.progress_update``.
        """
        now = time.monotonic()
        with self._progress_lock:
            if not final and now - self._last_progress < PROGRESS_INTERVAL:
                return
            self._last_progress = now
        log.info("job %s progress: %s", self.key_id, update)
        if self.settings.runpod_webhook_post_output:
            from runpod.serverless import progress_update

            progress_update(self.job, update)

    async def in_thread(self, stage: str, function: Callable[..., T], *args: Any) -> T:
        """Run ``function(*args)`` in a worker thread; on cancel, stop it and wait for it before re-raising.

        A thread cannot be killed: a cancel (RunPod's ``/cancel``, the job deadline) sets
        :attr:`stop`, which the runner checks between steps, and waits for the thread to end,
        so the GPU lock and the workspace are released only once nothing uses them.
        """
        self.stage = stage
        future = asyncio.ensure_future(asyncio.to_thread(function, *args))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            self.stop.set("cancelled")
            log.info("job %s: cancelled while %s; waiting for the worker thread to stop", self.key_id, stage)
            await _wait_through_cancels(future)
            error = future.exception()
            if isinstance(error, JobStopped):
                self.stopped = error
            elif error is not None:
                log.warning("job %s: the worker thread failed after the cancel: %r", self.key_id, error)
            raise


async def _wait_through_cancels(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, even when this task is cancelled again meanwhile."""
    while not future.done():
        try:
            await asyncio.wait({future})
        except asyncio.CancelledError:
            log.info("another cancel while a worker thread stops; still waiting for it")


def remove_workspace(path: Path) -> None:
    """Delete a job workspace; a failure is logged with the path, never raised."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("could not remove job workspace %s: %s", path, exc)


def safe_job_id(job_id: str) -> str:
    """``job_id`` as a file name part: ASCII letters, digits, ``-`` and ``_``, at most 64 characters.

    ASCII only: 64 four-byte letters would pass isalnum() and make a name over NAME_MAX (255 bytes).
    """
    return "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in job_id)[:64]


@asynccontextmanager
async def job_context(job: dict[str, Any], settings: Settings) -> AsyncIterator[JobContext]:
    """A context with its own temporary workspace, removed when the job ends (even on cancel)."""
    job_id = str(job.get("id") or f"local-{uuid.uuid4().hex[:12]}")
    storage = await get_storage(settings)
    parent = settings.work_dir
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    safe_id = safe_job_id(job_id)
    workspace = Path(tempfile.mkdtemp(prefix=f"job-{safe_id}-", dir=parent))
    ctx = JobContext(job=job, job_id=job_id, settings=settings, storage=storage, workspace=workspace, key_id=safe_id)
    _RUNNING[id(ctx.stop)] = ctx.stop
    try:
        yield ctx
    finally:
        del _RUNNING[id(ctx.stop)]
        remove_workspace(workspace)
