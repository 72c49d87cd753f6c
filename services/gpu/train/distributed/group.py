"""Rank 0's side of a data-parallel run: spawn the other ranks, train in step, always clean up.

:func:`rank_group` gives :class:`SingleProcess` (nothing to do) for a world of one, else a
:class:`RankGroup`, used by the training runner as a context manager around the trainer::

    with rank_group(run, dataset_dir, settings, adapter, resume_folder) as ranks:
        trainer.setup(...); trainer.resume(...)
        ranks.join(trainer, stop)                      # every rank ready, process group up
        run_steps(..., before_step=ranks.hook(durability))
        ranks.finish(trainer)                          # the replicas are identical

Failure: a spawned rank that dies (killed, out of memory, an error) makes the next collective
of rank 0 fail (gloo: at once, the peer's socket closes; NCCL: the monitor thread aborts the
group); leaving the block then raises :class:`GpuError` naming the rank, its process and how it
ended. Every exit terminates the ranks still running (SIGTERM, then SIGKILL) and destroys the
process group: no process stays behind. The GPU lock is held by the job around all of it.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from dataclasses import replace
from multiprocessing.connection import wait
from types import TracebackType
from typing import TYPE_CHECKING, Any

from services.errors import GpuError, JobStopped
from services.gpu.train.distributed.rank import HOST, RankJob, finish_replica, join_group, rank_main

if TYPE_CHECKING:
    from datetime import timedelta
    from multiprocessing.connection import Connection
    from multiprocessing.process import BaseProcess
    from pathlib import Path

    from config.settings import Settings
    from services.gpu.train.durable import Durability
    from services.gpu.train.loop import StepHook
    from services.gpu.train.setup import PreparedRun
    from services.gpu.train.trainer import LoraTrainer
    from services.job.stop import StopSignal

log = logging.getLogger(__name__)

EXIT_GRACE = 10.0  # seconds a rank has to exit after it was told to stop or finish, or was terminated


class SingleProcess:
    """A world of one: every call is a no-op."""

    world = 1

    def __enter__(self) -> SingleProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def join(self, trainer: LoraTrainer, stop: StopSignal | None) -> None:
        del trainer, stop

    def hook(self, durability: Durability) -> StepHook:
        return durability

    def finish(self, trainer: LoraTrainer) -> None:
        del trainer


def rank_group(
    run: PreparedRun, dataset_dir: Path, settings: Settings, adapter: Path | None, resume_folder: Path | None
) -> SingleProcess | RankGroup:
    """The ranks of ``run`` (``run.cfg.world_size``), spawned now so that they load while rank 0 does."""
    import torch

    world = run.cfg.world_size
    if world == 1:
        return SingleProcess()
    cuda = run.device.type == "cuda"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(world)]
    job = RankJob(
        params=run.params,
        dataset_dir=dataset_dir,
        settings=settings,
        training_adapter=adapter,
        resume_folder=resume_folder,
        world=world,
        port=0,
        backend="nccl" if cuda else "gloo",
        devices=tuple(ids[:world]) if cuda else (),
        threads=torch.get_num_threads(),
    )
    return RankGroup(job)


class RankGroup:
    """Ranks 1..N-1 of one job, as processes; this thread is rank 0."""

    def __init__(self, job: RankJob) -> None:
        from datetime import timedelta

        import torch.distributed as dist
        import torch.multiprocessing as mp

        if job.backend == "nccl":  # a timed-out collective raises here instead of aborting the worker
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
        self.timeout: timedelta = timedelta(seconds=job.settings.rank_timeout)
        self.store = dist.TCPStore(HOST, 0, job.world, is_master=True, timeout=self.timeout, wait_for_workers=False)
        self.job = replace(job, port=self.store.port)
        self.world = job.world
        self.step = 0
        self.control: Any = None
        self.stop_shared = False
        self.closed = threading.Event()
        self.procs: dict[int, BaseProcess] = {}
        self.conns: dict[int, Connection] = {}
        self.last: dict[int, tuple[Any, ...]] = {}
        context = mp.get_context("spawn")
        for rank in range(1, self.world):
            ours, theirs = context.Pipe(duplex=False)
            proc = context.Process(target=rank_main, args=(self.job, rank, theirs), name=f"train-rank-{rank}")
            proc.daemon = True
            proc.start()
            theirs.close()
            self.procs[rank], self.conns[rank] = proc, ours
        log.info("training on %d ranks (%s): spawned %s", self.world, job.backend, [p.pid for p in self.procs.values()])

    def __enter__(self) -> RankGroup:
        return self

    def join(self, trainer: LoraTrainer, stop: StopSignal | None) -> None:
        """Wait until every rank is ready (a dead one fails now), then form the process group."""
        pending = set(self.procs)
        while pending:
            if stop is not None:
                stop.check(f"train_lora waiting for ranks {sorted(pending)} to load the model")
            conns = [self.conns[r] for r in pending]
            wait([*conns, *(self.procs[r].sentinel for r in pending)], timeout=1.0)
            for rank in sorted(pending):
                message = self._receive(rank)
                if message is not None and message[0] == "ready":
                    pending.discard(rank)
                elif message is not None or not self.procs[rank].is_alive():
                    raise self._failure(rank)
        self.control = join_group(self.job, 0, self.store, trainer)
        if self.job.backend == "nccl":  # gloo fails the collective itself when a peer's socket closes
            threading.Thread(target=self._monitor, name="rank-monitor", daemon=True).start()

    def hook(self, durability: Durability) -> StepHook:
        """Rank 0's hook before every step: decide, tell every rank, then act (checkpoint, stop)."""
        from services.gpu.train.distributed.collectives import share_stop

        def before_step(done: int, ema: Any) -> None:
            self.step = done
            reason, now = durability.decide()
            self.stop_shared = share_stop(reason is not None, self.control)
            if self.stop_shared:
                self.closed.set()  # the ranks end on their own now
            durability.act(done, ema, reason, now)

        return before_step

    def finish(self, trainer: LoraTrainer) -> None:
        """Check that every replica holds the same LoRA, and that every rank ends."""
        self.closed.set()  # from here the ranks end on their own
        digests = finish_replica(trainer, self.world, self.control)
        if len(set(digests)) != 1:
            raise GpuError(f"train_lora: the LoRA replicas of the {self.world} ranks differ ({digests}); not saved")
        self._wait_all("done")

    # --- teardown -----------------------------------------------------------------------------

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        import torch.distributed as dist

        self.closed.set()
        try:
            if isinstance(exc, JobStopped) and self.stop_shared:
                self._wait_all("stopped")
            dead = self._dead_rank(wait_s=EXIT_GRACE if isinstance(exc, RuntimeError) else 0.0)
        finally:
            self._terminate()
            if dist.is_initialized():
                dist.destroy_process_group()
            for conn in self.conns.values():
                conn.close()
        if dead is not None and (exc is None or isinstance(exc, RuntimeError)):
            raise self._failure(dead) from exc
        if isinstance(exc, RuntimeError) and _collective_error(exc):
            raise GpuError(f"train_lora: the {self.world} training ranks lost contact at step {self.step}: {exc}")

    def _wait_all(self, expected: str) -> None:
        """Every rank's last message is ``expected`` and it exits; else the failed rank's error."""
        for rank, proc in self.procs.items():
            proc.join(EXIT_GRACE)
            self._receive(rank)
            message = self.last.get(rank)
            if message is None or message[0] != expected or proc.exitcode != 0:
                raise self._failure(rank)
            log.info("rank %d %s at step %d", rank, expected, message[1])

    def _dead_rank(self, wait_s: float) -> int | None:
        """The first rank that ended with a failure (after up to ``wait_s`` for one to end)."""
        if wait_s > 0:
            wait([p.sentinel for p in self.procs.values()], timeout=wait_s)
        for rank, proc in self.procs.items():
            self._receive(rank)
            if wait([proc.sentinel], timeout=0):  # ended: reap it (its sentinel closes before it can be)
                proc.join(EXIT_GRACE)
            if proc.exitcode not in (None, 0) or self.last.get(rank, ("",))[0] == "error":
                return rank
        return None

    def _terminate(self) -> None:
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs.values():
            proc.join(EXIT_GRACE)
            if proc.is_alive():
                log.error("rank process %s ignored SIGTERM: killed", proc.pid)
                proc.kill()
                proc.join()

    def _monitor(self) -> None:
        """On NCCL a dead peer can block a collective until the timeout: abort the group as soon as
        a rank ends while training runs (it never reaps: the job thread does)."""
        import torch.distributed as dist

        sentinels = {p.sentinel: r for r, p in self.procs.items()}
        while not self.closed.is_set():
            ended = wait(list(sentinels), timeout=1.0)
            if ended and not self.closed.is_set():
                log.error("training rank %s ended during training: aborting the group", sentinels[ended[0]])  # type: ignore[index]
                if hasattr(dist.distributed_c10d, "_abort_process_group"):
                    dist.distributed_c10d._abort_process_group()
                return

    def _receive(self, rank: int) -> tuple[Any, ...] | None:
        """The newest message of ``rank``, if one came (kept in ``self.last``)."""
        conn, message = self.conns[rank], None
        try:
            while conn.poll():
                message = self.last[rank] = conn.recv()
        except (EOFError, OSError) as exc:  # the rank's end is closed: it exited
            log.debug("rank %d's pipe is closed (%s)", rank, type(exc).__name__)
        return message

    def _failure(self, rank: int) -> GpuError:
        proc = self.procs[rank]
        proc.join(EXIT_GRACE if not proc.is_alive() else 0)
        last = self.last.get(rank)
        code = proc.exitcode
        if last is not None and last[0] == "error":
            how = f"failed: {last[1]}"
        elif code is not None and code < 0:
            how = f"was killed by {signal.Signals(-code).name} (out of host memory, or killed)"
        elif code is not None:
            how = f"exited with code {code}"
        else:
            how = "stopped answering"
        return GpuError(
            f"train_lora: training rank {rank} of {self.world} (process {proc.pid}) {how} at step {self.step}; "
            "the job failed and every rank was stopped (a stored checkpoint resumes with the same input)"
        )


def _collective_error(exc: RuntimeError) -> bool:
    """A failed or timed-out collective (gloo raises plain RuntimeErrors)."""
    text = str(exc).lower()
    return type(exc).__module__.startswith("torch.distributed") or any(
        word in text for word in ("gloo", "nccl", "timed out", "connection")
    )
