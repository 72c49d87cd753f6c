"""Plain result types of the GPU runner (dataclasses: no pydantic, no torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ImageFile:
    """One encoded image: ``name`` (e.g. ``image-0.png``), its MIME type and its bytes."""

    name: str
    mime: str
    data: bytes


@dataclass(frozen=True)
class TrainResult:
    """What :func:`services.gpu.train.job.train_lora` produced in the work directory."""

    lora_path: Path  # the main file, in lora_format (the first of the job's export_formats)
    kohya_path: Path | None  # the kohya copy, when kohya is asked for but not the main format
    diffusers_path: Path | None = None  # the diffusers copy, likewise
    lora_format: str = "diffusers"
    samples: list[ImageFile] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    resumed_from_step: int = 0  # 0: trained from the start
    warnings: list[str] = field(default_factory=list)
    loss_curve: dict[str, Any] = field(default_factory=dict)  # LossLog.curve(): this run's steps
    sample_grid: ImageFile | None = None  # rows = steps, columns = sample prompts (with save_every)


@dataclass(frozen=True)
class GenerateResult:
    """Images of one ``generate`` job, the seed of the first image (image ``i`` used ``seed + i``),
    and the steps and guidance used (the caller's or the model variant's defaults)."""

    images: list[ImageFile]
    seed: int
    steps: int = 0
    guidance_scale: float | None = None
