"""The training loop's durability hook: checkpoints, snapshots, and stopping in time.

:class:`Durability` runs before every optimizer step (``run_steps(before_step=...)``) with the
steps done so far and the loss EMA. In order:

1. Stop: when the stop signal is set (a cancel, SIGTERM) or the job's deadline less
   ``margin`` seconds has come, wait for the upload in flight, save a checkpoint of this step
   when there is time for one (the last save's duration fits before the deadline), and raise
   :class:`JobStopped` saying how to resume; ``resumable`` when a checkpoint is in storage.
2. Snapshot every ``save_every`` steps (``snapshot(step)``: the LoRA file and sample images).
3. Checkpoint every ``every`` steps or ``minutes`` after the last one, whichever comes first:
   captured here (the GPU thread), uploaded in the background (:mod:`services.durable.training_store`).

Nothing is saved at the step a run resumed from (it is in storage already), and nothing of a
diverged run: before a snapshot or checkpoint, :meth:`LoraTrainer.check_finite` raises
:class:`~services.errors.TrainingDiverged` when a loss so far or a LoRA weight is not finite.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from time import monotonic
from typing import TYPE_CHECKING

from services.errors import JobStopped
from services.gpu.train.checkpoint_state import capture

if TYPE_CHECKING:
    import torch

    from services.durable.training_store import TrainingStorage
    from services.gpu.train.loop import ProgressReporter
    from services.gpu.train.trainer import LoraTrainer
    from services.job.stop import StopSignal

log = logging.getLogger(__name__)


@dataclass
class Durability:
    """The hook run before every optimizer step: checkpoint, snapshot, or stop before the deadline."""

    trainer: LoraTrainer
    storage: TrainingStorage | None
    config_hash: str
    workspace: Path
    every: int
    minutes: float
    start_step: int = 0
    save_every: int | None = None
    snapshot: Callable[[int], None] | None = None
    stop: StopSignal | None = None
    deadline: float | None = None  # time.monotonic() seconds
    margin: float = 0.0
    reporter: ProgressReporter | None = None
    last_checkpoint_time: float = field(init=False)

    def __post_init__(self) -> None:
        self.last_checkpoint_time = monotonic()

    def __call__(self, done: int, ema: torch.Tensor | None) -> None:
        self.act(done, ema, *self.decide())

    def decide(self) -> tuple[str | None, float]:
        """Whether to stop now (the reason: the stop signal's or ``deadline``), and the time."""
        now = monotonic()
        if self.stop is not None and self.stop.is_set():
            return self.stop.reason, now
        if self.deadline is not None and now >= self.deadline - self.margin:
            return "deadline", now
        return None, now

    def act(self, done: int, ema: torch.Tensor | None, reason: str | None, now: float) -> None:
        """Stop (with ``reason``), or snapshot and checkpoint when due; a data-parallel run's rank 0
        decides with :meth:`decide` and tells the other ranks before it acts."""
        if reason is not None:
            self._stop(done, ema, reason, now)
        if done > self.start_step:
            if self.snapshot is not None and self.save_every and done % self.save_every == 0:
                self.trainer.check_finite(done)
                self.snapshot(done)
            due = done % self.every == 0 or now - self.last_checkpoint_time >= self.minutes * 60
            if self.storage is not None and due:
                self._checkpoint(done, ema, wait=False)
        self._report()

    def _checkpoint(self, done: int, ema: torch.Tensor | None, wait: bool) -> None:
        assert self.storage is not None
        self.trainer.check_finite(done)  # a diverged state never becomes the checkpoint to resume
        self.last_checkpoint_time = monotonic()
        files = capture(self.trainer.parts(), self.trainer.loop_state(done, ema), self.workspace / f"ckpt-{done}")
        self.storage.save_checkpoint(done, files, self.config_hash, wait=wait)

    def _report(self) -> None:
        if self.reporter is not None and self.storage is not None:
            self.reporter.last_checkpoint_step = self.storage.last_step or None

    def _stop(self, done: int, ema: torch.Tensor | None, reason: str, now: float) -> None:
        total = self.trainer.cfg.steps
        saved = 0
        if self.storage is not None:
            self.storage.wait()
            left = None if self.deadline is None else self.deadline - now
            needed = self.storage.last_save_seconds or 0.0
            if done > max(self.storage.last_step, 0) and done > self.start_step and (left is None or left > needed):
                self._checkpoint(done, ema, wait=True)
            elif done > self.storage.last_step:
                log.warning("stopping at step %d without a checkpoint (%s s left)", done, left)
            saved = self.storage.last_step
        where = f"train_lora at step {done} of {total}: stopped ({reason})"
        if saved > 0:
            raise JobStopped(
                f"{where}; a checkpoint of step {saved} is in storage: send the same input again to resume from it",
                reason=reason,
                resumable=True,
            )
        raise JobStopped(f"{where}; no checkpoint was saved", reason=reason)
