"""Everything a training run checks and resolves before anything stored may change.

:func:`prepare_run` validates the dataset (no model loaded yet), refuses a precision the family
overflows in, loads the cached pipeline, checks the export formats, puts every image in its
aspect-ratio bucket, resolves every default into a :class:`TrainConfig` and hashes it. The
runner calls the training store's ``prepare`` (the first delete) only after it returns.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.durable.manifest import dataset_digest, training_config_hash
from services.errors import InputError
from services.gpu import compiled, models
from services.gpu.catalog import BUILTIN_MODELS, DEFAULT_TINY_TRAIN_STEPS, check_pixels
from services.gpu.families import ModelFamily, trainable
from services.gpu.families.base import TINY_NATIVE_LIMIT
from services.gpu.memory.jobs import apply_train_plan
from services.gpu.train.buckets import bucket_sizes, nearest_bucket
from services.gpu.train.compile_policy import should_compile
from services.gpu.train.dataset import Example, fit, load_rgb, scan_dataset
from services.gpu.train.lora_output import export_formats, lora_metadata
from services.gpu.train.trainer import Precision, TrainConfig, torch_dtype
from services.storage.hashing import file_sha256

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from config.settings import Settings
    from services.gpu.models import LoadedPipeline
    from services.gpu.params import TrainLoraInput


@dataclass
class PreparedRun:
    """A run's resolved inputs: the loaded model, its bucketed images, config, hash and files."""

    params: TrainLoraInput
    model: str
    entry: LoadedPipeline
    family: ModelFamily
    device: torch.device
    formats: list[str]
    resolutions: list[int]
    examples: list[Example]
    images: list[Image.Image]
    captions: list[str]
    cfg: TrainConfig
    cache: Path | None
    metadata: dict[str, str]
    config_hash: str
    lora_dtype: torch.dtype
    config_fields: dict[str, Any] = field(default_factory=dict)  # what config_hash hashes
    started: float = field(default_factory=time.perf_counter)
    memory_plan: Any = None  # the plan chosen for this card (services.gpu.memory), when one was made


def prepare_run(
    params: TrainLoraInput,
    dataset_dir: Path,
    settings: Settings,
    training_adapter: Path | None,
    world_size: int | None = None,
) -> PreparedRun:
    """Check and resolve everything (see the module docstring); raises :class:`InputError`.

    ``world_size``: the data-parallel ranks; None: resolved from ``params.gpus`` and the worker."""
    started = time.perf_counter()
    examples = scan_dataset(
        dataset_dir, params.caption, params.trigger_word, settings.max_image_pixels, settings.max_caption_chars
    )
    model = params.base_model or settings.model_id
    params, memory_plan = apply_train_plan(params, settings, len(examples))  # explicit inputs win
    hint = models.peek_family(model, settings)
    if hint is not None:
        hint.check_precision(params.mixed_precision)  # before loading, and before the CUDA check
    device = models.runtime_device()
    precision = resolve_precision(params.mixed_precision, device)
    quantize = params.quantize_base == "nf4"
    entry = models.load_pipeline(model, settings, torch_dtype(precision), device, quantize=quantize)
    entry.placement.set_offload(bool(params.cpu_offload))  # the plan's (services.gpu.placement)
    family = trainable(entry.family, entry.pipe)
    family.check_precision(precision)
    formats = export_formats(params, family)
    resolutions = params.resolutions() or [entry.native_size]
    images, sources = bucketed_images(
        [e.path for e in examples], resolutions, family.bucket_step(entry.pipe), settings.max_image_pixels
    )
    cache = compiled.compile_cache_dir(settings)
    cfg = train_config(params, model, entry, settings, precision, resolutions, device, cache)
    if world_size is None:
        from services.gpu.train.world import resolve_world_size

        world_size = resolve_world_size(params.gpus, device, settings)
    cfg = replace(cfg, world_size=world_size)
    fields = config_fields_of(cfg, model, examples, dataset_dir, training_adapter)
    return PreparedRun(
        params=params,
        model=model,
        entry=entry,
        family=family,
        device=device,
        formats=formats,
        resolutions=resolutions,
        examples=examples,
        images=images,
        captions=[examples[i].caption for i in sources],
        cfg=cfg,
        cache=cache,
        metadata=lora_metadata(entry, cfg, params.output_name, params.trigger_word, len(examples)),
        config_hash=training_config_hash(fields),
        lora_dtype=torch_dtype("fp32" if precision == "fp32" else "fp16"),
        config_fields=fields,
        started=started,
        memory_plan=memory_plan,
    )


def resolve_precision(requested: str, device: torch.device) -> Precision:
    """``auto`` is bf16 on CUDA and fp32 on the CPU; fp16 needs CUDA."""
    if requested == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise InputError("input.mixed_precision: fp16 needs a CUDA GPU; use auto, no or bf16")
    return {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[requested]


def default_steps(model: str, family: ModelFamily, max_steps: int) -> int:
    """The family's default (100 on the builtin tiny models), within ``MAX_TRAIN_STEPS``."""
    default = DEFAULT_TINY_TRAIN_STEPS if model in BUILTIN_MODELS else family.defaults.steps
    return min(default, max_steps)


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


def config_hash_of(
    cfg: TrainConfig, model: str, examples: list[Example], root: Path, adapter: Path | None = None
) -> str:
    """The hash a checkpoint must match to be resumed (see ``TRAINING_HASH_FIELDS``)."""
    return training_config_hash(config_fields_of(cfg, model, examples, root, adapter))


def config_fields_of(
    cfg: TrainConfig, model: str, examples: list[Example], root: Path, adapter: Path | None = None
) -> dict[str, Any]:
    """The ``TRAINING_HASH_FIELDS`` of a run, resolved."""
    adapter_digest = None if adapter is None else file_sha256(adapter)
    digest = dataset_digest((e.path.relative_to(root).as_posix(), file_sha256(e.path), e.caption) for e in examples)
    return {
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
        **{k: getattr(cfg, k) for k in ("caption_dropout", "shuffle_caption", "keep_tokens", "world_size")},
    }


def train_config(
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
