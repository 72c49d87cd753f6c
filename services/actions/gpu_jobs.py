"""``train_lora`` and ``generate``: storage in and out around the GPU runner.

The runner (``services.gpu``) is synchronous and imports torch; it runs in a worker
thread under the GPU lock, so the event loop keeps serving storage jobs meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.actions.captions import auto_caption, record_captions
from services.actions.memory_plan import MemoryPlanResult, dry_run_generate, dry_run_train
from services.actions.results import GenerateResult, LossCurve, StoredSnapshot, TrainLoraResult
from services.durable.checkpoints import CheckpointStore
from services.durable.lease import Lease, worker_name
from services.durable.snapshots import SnapshotStore
from services.durable.training_store import TrainingStorage
from services.errors import CheckpointCorrupt, InputError, ObjectNotFound, OutputBusy, StorageError
from services.gpu.params import GenerateInput, TrainLoraInput
from services.ingest.datasets import fetch_dataset
from services.job.context import JobContext, gpu_lock
from services.output.files import OutputFile
from services.storage.keys import lora_key, lora_sample_grid_key, resolve_lora_key

if TYPE_CHECKING:
    from services.gpu.train.job import Resume
    from services.gpu.types import TrainResult

log = logging.getLogger(__name__)


async def train_lora(request: TrainLoraInput, ctx: JobContext) -> TrainLoraResult | MemoryPlanResult:
    """Train (resuming from a matching checkpoint), store the LoRA under ``loras/<output_name>/``,
    return it with samples, snapshots, metrics, the loss curve and the sample grid (stored beside
    the LoRA); a diverged run raises before anything is stored; the checkpoints go unless
    ``keep_checkpoints``.

    Order: the time check, the lease on ``output_name`` (one writer), the dataset, the checkpoint
    read; then the runner checks the model, exports, precision and decodes the dataset, and only
    then calls :meth:`TrainingStorage.prepare` for the first delete. A job that fails before
    training leaves storage as it found it. ``dry_run``: only the memory plan, before all of it."""
    if request.dry_run:
        return await dry_run_train(request, ctx)
    _check_time_left(ctx)
    lease = Lease(ctx.storage, request.output_name, ctx.job_id, worker_name(), ctx.settings.lease_seconds)
    async with lease.held():
        return await _train(request, ctx, lease)


async def _train(request: TrainLoraInput, ctx: JobContext, lease: Lease) -> TrainLoraResult:
    from services.gpu.train.job import Durable
    from services.gpu.train.job import train_lora as run_training

    checkpoints = CheckpointStore(ctx.storage, request.output_name, max_bytes=ctx.settings.max_checkpoint_bytes)
    snapshots = SnapshotStore(ctx.storage, request.output_name)
    dataset_dir = await fetch_dataset(request, ctx)
    captioned = await auto_caption(request, ctx, dataset_dir)
    resume = await _find_resume(request, ctx, checkpoints)
    out_dir = ctx.workspace / "train"
    out_dir.mkdir()
    storage = TrainingStorage(
        asyncio.get_running_loop(),
        checkpoints,
        snapshots,
        request.keep_last,
        resume.step if resume else 0,
        overwrite=request.overwrite,
        fresh=not request.resume,
    )
    storage.finished_run = await checkpoints.finished() if resume is not None else None
    durable = Durable(storage, resume, ctx.deadline)
    ctx.stage = "downloading the training adapter"
    adapter = await _fetch_lora_file(
        request.training_adapter, request.training_adapter_url, ctx, "training_adapter", "training-adapter"
    )
    async with gpu_lock():
        result = await ctx.in_thread(
            "training",
            run_training,
            request,
            dataset_dir,
            out_dir,
            ctx.settings,
            ctx.progress,
            ctx.stop,
            durable,
            adapter,
        )
    if lease.lost:
        raise OutputBusy(f"{lease.lost}; the trained LoRA of this job was not stored")
    response = await _store_result(request, ctx, result, snapshots)
    response.captions = await record_captions(request, ctx, dataset_dir, captioned)
    await _finish_checkpoints(request, ctx, checkpoints, storage.run, result.metrics.get("steps"))
    return response


async def _store_result(
    request: TrainLoraInput, ctx: JobContext, result: TrainResult, snapshots: SnapshotStore
) -> TrainLoraResult:
    """Store the LoRA (main file, then the copies and the sample grid) and describe the run."""
    ctx.stage = "storing the LoRA"
    key = lora_key(request.output_name)
    await ctx.storage.put_file(key, result.lora_path, content_type="application/octet-stream")
    response = TrainLoraResult(
        lora=OutputFile.from_path(key.rsplit("/", 1)[1], result.lora_path, "application/octet-stream", key=key),
        samples=[OutputFile.from_bytes(s.name, s.data, s.mime) for s in result.samples],
        metrics=result.metrics,
        resumed_from_step=result.resumed_from_step,
        warnings=result.warnings,
        loss_curve=LossCurve(**result.loss_curve),
    )
    response.lora_format = result.lora_format
    for fmt, path in (("kohya", result.kohya_path), ("diffusers", result.diffusers_path)):
        if path is not None:
            copy = lora_key(request.output_name, copy=fmt)
            await ctx.storage.put_file(copy, path, content_type="application/octet-stream")
            stored = OutputFile.from_path(copy.rsplit("/", 1)[1], path, "application/octet-stream", key=copy)
            setattr(response, f"{fmt}_lora", stored)
    if result.sample_grid is not None:
        grid = lora_sample_grid_key(request.output_name)
        await ctx.storage.put_bytes(grid, result.sample_grid.data, content_type=result.sample_grid.mime)
        response.sample_grid = OutputFile.from_bytes(
            grid.rsplit("/", 1)[1], result.sample_grid.data, result.sample_grid.mime, key=grid
        )
    if request.save_every:
        response.snapshots = [
            StoredSnapshot(step=s.step, lora=s.lora.key if s.lora else None, samples=[o.key for o in s.samples])
            for s in await snapshots.current()
        ]
    return response


async def _finish_checkpoints(
    request: TrainLoraInput, ctx: JobContext, checkpoints: CheckpointStore, run: str | None, steps: Any
) -> None:
    """Delete the checkpoints, or (``keep_checkpoints``) mark their run finished, so that the same
    input again is refused instead of quietly retraining from the last checkpoint."""
    if request.keep_checkpoints:
        try:
            if run is not None:
                await checkpoints.mark_finished(run, int(steps or 0))
        except StorageError as exc:  # the LoRA is stored: the job succeeded without the mark
            log.warning("job %s: %s not marked finished (a resend resumes): %s", ctx.key_id, request.output_name, exc)
        return
    ctx.stage = "removing the checkpoints"
    removed = await checkpoints.delete_all()
    if removed.errors:
        log.warning("job %s: checkpoints of %s left: %s", ctx.key_id, request.output_name, removed.errors)


def _check_time_left(ctx: JobContext) -> None:
    """Refuse up front when the job's deadline leaves no time to train before the checkpoint margin."""
    margin = ctx.settings.checkpoint_deadline_margin
    if ctx.deadline is None:
        return
    left = ctx.deadline - time.monotonic()
    if left <= margin:
        raise InputError(
            f"train_lora cannot start: the job has {left:.0f} s left before JOB_TIMEOUT "
            f"({ctx.settings.job_timeout:g} s) and training stops CHECKPOINT_DEADLINE_MARGIN ({margin:g} s) "
            "before it to save a checkpoint; raise JOB_TIMEOUT or lower CHECKPOINT_DEADLINE_MARGIN"
        )


async def _find_resume(request: TrainLoraInput, ctx: JobContext, checkpoints: CheckpointStore) -> Resume | None:
    """Read and download the checkpoint to resume from, if any; nothing is deleted here.

    Refuses a damaged checkpoint: one error naming the LoRA, the step and ``overwrite: true``."""
    from services.gpu.train.job import Resume

    if request.overwrite or not request.resume:
        return None  # the old checkpoints are deleted by TrainingStorage.prepare, after every check
    ctx.stage = "looking for a checkpoint"
    folder = ctx.workspace / "resume"
    try:
        checkpoint = await checkpoints.latest()
        if checkpoint is None:
            return None
        ctx.stage = f"downloading the checkpoint of step {checkpoint.step}"
        await checkpoints.download(checkpoint, folder)
    except CheckpointCorrupt as exc:
        raise InputError(f"input.output_name: {str(exc).replace(str(folder), 'the checkpoint')}") from None
    log.info("job %s: resuming %s from step %d", ctx.key_id, request.output_name, checkpoint.step)
    return Resume(folder, checkpoint.step, checkpoint.config_hash)


async def _fetch_lora(request: GenerateInput, ctx: JobContext) -> Path | None:
    return await _fetch_lora_file(request.lora, request.lora_url, ctx, "lora", "lora")


async def _fetch_lora_file(stored: str | None, url: str | None, ctx: JobContext, field: str, stem: str) -> Path | None:
    """A LoRA given by storage key (or output_name) or URL, downloaded into the workspace."""
    path = ctx.workspace / f"{stem}.safetensors"
    if url:
        from services.ingest.fetch import download

        await download(url, path, ctx.settings, expect="any")
        return path
    if not stored:
        return None
    try:
        key = resolve_lora_key(stored)
    except ValueError as exc:
        raise InputError(f"input.{field}: {exc}") from None
    info = await ctx.storage.head(key)
    if info is None:
        raise InputError(f"input.{field}: no LoRA stored at {key}")
    cap = ctx.settings.max_lora_bytes
    if info.size > cap:
        raise InputError(f"input.{field}: {key} holds {info.size} bytes, more than MAX_LORA_BYTES ({cap})")
    try:
        await ctx.storage.download_file(key, path)
    except ObjectNotFound:
        raise InputError(f"input.{field}: no LoRA stored at {key}") from None
    return path


async def generate(request: GenerateInput, ctx: JobContext) -> GenerateResult | MemoryPlanResult:
    """Generate images (with the job's LoRA, if any); images go through the output policy.
    ``dry_run``: only the memory estimate, before the LoRA download."""
    if request.dry_run:
        return await dry_run_generate(request, ctx)
    from services.gpu.generate.render import generate_images
    from services.gpu.memory.jobs import apply_generate_plan

    # the plan before the download: a job that fits no plan on this card fails at once
    request, plan = await ctx.in_thread("planning memory", apply_generate_plan, request, ctx.settings)
    ctx.stage = "downloading the LoRA"
    lora_path = await _fetch_lora(request, ctx)
    async with gpu_lock():
        result = await ctx.in_thread(
            "generating", generate_images, request, lora_path, ctx.settings, ctx.progress, ctx.stop
        )
    return GenerateResult(
        images=[OutputFile.from_bytes(i.name, i.data, i.mime) for i in result.images],
        seed=result.seed,
        steps=result.steps,
        guidance_scale=result.guidance_scale,
        memory_plan=plan.metrics() if plan is not None else None,
    )
