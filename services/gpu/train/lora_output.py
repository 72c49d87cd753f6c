"""The LoRA files of a training run: their header metadata, the export formats, and the check
that no written file holds a non-finite weight before storage sees it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from services.gpu import SOFTWARE_NAME, SOFTWARE_VERSION
from services.gpu.families import ModelFamily, trainable
from services.gpu.lora_files import save_lora
from services.gpu.train.loop import diverged

if TYPE_CHECKING:
    import torch

    from services.gpu.models import LoadedPipeline
    from services.gpu.params import TrainLoraInput
    from services.gpu.train.trainer import LoraTrainer, TrainConfig


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


def export_formats(params: TrainLoraInput, family: ModelFamily) -> list[str]:
    """The job's formats (the family's default when none are given), checked; the first is the
    main file (``<output_name>.safetensors``, the one ``generate`` loads by name)."""
    formats = list(params.export_formats or family.default_exports())
    family.check_exports(formats)
    return formats


def export_lora_files(
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


def check_saved_weights(path: Path, step: int, cfg: TrainConfig) -> None:
    """Raise :class:`TrainingDiverged` when a tensor of the written LoRA file is not finite (a
    weight that overflows the file's fp16, say), before the file is handed to storage."""
    import torch
    from safetensors.torch import load_file

    if not all(bool(torch.isfinite(tensor).all()) for tensor in load_file(str(path)).values()):
        raise diverged(step, cfg, f"a weight of the LoRA file is not finite once saved ({path.name})")
