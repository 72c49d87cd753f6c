"""The training runner's way to storage: checkpoints and snapshots, called from its worker thread.

The runner is synchronous and runs in a worker thread; storage is async on the job's event
loop. :class:`TrainingStorage` hands each save to the loop (``run_coroutine_threadsafe``):
a checkpoint upload runs in the background while training goes on, at most one at a time (a
checkpoint due while the previous one still uploads is skipped and logged); a stop waits for
it. A failed checkpoint upload is logged and training goes on (the previous checkpoint stays
current, see :mod:`services.durable.checkpoints`); :attr:`last_step` is the newest checkpoint that
landed. No torch here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Coroutine, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from services.durable.checkpoints import CheckpointStore
from services.durable.snapshots import Snapshot, SnapshotStore
from services.errors import CheckpointError, CheckpointUploadFailed, InputError, StorageError
from services.job.context import remove_workspace
from services.storage.base import DeleteResult
from services.storage.keys import lora_key

log = logging.getLogger(__name__)

T = TypeVar("T")


class TrainingStorage:
    """Checkpoints (``CheckpointStore``) and snapshots (``SnapshotStore``) of one run."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        checkpoints: CheckpointStore,
        snapshots: SnapshotStore,
        keep_last: int | None,
        resumed_step: int = 0,
        *,
        overwrite: bool = False,
        fresh: bool = False,
    ) -> None:
        self.loop = loop
        self.checkpoints = checkpoints
        self.snapshots = snapshots
        self.keep_last = keep_last
        self.overwrite = overwrite  # delete the old checkpoints and every snapshot before training
        self.fresh = fresh  # resume: false: delete the old checkpoints before training
        self.run: str | None = None  # the config hash, once prepared
        self.finished_run: str | None = None  # the config hash of the completed run whose checkpoints are kept
        self.last_step = resumed_step  # the newest checkpoint in storage (0: none)
        self.last_save_seconds: float | None = None  # how long the last successful save took
        self._pending: Future[None] | None = None

    def _call(self, coroutine: Coroutine[Any, Any, T]) -> Future[T]:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop)

    # --- before the first write (worker thread) ----------------------------------------------

    def prepare(self, config_hash: str) -> None:
        """Called once every input check passed (model, exports, dataset decoded, checkpoint hash):
        apply ``overwrite`` / ``resume: false`` (the first deletes) or refuse a new run over an old
        run's snapshots. Raises :class:`InputError` or :class:`StorageError`."""
        self.run = self.snapshots.run = config_hash
        if self.finished_run == config_hash and not (self.overwrite or self.fresh):
            name = self.checkpoints.output_name
            raise InputError(
                f"input.output_name: {name} already completed this training: its checkpoints were kept "
                f"(keep_checkpoints) and resuming would train the last steps again. Send resume: false to "
                "train it again from step 0, or overwrite: true to delete its checkpoints and snapshots first"
            )
        self._call(prepare_run(self.checkpoints, self.snapshots, overwrite=self.overwrite, fresh=self.fresh)).result()

    # --- checkpoints (worker thread) --------------------------------------------------------

    def uploading(self) -> bool:
        return self._pending is not None and not self._pending.done()

    def save_checkpoint(self, step: int, files: dict[str, Path], config_hash: str, wait: bool) -> bool:
        """Upload the captured ``files`` (their folder is removed after); ``wait`` blocks until it
        landed or failed. Returns False when skipped because the previous upload still runs."""
        folder = next(iter(files.values())).parent
        if self.uploading() and not wait:
            log.warning("checkpoint of step %d skipped: the previous one is still uploading", step)
            remove_workspace(folder)
            return False
        self.wait()
        self._pending = self._call(self._save(step, files, config_hash, folder))
        if wait:
            self.wait()
        return True

    def wait(self) -> None:
        """Wait for the upload in flight, if any (its failure was logged by :meth:`_save`)."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    async def _save(self, step: int, files: dict[str, Path], config_hash: str, folder: Path) -> None:
        started = time.monotonic()
        try:
            await self.checkpoints.save(step, files, config_hash)
        except CheckpointUploadFailed as exc:
            log.warning("training goes on without the checkpoint of step %d: %s", step, exc)
            return
        except CheckpointError as exc:
            log.warning("checkpoint of step %d not saved: %s", step, exc)
            return
        finally:
            await asyncio.to_thread(remove_workspace, folder)
        self.last_step = step
        self.last_save_seconds = time.monotonic() - started

    @staticmethod
    def discard(folder: Path) -> None:
        """Remove a scratch folder the runner filled for storage (a failure is logged, not raised)."""
        remove_workspace(folder)

    # --- snapshots (worker thread) ----------------------------------------------------------

    def save_snapshot(self, step: int, lora_path: Path, samples: Sequence[Path]) -> None:
        """Upload a snapshot and prune to ``keep_last``; a storage failure is logged, training goes on."""
        try:
            snapshot = self._call(self.snapshots.save(step, lora_path, samples)).result()
        except StorageError as exc:
            log.warning("snapshot of step %d of %s not stored: %s", step, self.snapshots.output_name, exc)
            return
        log.info("snapshot of step %d stored: %s", step, snapshot.keys)
        if self.keep_last is not None:
            try:
                self._call(self.snapshots.prune(self.keep_last)).result()
            except StorageError as exc:
                log.warning("pruning the snapshots of %s failed: %s", self.snapshots.output_name, exc)


async def prepare_run(checkpoints: CheckpointStore, snapshots: SnapshotStore, *, overwrite: bool, fresh: bool) -> None:
    """The deletes a new run needs, after every check: ``overwrite`` clears the checkpoints and
    every snapshot; ``fresh`` (``resume: false``) the checkpoints. Without ``overwrite``, snapshots
    of another run (``snapshots.run``) or a stored LoRA of that name refuse the job, naming them:
    a finished LoRA is never replaced by a run that did not ask to."""
    name = checkpoints.output_name
    if overwrite:
        removed = await checkpoints.delete_all()
        pruned = await snapshots.delete(await snapshots.list())
        removed = DeleteResult(removed.deleted + pruned.deleted, removed.errors + pruned.errors)
        if removed.errors:
            raise StorageError(f"could not remove the old files of {name}: {removed.errors[:3]}")
        return
    others = await snapshots.others()
    if others:
        raise InputError(f"input.output_name: {_other_run(name, snapshots.prefix, others)}")
    stored = lora_key(name)
    if await snapshots.storage.head(stored) is not None:
        raise InputError(
            f"input.output_name: {stored} already holds a trained LoRA of {name}; send overwrite: true "
            "to replace it when this run completes (it stays until then), or choose another output_name"
        )
    if fresh:
        removed = await checkpoints.delete_all()
        if removed.errors:
            raise StorageError(f"could not remove the old checkpoints of {name}: {removed.errors[:3]}")


def _other_run(name: str, prefix: str, others: list[Snapshot]) -> str:
    steps = ", ".join(str(s.step) for s in others[:20]) + (", ..." if len(others) > 20 else "")
    return (
        f"{prefix} holds snapshots (steps {steps}) of another training run of {name}; "
        "send overwrite: true to delete them and start over, or choose another output_name"
    )
