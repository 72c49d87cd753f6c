"""The step loop (:func:`run_steps`), its progress reports and the loss log that catches a
diverged run: the same for every family, around :class:`~services.gpu.train.trainer.LoraTrainer`."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from services.errors import TrainingDiverged

if TYPE_CHECKING:
    import torch

    from services.gpu.train.trainer import LoraTrainer, TrainConfig
    from services.job.stop import StopSignal

log = logging.getLogger(__name__)

LOSS_EMA = 0.9
MAX_CURVE_POINTS = 500  # a longer run's loss curve is averaged into this many points
CHECK_SECONDS = 1.0  # on a GPU the loss is checked for divergence (a host sync) this often


class Progress(Protocol):
    """``progress(update, final=False)``: the caller throttles; the last update has final=True."""

    def __call__(self, update: dict[str, Any], final: bool = False) -> None: ...


class ProgressReporter:
    """Sends ``{"step", "total_steps", "loss", "steps_per_second", "eta_seconds",
    "last_checkpoint_step"}`` to ``progress`` at most once per ``interval`` seconds, and always
    the last step (with ``final=True``). ``loss`` is read (a device sync) only when an update
    goes out; speed and ETA count the steps of this run only (a resumed run starts at
    ``start_step``)."""

    def __init__(
        self,
        callback: Progress | None,
        total_steps: int,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        start_step: int = 0,
    ) -> None:
        self.callback = callback
        self.total = total_steps
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.start_step = start_step
        self.last: float | None = None
        self.last_checkpoint_step: int | None = None

    def update(self, step: int, loss: Callable[[], float]) -> None:
        if self.callback is None:
            return
        now = self.clock()
        final = step >= self.total
        if not final and self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        elapsed, done = now - self.started, step - self.start_step
        rate = done / elapsed if done > 0 and elapsed > 0 else None
        update = {
            "step": step,
            "total_steps": self.total,
            "loss": _finite(loss()),
            "steps_per_second": None if rate is None else round(rate, 3),
            "eta_seconds": None if rate is None else round((self.total - step) / rate, 1),
            "last_checkpoint_step": self.last_checkpoint_step,
        }
        self.callback(update, final=final)


def _finite(value: float) -> float | None:
    """Rounded; None for NaN or infinity (progress updates are strict JSON)."""
    return round(value, 6) if math.isfinite(value) else None


@dataclass(frozen=True)
class TrainStats:
    """Measured by :func:`run_steps` (``steps`` counts this run's steps, ``start_step`` the resumed ones)."""

    steps: int
    final_loss: float | None  # None: no step ran (resumed at the last step without a loss)
    seconds: float
    first_step_seconds: float
    start_step: int = 0


StepHook = Callable[[int, "torch.Tensor | None"], None]


def run_steps(
    trainer: LoraTrainer,
    reporter: ProgressReporter | None = None,
    stop: StopSignal | None = None,
    clock: Callable[[], float] = time.perf_counter,
    start_step: int = 0,
    ema: torch.Tensor | None = None,
    before_step: StepHook | None = None,
) -> TrainStats:
    """Run optimizer steps ``start_step + 1 .. cfg.steps``; the loss is an EMA kept on the device.

    Before every step, ``before_step(steps_done, ema)`` runs when given (checkpoints, and the
    stop signal: it raises :class:`JobStopped`); without it ``stop`` is checked there. Every
    step's loss goes to ``trainer.losses`` (a :class:`LossLog`), checked for divergence after
    every step on the CPU, every ``CHECK_SECONDS`` on a GPU, and at the end.
    """
    import torch

    total = trainer.cfg.steps
    cpu = trainer.device.type != "cuda"
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    losses = trainer.losses = LossLog(trainer.cfg, start_step, trainer.device)
    started = checked = clock()
    first = 0.0
    for step in range(start_step + 1, total + 1):
        if before_step is not None:
            before_step(step - 1, ema)
        elif stop is not None:
            stop.check(f"train_lora at step {step - 1} of {total}")
        loss = trainer.step()
        ema = loss if ema is None else ema * LOSS_EMA + loss * (1 - LOSS_EMA)
        losses.record(loss, ema)
        if step == start_step + 1:
            sync()
            first = clock() - started
        if cpu or clock() - checked >= CHECK_SECONDS:
            losses.check()
            checked = clock()
        if reporter is not None:
            current = ema
            reporter.update(step, lambda current=current: float(current))
    losses.check()
    sync()
    final = float(ema) if ema is not None else None
    return TrainStats(total - start_step, final, clock() - started, first, start_step)


def diverged(step: int, cfg: TrainConfig, what: str) -> TrainingDiverged:
    return TrainingDiverged(
        f"train_lora diverged at step {step} of {cfg.steps}: {what}; nothing of the diverged state was "
        f"stored (an earlier LoRA of this name is unchanged). Lower learning_rate (now {cfg.learning_rate:g}) "
        f"or alpha (now {cfg.alpha:g})"
    )


class LossLog:
    """This run's per-step losses and their EMA, on the device (recording costs no host sync).

    :meth:`check` syncs and raises :class:`TrainingDiverged` naming the first non-finite step;
    :meth:`curve` is the result's loss curve, at most ``MAX_CURVE_POINTS`` points.
    """

    def __init__(self, cfg: TrainConfig, start_step: int, device: torch.device) -> None:
        import torch

        self.cfg = cfg
        self.start = start_step
        self.loss = torch.full((max(cfg.steps - start_step, 0),), math.nan, device=device)
        self.ema = torch.full_like(self.loss, math.nan)
        self.count = 0
        self.checked = 0

    def record(self, loss: torch.Tensor, ema: torch.Tensor) -> None:
        self.loss[self.count] = loss
        self.ema[self.count] = ema
        self.count += 1

    def check(self) -> None:
        import torch

        if self.count == self.checked:
            return
        finite = torch.isfinite(self.loss[self.checked : self.count])
        if not bool(finite.all()):
            index = self.checked + int((~finite).nonzero()[0, 0])
            value = float(self.loss[index])
            raise diverged(self.start + index + 1, self.cfg, f"the loss is {value}")
        self.checked = self.count

    def curve(self, max_points: int = MAX_CURVE_POINTS) -> dict[str, Any]:
        """``{"steps", "loss", "ema", "every", "start_step"}``: with more steps than ``max_points``
        each point is the mean loss of ``every`` consecutive steps (``steps``: the last of them)
        and the EMA at that step."""
        count = self.count
        every = max(1, math.ceil(count / max_points))
        loss = self.loss[:count].double().cpu()
        ema = self.ema[:count].double().cpu()
        starts = range(0, count, every)
        ends = [min(begin + every, count) for begin in starts]
        return {
            "steps": [self.start + end for end in ends],
            "loss": [round(float(loss[b:e].mean()), 6) for b, e in zip(starts, ends, strict=True)],
            "ema": [round(float(ema[end - 1]), 6) for end in ends],
            "every": every,
            "start_step": self.start,
        }
