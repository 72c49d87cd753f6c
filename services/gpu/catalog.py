"""Names and checks shared by the job inputs and the runner (no torch, no pydantic)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

from services.errors import InputError
from services.gpu.families import FAMILIES

BUILTIN_PREFIX = "builtin:"
# One per registered family (its builtin, then its variants), in registration order.
BUILTIN_MODELS: tuple[str, ...] = tuple(
    name for family in FAMILIES for name in (family.builtin, *family.builtin_variants)
)
DEFAULT_TINY_TRAIN_STEPS = 100  # the builtin models train in seconds on a CPU
SHUFFLE_VARIANTS = 8  # shuffle_caption: fixed tag orders per caption, each encoded once and cached

# RunPod mounts its cached models here (REFERENCE.md, "RunPod SDK").
RUNPOD_HF_CACHE = Path("/runpod-volume/huggingface-cache/hub")
RUNPOD_VOLUME = Path("/runpod-volume")
INDUCTOR_CACHE_ON_VOLUME = RUNPOD_VOLUME / "torchinductor-cache"

SchedulerName = Literal[
    "default",
    "ddim",
    "pndm",
    "euler",
    "euler_a",
    "heun",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "unipc",
]
SCHEDULER_NAMES: tuple[str, ...] = get_args(SchedulerName)

MixedPrecision = Literal["auto", "no", "fp16", "bf16"]
ExportFormat = Literal["diffusers", "kohya"]
LoraTargets = Literal["attention", "attention+mlp", "all"]
TimestepSampling = Literal["shift", "sigmoid", "uniform"]
ImageFormat = Literal["png", "jpeg", "webp"]


def check_pixels(width: int, height: int, max_pixels: int) -> None:
    """Raise :class:`InputError` when ``width x height`` is over ``MAX_IMAGE_PIXELS``."""
    if width * height > max_pixels:
        raise InputError(f"input.width: {width}x{height} is over {max_pixels} pixels (MAX_IMAGE_PIXELS)")
