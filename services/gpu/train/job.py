"""The ``train_lora`` job runner: dataset check, buckets, training, LoRA files, samples, metrics.

``train_lora`` is synchronous; the caller runs it in a worker thread under the GPU lock. The
order of work is: validate the dataset (no model loaded yet), load the cached pipeline and its
model family, put every image in its aspect-ratio bucket at each training resolution, train
(:mod:`services.gpu.train.trainer`), save the LoRA in each ``export_formats`` entry (the
family's default when none is given; the first is the main file), render the
sample prompts through the generation path with the saved file, and report: metrics, the loss
curve and, with ``save_every`` and ``sample_prompts``, a grid of the samples by step
(:mod:`services.gpu.train.grid`). A run whose loss or weights stop being finite raises
:class:`~services.errors.TrainingDiverged` before anything of that state is written.

Durability (with a :class:`Durable`, which the ``train_lora`` action passes): the run resumes
from a downloaded checkpoint when its training config hash (:func:`config_hash_of`) matches,
saves checkpoints and snapshots along the way and stops before the job's deadline
(:mod:`services.gpu.train.durable`).

The three parts: :func:`~services.gpu.train.setup.prepare_run` (every check, before the first
delete), :func:`_train` (trainer, steps, LoRA files) and :func:`_finish` (samples, grid, metrics).
When training compiles: :mod:`services.gpu.train.compile_policy`.
"""

from __future__ import annotations

import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.durable.manifest import corrupt
from services.errors import CheckpointCorrupt, InputError
from services.gpu.adapters import fused_lora
from services.gpu.encode import encode_image
from services.gpu.families import ModelFamily
from services.gpu.generate.render import GenerationRequest, render
from services.gpu.guard import gpu_errors
from services.gpu.lora_files import DIFFUSERS, KOHYA, save_lora
from services.gpu.state import RUNNER_STATE
from services.gpu.train.compile_policy import remember_warm
from services.gpu.train.distributed.group import rank_group
from services.gpu.train.durable import Durability
from services.gpu.train.grid import SampleGrid
from services.gpu.train.loop import Progress, ProgressReporter, run_steps
from services.gpu.train.lora_output import check_saved_weights, export_lora_files
from services.gpu.train.setup import PreparedRun, prepare_run
from services.gpu.train.trainer import LoraTrainer, TrainConfig
from services.gpu.train.world import refuse_other_world_size
from services.gpu.types import ImageFile, TrainResult

if TYPE_CHECKING:
    import torch

    from config.settings import Settings
    from services.durable.training_store import TrainingStorage
    from services.gpu.models import LoadedPipeline
    from services.gpu.params import TrainLoraInput
    from services.job.stop import StopSignal

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Resume:
    """A checkpoint downloaded into ``folder``: its step and training config hash."""

    folder: Path
    step: int
    config_hash: str


@dataclass(frozen=True)
class Durable:
    """Where checkpoints and snapshots go, what to resume from, and when the job must end."""

    storage: TrainingStorage
    resume: Resume | None = None
    deadline: float | None = None  # time.monotonic() seconds; the run stops a margin before it


@dataclass
class _Trained:
    """What :func:`_train` hands to :func:`_finish`."""

    files: dict[str, Path]
    stats: Any
    setup_seconds: float
    buckets: dict[str, int]
    start: int
    curve: dict[str, Any]
    grid: SampleGrid | None
    warnings: list[str]


def train_lora(
    params: TrainLoraInput,
    dataset_dir: Path,
    work_dir: Path,
    settings: Settings,
    progress: Progress | None = None,
    stop: StopSignal | None = None,
    durable: Durable | None = None,
    training_adapter: Path | None = None,
) -> TrainResult:
    """Train a LoRA on the images in ``dataset_dir``; files go to ``work_dir``. Sync.

    ``progress(update, final=False)`` receives training progress (the last with final=True);
    ``stop`` is checked between optimizer steps and sample images (:class:`JobStopped`).
    ``training_adapter`` (a LoRA file) is merged into the base while training.
    """
    with gpu_errors("train_lora"):
        run = prepare_run(params, dataset_dir, settings, training_adapter)
        resume = durable.resume if durable is not None else None
        if resume is not None and resume.config_hash != run.config_hash:
            refuse_other_world_size(run.config_fields, resume.config_hash, resume.step, params.output_name)
            raise InputError(
                f"input.output_name: {params.output_name} has a checkpoint at step {resume.step} of another "
                "training config; send overwrite: true to start over (or resume: false)"
            )
        if durable is not None:
            durable.storage.prepare(run.config_hash)  # every check above passed: the first delete may run
        trained = _train(run, work_dir, settings, progress, stop, durable, training_adapter, dataset_dir)
        return _finish(run, trained, stop)


def _train(
    run: PreparedRun,
    work_dir: Path,
    settings: Settings,
    progress: Progress | None,
    stop: StopSignal | None,
    durable: Durable | None,
    training_adapter: Path | None,
    dataset_dir: Path,
) -> _Trained:
    """Set up the trainer (resuming a checkpoint), run the steps under the durability hook and
    write the LoRA files; the trainer and the training adapter are released whatever happens.
    With ``cfg.world_size`` > 1 the other ranks train beside it (:mod:`services.gpu.train.distributed`)."""
    setup_started = time.perf_counter()
    if run.device.type == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats(run.device)
    params, cfg = run.params, run.cfg
    warnings = distilled_warnings(run.entry, run.family, run.model, training_adapter)
    adapter = ExitStack()
    merge_training_adapter(adapter, run.entry, training_adapter)
    trainer = LoraTrainer(run.entry, cfg)
    resume = durable.resume if durable is not None else None
    try:
        with rank_group(run, dataset_dir, settings, training_adapter, resume and resume.folder) as ranks:
            trainer.setup(run.images, run.captions, stop)
            start, ema = _resume(trainer, resume, params.output_name) if resume is not None else (0, None)
            ranks.join(trainer, stop)
            setup_seconds = time.perf_counter() - setup_started
            reporter = ProgressReporter(progress, cfg.steps, start_step=start)
            grid = SampleGrid(len(params.sample_prompts), run.resolutions[0]) if params.sample_prompts else None
            hook = ranks.hook(_durability(run, trainer, work_dir, settings, stop, durable, reporter, start, grid))
            try:
                stats = run_steps(trainer, reporter, stop, start_step=start, ema=ema, before_step=hook)
            finally:
                if durable is not None:
                    durable.storage.wait()
            ranks.finish(trainer)
        trainer.check_finite(cfg.steps)
        main = work_dir / f"{params.output_name}.safetensors"
        files = export_lora_files(run.entry, trainer, run.formats, main, run.metadata, run.lora_dtype)
        for path in files.values():
            check_saved_weights(path, cfg.steps, cfg)
        curve = trainer.losses.curve() if trainer.losses is not None else {}
        return _Trained(files, stats, setup_seconds, trainer.plan.counts, start, curve, grid, warnings)
    finally:
        _close(trainer, adapter)


def _durability(
    run: PreparedRun,
    trainer: LoraTrainer,
    work_dir: Path,
    settings: Settings,
    stop: StopSignal | None,
    durable: Durable | None,
    reporter: ProgressReporter,
    start: int,
    grid: SampleGrid | None,
) -> Durability:
    """The hook run before every optimizer step: checkpoints, snapshots (into ``grid``), stops."""

    def snapshot(step: int) -> None:
        assert durable is not None
        rendered = _snapshot(
            run.entry,
            trainer,
            run.params,
            run.resolutions[0],
            work_dir,
            step,
            run.metadata,
            run.lora_dtype,
            durable,
            run.formats[0],
        )
        if grid is not None:
            grid.add(step, rendered)

    return Durability(
        trainer,
        durable.storage if durable is not None else None,
        run.config_hash,
        work_dir,
        every=run.params.checkpoint_every or settings.checkpoint_every,
        minutes=settings.checkpoint_minutes,
        start_step=start,
        save_every=run.params.save_every,
        snapshot=snapshot if durable is not None else None,
        stop=stop,
        deadline=durable.deadline if durable is not None else None,
        margin=settings.checkpoint_deadline_margin,
        reporter=reporter,
    )


def _finish(run: PreparedRun, trained: _Trained, stop: StopSignal | None) -> TrainResult:
    """Render the samples from the saved file, the grid and the metrics; remember a warm compile."""
    params, cfg = run.params, run.cfg
    main = trained.files[run.formats[0]]
    samples = _samples(run.entry, params, run.resolutions[0], main, stop)
    grid = trained.grid.render(cfg.steps, samples) if trained.grid is not None and params.save_every else None
    metrics = _metrics(
        cfg,
        trained.stats,
        trained.setup_seconds,
        run.started,
        run.device,
        len(run.examples),
        trained.buckets,
        params.quantize_base,
    )
    metrics["cpu_offload"] = bool(params.cpu_offload)
    metrics["memory_plan"] = run.memory_plan.metrics() if run.memory_plan is not None else None
    if cfg.compile:
        warmup = trained.stats.first_step_seconds
        RUNNER_STATE.record_warmup(f"train {run.model} {run.resolutions[0]}px b{cfg.batch_size}", warmup)
        remember_warm(cfg.compile_key, warmup, run.cache)
    log.info("trained %s: %s", params.output_name, metrics)
    return TrainResult(
        lora_path=main,
        kohya_path=trained.files.get(KOHYA) if run.formats[0] != KOHYA else None,
        diffusers_path=trained.files.get(DIFFUSERS) if run.formats[0] != DIFFUSERS else None,
        lora_format=run.formats[0],
        samples=samples,
        metrics=metrics,
        resumed_from_step=trained.start,
        warnings=trained.warnings,
        loss_curve=trained.curve,
        sample_grid=grid,
    )


def merge_training_adapter(stack: ExitStack, entry: LoadedPipeline, path: Path | None) -> None:
    """Merge the ``training_adapter`` LoRA into the base weights until ``stack`` closes (the
    weights are then restored bit for bit, so the saved LoRA and the samples are without it)."""
    if path is None:
        return
    try:
        stack.enter_context(fused_lora(entry, path, 1.0))
    except InputError as exc:
        raise InputError(str(exc).replace("input.lora:", "input.training_adapter:", 1)) from exc
    log.info("training adapter %s merged into %s for training", path.name, entry.key)


def distilled_warnings(entry: LoadedPipeline, family: ModelFamily, model: str, adapter: Path | None) -> list[str]:
    """A warning when the base is distilled (schnell, Turbo) and no training adapter is merged."""
    variant = family.variant(entry.pipe, model)
    if not variant.distilled or adapter is not None:
        return []
    return [f"{variant.distilled}; pass a de-distillation training_adapter (or train on the undistilled model)"]


def _close(trainer: LoraTrainer, adapter: ExitStack) -> None:
    try:
        trainer.close()
    finally:
        adapter.close()


def _resume(trainer: LoraTrainer, resume: Resume, output_name: str) -> tuple[int, torch.Tensor | None]:
    """Restore the downloaded checkpoint; any damage is the one corrupt-checkpoint error (no worker path)."""
    try:
        start, ema = trainer.resume(resume.folder)
    except (CheckpointCorrupt, AttributeError, TypeError, KeyError) as exc:  # the last three: an edited data order
        detail = str(exc).replace(str(resume.folder), "the checkpoint")
        raise InputError(f"input.output_name: {corrupt(output_name, resume.step, detail)}") from None
    if start != resume.step or not 0 < start <= trainer.cfg.steps:
        detail = f"its trainer state is at step {start}, the pointer at {resume.step}, the job has {trainer.cfg.steps}"
        raise InputError(f"input.output_name: {corrupt(output_name, resume.step, detail)}")
    return start, ema


def _snapshot(
    entry: LoadedPipeline,
    trainer: LoraTrainer,
    params: TrainLoraInput,
    resolution: int,
    work_dir: Path,
    step: int,
    metadata: dict[str, str],
    dtype: torch.dtype,
    durable: Durable,
    fmt: str,
) -> list[ImageFile]:
    """Write the LoRA of ``step`` and its sample images (rendered with the training adapter, on
    their own RNG: training's stays untouched) and hand them to storage; returns the samples."""
    folder = work_dir / f"snapshot-{step}"
    folder.mkdir()
    images: list[ImageFile] = []
    try:
        layers, config = trainer.lora_state_dict(), trainer.adapter_config()
        lora = save_lora(entry, layers, config, folder / "lora.safetensors", metadata, dtype, fmt)
        check_saved_weights(lora, step, trainer.cfg)
        paths = []
        if params.sample_prompts:
            with trainer.sampling():
                images = _samples(entry, params, resolution, None, None)
            for image in images:
                path = folder / image.name
                path.write_bytes(image.data)
                paths.append(path)
        durable.storage.save_snapshot(step, lora, paths)
    finally:
        durable.storage.discard(folder)
    return images


def _samples(
    entry: LoadedPipeline, params: TrainLoraInput, resolution: int, lora_path: Path, stop: StopSignal | None
) -> list[ImageFile]:
    """Sample prompts rendered from the saved file (the same path as ``generate``)."""
    files = []
    for i, prompt in enumerate(params.sample_prompts):
        request = GenerationRequest(
            prompt=prompt, width=resolution, height=resolution, seed=params.seed + i, steps=params.sample_steps
        )
        (image,) = render(entry, request, lora_path, compile=False, stop=stop)
        files.append(encode_image(image, f"sample-{i}", "png"))
    return files


def _metrics(
    cfg: TrainConfig,
    stats: Any,
    setup_seconds: float,
    started: float,
    device: torch.device,
    images: int,
    buckets: dict[str, int],
    quantized: str,
) -> dict[str, Any]:
    """The run's numbers for the result (seconds, speed, buckets, the resolved settings, peak memory)."""
    metrics: dict[str, Any] = {
        "steps": cfg.steps,
        "resumed_from_step": stats.start_step,
        "final_loss": None if stats.final_loss is None else round(stats.final_loss, 6),
        "seconds": round(time.perf_counter() - started, 3),
        "train_seconds": round(stats.seconds, 3),
        "setup_seconds": round(setup_seconds, 3),
        "steps_per_second": round(stats.steps / stats.seconds, 3) if stats.seconds > 0 else None,
        "images": images,
        "resolution": list(cfg.resolutions),
        "buckets": buckets,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "learning_rate": cfg.learning_rate,
        "batch_size": cfg.batch_size,
        "world_size": cfg.world_size,
        "global_batch_size": cfg.batch_size * cfg.world_size * cfg.gradient_accumulation,
        "precision": cfg.precision,
        "lora_targets": list(cfg.targets),
        "timestep_sampling": cfg.timestep_sampling,
        "gradient_checkpointing": cfg.gradient_checkpointing,
        "device": device.type,
        "compiled": cfg.compile,
        "quantized_base": quantized,
    }
    if cfg.compile:
        metrics["compile_warmup_seconds"] = round(stats.first_step_seconds, 3)
    if device.type == "cuda":
        import torch

        metrics["peak_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    return metrics
