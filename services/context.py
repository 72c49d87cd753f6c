"""Per-job context: job id, settings, storage, a private workspace, and progress reports."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import time
import uuid
import weakref
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from config.settings import Settings
from services.storage import Storage, get_storage

log = logging.getLogger(__name__)

PROGRESS_INTERVAL = 1.0  # seconds; RunPod's progress_update starts a thread and a session per call
_GPU_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def gpu_lock() -> asyncio.Lock:
    """The lock that serializes GPU jobs on this worker (one per event loop)."""
    return _GPU_LOCKS.setdefault(asyncio.get_running_loop(), asyncio.Lock())


@dataclass
class JobContext:
    """What an action needs besides its validated input."""

    job: dict[str, Any]
    job_id: str
    settings: Settings
    storage: Storage
    workspace: Path
    key_id: str = ""
    _last_progress: float = field(default=0.0, repr=False)

    def progress(self, update: dict[str, Any], *, force: bool = False) -> None:
        """Report progress at most once a second (thread-safe enough: called from one thread)."""
        now = time.monotonic()
        if not force and now - self._last_progress < PROGRESS_INTERVAL:
            return
        self._last_progress = now
        log.info("job %s progress: %s", self.key_id, update)
        if self.settings.runpod_webhook_post_output:  # only on RunPod: locally there is no one to tell
            from runpod.serverless import progress_update

            progress_update(self.job, update)


def remove_workspace(path: Path) -> None:
    """Delete a job workspace; a failure is logged with the path, never raised."""
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        log.warning("could not remove job workspace %s: %s", path, exc)


@asynccontextmanager
async def job_context(job: dict[str, Any], settings: Settings) -> AsyncIterator[JobContext]:
    """A context with its own temporary workspace, removed when the job ends (even on cancel)."""
    job_id = str(job.get("id") or f"local-{uuid.uuid4().hex[:12]}")
    storage = await get_storage(settings)
    parent = settings.work_dir
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    # ASCII only: 64 four-byte letters would pass isalnum() and make a name over NAME_MAX (255 bytes).
    safe_id = "".join(c if (c.isascii() and c.isalnum()) or c in "-_" else "_" for c in job_id)[:64]
    workspace = Path(tempfile.mkdtemp(prefix=f"job-{safe_id}-", dir=parent))
    try:
        yield JobContext(
            job=job, job_id=job_id, settings=settings, storage=storage, workspace=workspace, key_id=safe_id
        )
    finally:
        remove_workspace(workspace)
