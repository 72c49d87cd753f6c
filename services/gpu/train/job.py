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

Compilation: with ``COMPILE`` unset, training compiles on a GPU only when the job is long
enough to earn the warm-up back (``TRAIN_COMPILE_MIN_STEPS``; fewer when an earlier worker
left the inductor cache warm on the network volume); ``COMPILE=true`` always compiles and
``COMPILE=false`` never does.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.durable.manifest import corrupt, dataset_digest, training_config_hash
from services.errors import CheckpointCorrupt, InputError
from services.gpu import SOFTWARE_NAME, SOFTWARE_VERSION, models
from services.gpu.adapters import fused_lora
from services.gpu.catalog import BUILTIN_MODELS, DEFAULT_TINY_TRAIN_STEPS, check_pixels
from services.gpu.encode import encode_image
from services.gpu.families import ModelFamily, trainable
from services.gpu.families.base import TINY_NATIVE_LIMIT
from services.gpu.generate.render import GenerationRequest, render
from services.gpu.guard import gpu_errors
from services.gpu.lora_files import DIFFUSERS, KOHYA, save_lora
from services.gpu.memory.jobs import apply_train_plan
from services.gpu.state import RUNNER_STATE
from services.gpu.train.buckets import bucket_sizes, nearest_bucket
from services.gpu.train.dataset import Example, fit, load_rgb, scan_dataset
from services.gpu.train.durable import Durability
from services.gpu.train.grid import SampleGrid
from services.gpu.train.trainer import (
    LoraTrainer,
    Precision,
    Progress,
    ProgressReporter,
    TrainConfig,
    diverged,
    run_steps,
    torch_dtype,
)
from services.gpu.types import ImageFile, TrainResult
from services.storage.hashing import file_sha256

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from config.settings import Settings
    from services.durable.training_store import TrainingStorage
    from services.gpu.models import LoadedPipeline
    from services.gpu.params import TrainLoraInput
    from services.job.stop import StopSignal

log = logging.getLogger(__name__)

# Measured on an H200 (REFERENCE.md): compile saves ~0.066 s/step at SD1.5 512 px batch 4
# after a ~156 s cold warm-up, so it pays from ~2400 steps; with a warm cache far sooner.
TRAIN_COMPILE_MIN_STEPS = 2500
TRAIN_COMPILE_MIN_STEPS_WARM = 1000
_MARKERS = "runpod-lora-worker"


def default_steps(model: str, family: ModelFamily, max_steps: int) -> int:
    """The family's default (100 on the builtin tiny models), within ``MAX_TRAIN_STEPS``."""
    default = DEFAULT_TINY_TRAIN_STEPS if model in BUILTIN_MODELS else family.defaults.steps
    return min(default, max_steps)


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """``auto`` is bf16 on CUDA and fp32 on the CPU; fp16 needs CUDA."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise InputError("input.mixed_precision: fp16 needs a CUDA GPU; use auto, no or bf16")
    return {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[requested]


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


def _marker(cfg_key: str, cache: Path | None) -> Path | None:
    if cache is None:
        return None
    digest = hashlib.sha256(cfg_key.encode()).hexdigest()[:16]
    return cache / _MARKERS / f"train-{digest}.json"


def should_compile(setting: bool | None, device: torch.device, steps: int, cfg_key: str, cache: Path | None) -> bool:
    """The training compile policy (see the module docstring); ``cache`` is the inductor cache."""
    if setting is not None:
        return setting
    if device.type != "cuda":
        return False
    marker = _marker(cfg_key, cache)
    warm = marker is not None and marker.is_file()
    return steps >= (TRAIN_COMPILE_MIN_STEPS_WARM if warm else TRAIN_COMPILE_MIN_STEPS)


def _remember_warm(cfg_key: str, warmup: float, cache: Path | None) -> None:
    marker = _marker(cfg_key, cache)
    if marker is None:
        return
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"key": cfg_key, "warmup_seconds": round(warmup, 1)}), encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the compile marker %s: %s", marker, exc)


def lora_metadata(
    entry: LoadedPipeline, cfg: TrainConfig, output_name: str, trigger_word: str | None, images: int
) -> dict[str, str]:
    """Header metadata: the worker's own keys, the family's, and kohya's ``ss_*`` keys that UIs
    display. ``alpha`` is the trained one; the weights have it folded in (the file's alpha is the rank).
    Each file adds its format's keys (``lora_format``; ``ss_network_module`` on kohya files only)."""
    import diffusers
    import peft
    import torch

    family = trainable(entry.family, entry.pipe)
    sides = ",".join(str(r) for r in cfg.resolutions)
    return {
        "base_model": entry.key.model,
        "quantized_base": "nf4" if entry.quantized else "none",
        **family.file_metadata(entry.pipe),
        "rank": str(cfg.rank),
        "alpha": f"{cfg.alpha:g}",
        "alpha_folded_into_weights": "true",
        "lora_targets": ",".join(cfg.targets),
        "steps": str(cfg.steps),
        "trigger_word": trigger_word or "",
        "resolution": sides,
        "learning_rate": f"{cfg.learning_rate:g}",
        "batch_size": str(cfg.batch_size),
        "images": str(images),
        "software": f"{SOFTWARE_NAME} {SOFTWARE_VERSION}",
        "software_version": SOFTWARE_VERSION,
        "libraries": f"diffusers {diffusers.__version__}; peft {peft.__version__}; torch {torch.__version__}",
        "ss_network_dim": str(cfg.rank),
        "ss_network_alpha": str(cfg.rank),
        "ss_output_name": output_name,
        "ss_max_train_steps": str(cfg.steps),
        "ss_resolution": f"({cfg.resolutions[0]}, {cfg.resolutions[0]})",
        "ss_num_train_images": str(images),
        "ss_learning_rate": f"{cfg.learning_rate:g}",
    }


def bucketed_images(
    paths: list[Path], resolutions: list[int], step: int, max_pixels: int
) -> tuple[list[Image.Image], list[int]]:
    """Every image at each resolution, resized to its bucket; with the source index of each."""
    images: list[Image.Image] = []
    sources: list[int] = []
    originals = [load_rgb(path) for path in paths]
    for side in resolutions:
        sizes = bucket_sizes(side, step)
        for index, image in enumerate(originals):
            size = nearest_bucket(*image.size, sizes)
            check_pixels(*size, max_pixels)
            images.append(fit(image, size))
            sources.append(index)
    return images, sources


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


def config_hash_of(
    cfg: TrainConfig, model: str, examples: list[Example], root: Path, adapter: Path | None = None
) -> str:
    """The hash a checkpoint must match to be resumed (see ``TRAINING_HASH_FIELDS``)."""
    adapter_digest = None if adapter is None else file_sha256(adapter)
    digest = dataset_digest((e.path.relative_to(root).as_posix(), file_sha256(e.path), e.caption) for e in examples)
    return training_config_hash(
        {
            "base_model": model,
            "dataset": digest,
            "steps": cfg.steps,
            "rank": cfg.rank,
            "alpha": cfg.alpha,
            "learning_rate": cfg.learning_rate,
            "resolution": list(cfg.resolutions),
            "batch_size": cfg.batch_size,
            "gradient_accumulation": cfg.gradient_accumulation,
            "seed": cfg.seed,
            "precision": cfg.precision,
            "cache_latents": cfg.cache_latents,
            "cache_text_embeddings": cfg.cache_text_embeddings,
            "lora_targets": list(cfg.targets),
            "timestep_sampling": cfg.timestep_sampling,
            "training_adapter": adapter_digest,
            **{k: getattr(cfg, k) for k in ("caption_dropout", "shuffle_caption", "keep_tokens")},
        }
    )


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
    started = time.perf_counter()
    examples = scan_dataset(
        dataset_dir, params.caption, params.trigger_word, settings.max_image_pixels, settings.max_caption_chars
    )
    model = params.base_model or settings.model_id
    params, memory_plan = apply_train_plan(params, settings, len(examples))  # explicit inputs win
    with gpu_errors("train_lora"):
        hint = models.peek_family(model, settings)
        if hint is not None:
            hint.check_precision(params.mixed_precision)  # before loading, and before the CUDA check
        device = models.runtime_device()
        precision = resolve_precision(params.mixed_precision, device)
        quantize = params.quantize_base == "nf4"
        entry = models.load_pipeline(model, settings, torch_dtype(precision), device, quantize=quantize)
        family = trainable(entry.family, entry.pipe)
        family.check_precision(precision)
        formats = export_formats(params, family)
        resolutions = params.resolutions() or [entry.native_size]
        images, sources = bucketed_images(
            [e.path for e in examples], resolutions, family.bucket_step(entry.pipe), settings.max_image_pixels
        )
        captions = [examples[i].caption for i in sources]
        cache = models.compile_cache_dir(settings)
        cfg = _train_config(params, model, entry, settings, precision, resolutions, device, cache)
        lora_path = work_dir / f"{params.output_name}.safetensors"
        metadata = lora_metadata(entry, cfg, params.output_name, params.trigger_word, len(examples))
        setup_started = time.perf_counter()
        if device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(device)
        config_hash = config_hash_of(cfg, model, examples, dataset_dir, training_adapter)
        resume = durable.resume if durable is not None else None
        if resume is not None and resume.config_hash != config_hash:
            raise InputError(
                f"input.output_name: {params.output_name} has a checkpoint at step {resume.step} of another "
                "training config; send overwrite: true to start over (or resume: false)"
            )
        if durable is not None:
            durable.storage.prepare(config_hash)  # every check above passed: the first delete may run
        lora_dtype = torch_dtype("fp32" if precision == "fp32" else "fp16")
        warnings = distilled_warnings(entry, family, model, training_adapter)
        adapter = ExitStack()
        merge_training_adapter(adapter, entry, training_adapter)
        trainer = LoraTrainer(entry, cfg)
        try:
            trainer.setup(images, captions, stop)
            start, ema = _resume(trainer, resume, params.output_name) if resume is not None else (0, None)
            buckets = trainer.plan.counts
            setup_seconds = time.perf_counter() - setup_started
            reporter = ProgressReporter(progress, cfg.steps, start_step=start)
            grid = SampleGrid(len(params.sample_prompts), resolutions[0]) if params.sample_prompts else None

            def snapshot(step: int) -> None:
                assert durable is not None
                rendered = _snapshot(
                    entry, trainer, params, resolutions[0], work_dir, step, metadata, lora_dtype, durable
                )
                if grid is not None:
                    grid.add(step, rendered)

            hook = Durability(
                trainer,
                durable.storage if durable is not None else None,
                config_hash,
                work_dir,
                every=params.checkpoint_every or settings.checkpoint_every,
                minutes=settings.checkpoint_minutes,
                start_step=start,
                save_every=params.save_every,
                snapshot=snapshot if durable is not None else None,
                stop=stop,
                deadline=durable.deadline if durable is not None else None,
                margin=settings.checkpoint_deadline_margin,
                reporter=reporter,
            )
            try:
                stats = run_steps(trainer, reporter, stop, start_step=start, ema=ema, before_step=hook)
            finally:
                if durable is not None:
                    durable.storage.wait()
            trainer.check_finite(cfg.steps)
            files = _export(entry, trainer, formats, lora_path, metadata, lora_dtype)
            for path in files.values():
                check_saved_weights(path, cfg.steps, cfg)
            curve = trainer.losses.curve() if trainer.losses is not None else {}
        finally:
            _close(trainer, adapter)
        samples = _samples(entry, params, resolutions[0], lora_path, stop)
        sample_grid = grid.render(cfg.steps, samples) if grid is not None and params.save_every else None
        metrics = _metrics(cfg, stats, setup_seconds, started, device, len(examples), buckets, params.quantize_base)
        metrics["memory_plan"] = memory_plan.metrics() if memory_plan is not None else None
    if cfg.compile:
        RUNNER_STATE.record_warmup(f"train {model} {resolutions[0]}px b{cfg.batch_size}", stats.first_step_seconds)
        _remember_warm(cfg.compile_key, stats.first_step_seconds, cache)
    log.info("trained %s: %s", params.output_name, metrics)
    return TrainResult(
        lora_path=lora_path,
        kohya_path=files.get(KOHYA) if formats[0] != KOHYA else None,
        diffusers_path=files.get(DIFFUSERS) if formats[0] != DIFFUSERS else None,
        lora_format=formats[0],
        samples=samples,
        metrics=metrics,
        resumed_from_step=start,
        warnings=warnings,
        loss_curve=curve,
        sample_grid=sample_grid,
    )


def export_formats(params: TrainLoraInput, family: ModelFamily) -> list[str]:
    """The job's formats (the family's default when none are given), checked; the first is the
    main file (``<output_name>.safetensors``, the one ``generate`` loads by name)."""
    formats = list(params.export_formats or family.default_exports())
    family.check_exports(formats)
    return formats


def _export(
    entry: LoadedPipeline,
    trainer: LoraTrainer,
    formats: list[str],
    main: Path,
    metadata: dict[str, str],
    dtype: torch.dtype,
) -> dict[str, Path]:
    """The trained LoRA in each format: the first at ``main``, others as ``<stem>_<format>``."""
    layers, config = trainer.lora_state_dict(), trainer.adapter_config()
    return {
        fmt: save_lora(
            entry,
            layers,
            config,
            main if i == 0 else main.with_name(f"{main.stem}_{fmt}{main.suffix}"),
            metadata,
            dtype,
            fmt,
        )
        for i, fmt in enumerate(formats)
    }


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


def check_saved_weights(path: Path, step: int, cfg: TrainConfig) -> None:
    """Raise :class:`TrainingDiverged` when a tensor of the written LoRA file is not finite (a
    weight that overflows the file's fp16, say), before the file is handed to storage."""
    import torch
    from safetensors.torch import load_file

    if not all(bool(torch.isfinite(tensor).all()) for tensor in load_file(str(path)).values()):
        raise diverged(step, cfg, f"a weight of the LoRA file is not finite once saved ({path.name})")


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
) -> list[ImageFile]:
    """Write the LoRA of ``step`` and its sample images (rendered with the training adapter, on
    their own RNG: training's stays untouched) and hand them to storage; returns the samples."""
    folder = work_dir / f"snapshot-{step}"
    folder.mkdir()
    images: list[ImageFile] = []
    try:
        fmt = export_formats(params, trainable(entry.family, entry.pipe))[0]
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


def _train_config(
    params: TrainLoraInput,
    model: str,
    entry: LoadedPipeline,
    settings: Settings,
    precision: Precision,
    resolutions: list[int],
    device: torch.device,
    cache: Path | None,
) -> TrainConfig:
    """The job's inputs with every default resolved (the family's), and the compile decision."""
    family = trainable(entry.family, entry.pipe)
    defaults = family.defaults
    steps = params.steps or default_steps(model, family, settings.max_train_steps)
    targets = params.lora_targets or defaults.lora_targets
    sampling = params.timestep_sampling or defaults.timestep_sampling
    if sampling not in family.timestep_samplings:
        raise InputError(
            f"input.timestep_sampling: {sampling} is not offered for {family.label}; "
            f"use {' or '.join(family.timestep_samplings)}"
        )
    checkpointing = params.gradient_checkpointing
    if checkpointing is None:  # on where the model needs it, at full size only
        checkpointing = defaults.gradient_checkpointing and entry.native_size >= TINY_NATIVE_LIMIT
    rank = params.rank or family.defaults.rank
    alpha = params.alpha if params.alpha is not None else (family.defaults.alpha or rank)
    sides = "/".join(str(r) for r in resolutions)
    parts = (model, precision, sides, params.batch_size, rank, targets, checkpointing)
    key = "|".join(str(part) for part in (*parts, params.quantize_base))
    return TrainConfig(
        steps=steps,
        rank=rank,
        alpha=float(alpha),
        learning_rate=params.learning_rate or family.defaults.learning_rate,
        targets=tuple(family.target_modules(targets)),
        batch_size=params.batch_size,
        gradient_accumulation=params.gradient_accumulation,
        seed=params.seed,
        precision=precision,
        gradient_checkpointing=checkpointing,
        timestep_sampling=sampling,
        cache_latents=params.cache_latents,
        cache_text_embeddings=params.cache_text_embeddings,
        compile=should_compile(settings.compile, device, steps, key, cache),
        compile_key=key,
        resolutions=tuple(resolutions),
        caption_dropout=params.caption_dropout,
        shuffle_caption=params.shuffle_caption,
        keep_tokens=params.keep_tokens if params.shuffle_caption else 0,
    )


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
