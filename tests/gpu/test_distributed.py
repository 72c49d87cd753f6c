"""Data-parallel training on the CPU: two gloo ranks (``TRAIN_CPU_RANKS=2``) of the tiny SD model.

What holds with two ranks: the LoRA of a 2-rank run with per-rank batch b equals a 1-process run
with batch 2b over the same order (within float rounding); a stop reaches both ranks at the same
step and leaves one checkpoint; resuming with the same world size is bit for bit, another world
size is refused by name; a killed rank fails the job naming it and leaves no process behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_jobs
from tests.gpu.conftest import gpu_settings, write_dataset
from tests.gpu.test_durable import lora_tensors, pointer, same_tensors, storage_dir, train_job

pytestmark = pytest.mark.gpu

__all__ = ["storage_dir"]  # the fixture, used by the job tests here

TOLERANCE = 1e-5  # float rounding of batch 2b against two batches of b, summed; weights are about 1


def spawned_children() -> list[int]:
    """Processes of this test process started by the spawn context (the training ranks)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        info = _stat_and_cmdline(entry)
        if info is None:  # it exited while listed
            continue
        stat, cmdline = info
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == os.getpid() and b"multiprocessing" in cmdline and b"spawn" in cmdline:
            found.append(int(entry.name))
    return found


def _stat_and_cmdline(entry: Path) -> tuple[str, bytes] | None:
    """A process's ``stat`` and ``cmdline``; None when it is gone."""
    try:
        return (entry / "stat").read_text(), (entry / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None


def _train(tmp_path: Path, name: str, ranks: int, batch: int) -> Any:
    from services.gpu.params import TrainLoraInput
    from services.gpu.train.job import train_lora

    params = TrainLoraInput(
        action="train_lora", dataset="d", output_name=name, steps=4, rank=2, learning_rate=3e-3, batch_size=batch
    )
    work = tmp_path / name
    work.mkdir()
    return train_lora(params, write_dataset(tmp_path / "data"), work, gpu_settings(train_cpu_ranks=ranks))


def test_two_ranks_train_the_lora_of_one_process_with_twice_the_batch(tmp_path: Path) -> None:
    """Catches each rank training on the whole batch (not its rows), its own noise stream, a
    gradient or loss summed instead of averaged, or a plan drawn with the per-rank batch."""
    from safetensors.torch import load_file

    two = _train(tmp_path, "two", ranks=2, batch=1)
    one = _train(tmp_path, "one", ranks=1, batch=2)
    assert two.metrics["world_size"] == 2 and two.metrics["global_batch_size"] == 2, two.metrics
    assert one.metrics["world_size"] == 1
    assert two.metrics["final_loss"] == pytest.approx(one.metrics["final_loss"], abs=TOLERANCE)
    a, b = load_file(str(two.lora_path)), load_file(str(one.lora_path))
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < TOLERANCE
    assert spawned_children() == []


def test_stop_checkpoint_and_resume_on_two_ranks(
    storage_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The deadline comes at the third step: rank 0 decides, both ranks stop at that step, one
    checkpoint is stored; resuming on one rank is refused naming the world size; on two it ends
    on the uninterrupted run's tensors bit for bit. Catches a stop rank 0 does not share (rank 1
    would train on and the job hang or fail), a checkpoint that misses rank 1's state, and a world
    size left out of the resume config."""
    import time

    from services.gpu.train import durable

    monkeypatch.setenv("TRAIN_CPU_RANKS", "2")
    monkeypatch.setenv("JOB_TIMEOUT", "3300")
    monkeypatch.setenv("CHECKPOINT_DEADLINE_MARGIN", "600")
    (ref,) = run_jobs(train_job("ref"))
    assert ref["metrics"]["world_size"] == 2, ref

    calls = []

    def clock() -> float:  # the Durability's start, then one call per step: late from step 2 on
        calls.append(1)
        return time.monotonic() + (3000 if len(calls) >= 4 else 0)

    monkeypatch.setattr(durable, "monotonic", clock)
    job = train_job("late", checkpoint_every=100)
    with caplog.at_level(logging.INFO, logger="services.gpu.train.distributed.group"):
        (stopped,) = run_jobs(job)
    assert stopped["error"].startswith("[resumable] train_lora at step 2 of 6: stopped (deadline)"), stopped
    assert "rank 1 stopped at step 2" in caplog.text
    steps = sorted(p.name for p in (storage_dir / "loras" / "late" / "checkpoints").iterdir() if p.is_dir())
    assert steps == ["step-00000002"], steps  # one checkpoint: the stop's
    assert json.loads(pointer(storage_dir, "late").read_bytes())["step"] == 2
    monkeypatch.setattr(durable, "monotonic", time.monotonic)

    (refused,) = run_jobs(train_job("late", checkpoint_every=100, gpus=1))
    assert "trained on 2 GPU(s)" in refused["error"] and "this job runs on 1" in refused["error"], refused
    (resumed,) = run_jobs(job)
    assert resumed["resumed_from_step"] == 2 and resumed["metrics"]["world_size"] == 2, resumed
    assert same_tensors(lora_tensors(storage_dir, "late"), lora_tensors(storage_dir, "ref"))
    assert spawned_children() == []


def test_a_killed_rank_fails_the_job_naming_it(storage_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1 is killed (SIGKILL) once training runs: the job fails naming rank 1 and the signal
    long before its 400 steps, and no rank process is left. Catches a hang on the dead peer, an
    error that does not say which rank died, and a surviving process."""
    from rp_handler import handler
    from services.storage import close_storages

    monkeypatch.setenv("TRAIN_CPU_RANKS", "2")
    first = pointer(storage_dir, "killed")

    async def main() -> dict[str, Any]:
        task = asyncio.ensure_future(handler(train_job("killed", checkpoint_every=1, steps=400)))
        try:
            while not first.exists():
                assert not task.done(), task.result()
                await asyncio.sleep(0.05)
            (child,) = spawned_children()
            os.kill(child, signal.SIGKILL)
            return await task
        finally:
            await close_storages()

    result = asyncio.run(main())
    assert "training rank 1 of 2" in result["error"] and "SIGKILL" in result["error"], result
    assert "at step 400" not in result["error"]
    assert not (storage_dir / "loras" / "killed" / "killed.safetensors").exists()
    assert spawned_children() == []


def test_cancel_stops_both_ranks_and_leaves_no_process(storage_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cancelled 2-rank job (the stop signal, as SIGTERM sets it) stops with a checkpoint and no
    rank process left. Catches rank 1 left training (or waiting) after rank 0 stopped."""
    from rp_handler import handler
    from services.storage import close_storages

    monkeypatch.setenv("TRAIN_CPU_RANKS", "2")
    first = pointer(storage_dir, "cancelled")

    async def main() -> None:
        task = asyncio.ensure_future(handler(train_job("cancelled", checkpoint_every=1, steps=400)))
        try:
            while not first.exists():
                assert not task.done(), task.result()
                await asyncio.sleep(0.05)
            assert len(spawned_children()) == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await close_storages()

    asyncio.run(main())
    assert 1 <= json.loads(first.read_bytes())["step"] < 400
    assert spawned_children() == []


def test_gpus_above_the_worker_refused() -> None:
    """Catches a ``gpus`` input silently trained on fewer ranks than asked."""
    import torch

    from services.errors import InputError
    from services.gpu.train.world import resolve_world_size

    settings = gpu_settings(train_cpu_ranks=2)
    assert resolve_world_size(None, torch.device("cpu"), settings) == 2
    assert resolve_world_size(1, torch.device("cpu"), settings) == 1
    with pytest.raises(InputError, match=r"input\.gpus: 3 asked, this worker has TRAIN_CPU_RANKS=2"):
        resolve_world_size(3, torch.device("cpu"), settings)
