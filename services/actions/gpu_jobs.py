"""``train_lora`` and ``generate``: storage in and out around the GPU runner.

The runner (``services.gpu``) is synchronous and imports torch; it runs in a worker
thread under the GPU lock, so the event loop keeps serving storage jobs meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from services.actions.results import GenerateResult, LossCurve, StoredSnapshot, TrainLoraResult
from services.durable.checkpoints import CheckpointStore
from services.durable.snapshots import SnapshotStore
from services.durable.training_store import TrainingStorage
from services.errors import CheckpointCorrupt, InputError, ObjectNotFound, StorageError
from services.gpu.params import GenerateInput, TrainLoraInput
from services.ingest.datasets import fetch_dataset
from services.job.context import JobContext, gpu_lock
from services.output.files import OutputFile
from services.storage.base import DeleteResult
from services.storage.keys import lora_key, lora_sample_grid_key, resolve_lora_key

if TYPE_CHECKING:
    from services.gpu.train.job import Resume

log = logging.getLogger(__name__)


async def train_lora(request: TrainLoraInput, ctx: JobContext) -> TrainLoraResult:
    """Train (resuming from a matching checkpoint), store the LoRA under ``loras/<output_name>/``,
    return it with samples, snapshots, metrics, the loss curve and the sample grid (stored beside
    the LoRA); a diverged run raises before anything is stored; the checkpoints go unless ``keep_checkpoints``."""
    from services.gpu.train.job import Durable
    from services.gpu.train.job import train_lora as run_training

    checkpoints = CheckpointStore(ctx.storage, request.output_name)
    snapshots = SnapshotStore(ctx.storage, request.output_name)
    dataset_dir = await fetch_dataset(request, ctx)
    resume = await _prepare_resume(request, ctx, checkpoints, snapshots)
    out_dir = ctx.workspace / "train"
    out_dir.mkdir()
    storage = TrainingStorage(
        asyncio.get_running_loop(), checkpoints, snapshots, request.keep_last, resume.step if resume else 0
    )
    durable = Durable(storage, resume, ctx.deadline)
    async with gpu_lock():
        result = await ctx.in_thread(
            "training", run_training, request, dataset_dir, out_dir, ctx.settings, ctx.progress, ctx.stop, durable
        )
    ctx.stage = "storing the LoRA"
    key = lora_key(request.output_name)
    await ctx.storage.put_file(key, result.lora_path, content_type="application/octet-stream")
    response = TrainLoraResult(
        lora=OutputFile.from_path(key.rsplit("/", 1)[1], result.lora_path, "application/octet-stream", key=key),
        samples=[OutputFile.from_bytes(s.name, s.data, s.mime) for s in result.samples],
        metrics=result.metrics,
        resumed_from_step=result.resumed_from_step,
        loss_curve=LossCurve(**result.loss_curve),
    )
    if result.kohya_path is not None:
        kohya = lora_key(request.output_name, kohya=True)
        await ctx.storage.put_file(kohya, result.kohya_path, content_type="application/octet-stream")
        response.kohya_lora = OutputFile.from_path(
            kohya.rsplit("/", 1)[1], result.kohya_path, "application/octet-stream", key=kohya
        )
    if result.sample_grid is not None:
        grid = lora_sample_grid_key(request.output_name)
        await ctx.storage.put_bytes(grid, result.sample_grid.data, content_type=result.sample_grid.mime)
        response.sample_grid = OutputFile.from_bytes(
            grid.rsplit("/", 1)[1], result.sample_grid.data, result.sample_grid.mime, key=grid
        )
    if request.save_every:
        response.snapshots = [
            StoredSnapshot(step=s.step, lora=s.lora.key if s.lora else None, samples=[o.key for o in s.samples])
            for s in await snapshots.list()
        ]
    if not request.keep_checkpoints:
        ctx.stage = "removing the checkpoints"
        removed = await checkpoints.delete_all()
        if removed.errors:
            log.warning("job %s: checkpoints of %s left: %s", ctx.key_id, request.output_name, removed.errors)
    return response


async def _prepare_resume(
    request: TrainLoraInput, ctx: JobContext, checkpoints: CheckpointStore, snapshots: SnapshotStore
) -> Resume | None:
    """Apply ``overwrite`` / ``resume`` and download the checkpoint to resume from, if any."""
    from services.gpu.train.job import Resume

    if request.overwrite or not request.resume:
        ctx.stage = "removing old checkpoints"
        removed = await checkpoints.delete_all()
        if request.overwrite:
            pruned = await snapshots.prune(0)
            removed = DeleteResult(removed.deleted + pruned.deleted, removed.errors + pruned.errors)
        if removed.errors:
            raise StorageError(f"could not remove the old checkpoints of {request.output_name}: {removed.errors[:3]}")
        return None
    ctx.stage = "looking for a checkpoint"
    try:
        checkpoint = await checkpoints.latest()
        if checkpoint is None:
            return None
        ctx.stage = f"downloading the checkpoint of step {checkpoint.step}"
        folder = ctx.workspace / "resume"
        await checkpoints.download(checkpoint, folder)
    except CheckpointCorrupt as exc:
        raise InputError(f"input.output_name: {exc}; send overwrite: true to start over") from exc
    log.info("job %s: resuming %s from step %d", ctx.key_id, request.output_name, checkpoint.step)
    return Resume(folder, checkpoint.step, checkpoint.config_hash)


async def _fetch_lora(request: GenerateInput, ctx: JobContext) -> Path | None:
    path = ctx.workspace / "lora.safetensors"
    if request.lora_url:
        from services.ingest.fetch import download

        await download(request.lora_url, path, ctx.settings, expect="any")
        return path
    if not request.lora:
        return None
    try:
        key = resolve_lora_key(request.lora)
    except ValueError as exc:
        raise InputError(f"input.lora: {exc}") from None
    try:
        await ctx.storage.download_file(key, path)
    except ObjectNotFound:
        raise InputError(f"input.lora: no LoRA stored at {key}") from None
    return path


async def generate(request: GenerateInput, ctx: JobContext) -> GenerateResult:
    """Generate images (with the job's LoRA, if any); images go through the output policy."""
    from services.gpu.generate.render import generate_images

    ctx.stage = "downloading the LoRA"
    lora_path = await _fetch_lora(request, ctx)
    async with gpu_lock():
        result = await ctx.in_thread(
            "generating", generate_images, request, lora_path, ctx.settings, ctx.progress, ctx.stop
        )
    return GenerateResult(
        images=[OutputFile.from_bytes(i.name, i.data, i.mime) for i in result.images],
        seed=result.seed,
    )
