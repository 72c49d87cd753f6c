"""The process of a data-parallel rank other than 0: the same trainer over its rows of each batch.

Spawned by :class:`~services.gpu.train.distributed.group.RankGroup` for one job (``torch.multiprocessing``
spawn context). It loads the model (on its own GPU: ``CUDA_VISIBLE_DEVICES`` is set to that one
before CUDA starts), resolves the same run from the job's input and dataset folder (the machine's
filesystem is shared), restores the checkpoint folder rank 0 downloaded, and then trains in step
with rank 0. It never touches storage. It reports on its pipe: ``("ready",)``, then
``("stopped", step)`` or ``("done", step)``, or ``("error", text)`` before it exits non-zero.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from config.settings import Settings
    from services.gpu.params import TrainLoraInput
    from services.gpu.train.trainer import LoraTrainer

log = logging.getLogger(__name__)

HOST = "127.0.0.1"


@dataclass(frozen=True)
class RankJob:
    """What every spawned rank needs (picklable): the job's input and folders, the rendezvous."""

    params: TrainLoraInput
    dataset_dir: Path
    settings: Settings
    training_adapter: Path | None
    resume_folder: Path | None
    world: int
    port: int
    backend: str  # nccl on CUDA, gloo on the CPU
    devices: tuple[str, ...]  # CUDA_VISIBLE_DEVICES of each rank; empty on the CPU
    threads: int  # torch CPU threads


class RankStopped(Exception):
    """Rank 0 decided to stop before step ``done + 1``."""

    def __init__(self, done: int) -> None:
        super().__init__(f"stopped at step {done}")
        self.done = done


def rank_main(job: RankJob, rank: int, conn: Connection) -> None:
    """Process entry: train as ``rank``; any failure is sent to rank 0, then raised (exit 1)."""
    if job.devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = job.devices[rank]
    logging.basicConfig(level=job.settings.log_level, format=f"%(asctime)s rank {rank} %(levelname)s %(message)s")
    _exit_with_parent()
    try:
        _train_rank(job, rank, conn)
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        raise
    finally:
        conn.close()


def _exit_with_parent() -> None:
    """A thread that ends this process when the worker that spawned it is gone."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        log.error("the worker (process %d) is gone: this rank exits", parent)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _train_rank(job: RankJob, rank: int, conn: Connection) -> None:
    import torch
    import torch.distributed as dist

    from services.gpu.adapters import fused_lora
    from services.gpu.train.loop import run_steps
    from services.gpu.train.setup import prepare_run
    from services.gpu.train.trainer import LoraTrainer

    torch.set_num_threads(job.threads)
    timeout = timedelta(seconds=job.settings.rank_timeout)
    store = dist.TCPStore(HOST, job.port, job.world, is_master=False, timeout=timeout)
    run = prepare_run(job.params, job.dataset_dir, job.settings, job.training_adapter, world_size=job.world)
    adapter = ExitStack()
    if job.training_adapter is not None:  # rank 0 checked it merges (train.job.merge_training_adapter)
        adapter.enter_context(fused_lora(run.entry, job.training_adapter, 1.0))
    trainer = LoraTrainer(run.entry, run.cfg)
    try:
        trainer.setup(run.images, run.captions)
        start, ema = trainer.resume(job.resume_folder) if job.resume_folder is not None else (0, None)
        conn.send(("ready",))
        control = join_group(job, rank, store, trainer)
        try:
            run_steps(trainer, start_step=start, ema=ema, before_step=_follow(control))
        except RankStopped as stopped:
            log.info("rank %d stopped at step %d, as rank 0 decided", rank, stopped.done)
            conn.send(("stopped", stopped.done))
            return
        finish_replica(trainer, job.world, control)
        conn.send(("done", run.cfg.steps))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        try:
            trainer.close()
        finally:
            adapter.close()


def join_group(job: RankJob, rank: int, store: Any, trainer: LoraTrainer) -> Any:
    """Join the process group; set ``trainer`` to train on this rank's rows; returns the control group."""
    import torch.distributed as dist

    from services.gpu.train.distributed.collectives import gradient_sync

    timeout = timedelta(seconds=job.settings.rank_timeout)
    dist.init_process_group(job.backend, store=store, rank=rank, world_size=job.world, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if job.backend != "gloo" else None
    per_rank = trainer.cfg.batch_size
    trainer.rows = slice(rank * per_rank, (rank + 1) * per_rank)
    trainer.sync = gradient_sync(job.world)
    return control


def _follow(control: Any) -> Any:
    from services.gpu.train.distributed.collectives import share_stop

    def before_step(done: int, ema: Any) -> None:
        del ema
        if share_stop(False, control):
            raise RankStopped(done)

    return before_step


def finish_replica(trainer: LoraTrainer, world: int, control: Any) -> list[str]:
    """Exchange the replicas' digests (every rank); returns them by rank."""
    from services.gpu.train.distributed.collectives import gather_digests, lora_digest

    return gather_digests(lora_digest(trainer), world, control)
