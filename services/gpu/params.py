"""Job inputs of the GPU actions (pydantic; imports no torch).

``train_lora``::

    {"action": "train_lora", "dataset": "my-set", "output_name": "my-lora",
     "trigger_word": "sks", "steps": 1000, "rank": 16, "export_formats": ["diffusers", "kohya"]}
    {"action": "train_lora", "dataset": "my-set", "output_name": "flux-lora",
     "base_model": "black-forest-labs/FLUX.1-dev", "resolution": [512, 768, 1024],
     "lora_targets": "all", "timestep_sampling": "sigmoid"}

``generate``::

    {"action": "generate", "prompt": "a photo of sks", "lora": "my-lora", "num_images": 2,
     "width": 512, "height": 512, "seed": 7, "format": "webp", "quality": 90}

``steps`` and ``guidance_scale`` default to the model variant's (README, "Model families").

Static bounds are checked by pydantic; bounds that come from the worker's settings
(``MAX_TRAIN_STEPS``, ``MAX_GEN_STEPS``, ``MAX_IMAGES_PER_REQUEST``, ``MAX_IMAGE_PIXELS``) by
``check_limits``, which raises :class:`services.errors.InputError` naming the field.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

from services.errors import InputError
from services.gpu.caption.options import CaptionOptions, one_line_text
from services.gpu.catalog import (
    BUILTIN_MODELS,
    BUILTIN_PREFIX,
    ExportFormat,
    ImageFormat,
    LoraTargets,
    MixedPrecision,
    SchedulerName,
    TimestepSampling,
    check_pixels,
)
from services.ingest.urls import Url

if TYPE_CHECKING:
    from config.settings import Settings

_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9_.-]{1,96}$")
_STORAGE_KEY = re.compile(r"^[A-Za-z0-9_.\-/]{1,512}$")

Prompt = Annotated[str, StringConstraints(min_length=1, max_length=2000)]


def safe_name(value: str, field: str) -> str:
    """Letters, digits, ``-``, ``_`` and ``.``; 1..128 characters; no ``..``."""
    if not _SAFE_NAME.fullmatch(value) or ".." in value or value == ".":
        raise ValueError(f"{field} must be 1-128 letters, digits, '-', '_' or '.', without '..' or separators")
    return value


def storage_key(value: str) -> str:
    """A stored LoRA: a storage key or a train_lora output_name."""
    if not _STORAGE_KEY.fullmatch(value) or ".." in value or value.startswith("/") or "//" in value:
        raise ValueError("must be a storage key or an output_name (letters, digits, '-', '_', '.', '/')")
    return value


def check_base_model(value: str | None) -> str | None:
    """A builtin name, a Hugging Face repo id (``org/name``) or an absolute local directory."""
    if value is None:
        return None
    if value.startswith(BUILTIN_PREFIX):
        if value not in BUILTIN_MODELS:
            raise ValueError(f"unknown builtin model; choose one of {', '.join(BUILTIN_MODELS)}")
        return value
    if value.startswith("/"):
        if len(value) > 1024 or "\x00" in value or ".." in value.split("/"):
            raise ValueError("a local model directory must be an absolute path without '..'")
        return value
    if _REPO_ID.fullmatch(value) and ".." not in value:
        return value
    raise ValueError(
        "must be a Hugging Face repo id (org/name, loaded from the local cache), an absolute "
        f"directory, or one of {', '.join(BUILTIN_MODELS)}"
    )


def _limit(field: str, value: int, limit: int, setting: str) -> None:
    if value > limit:
        raise InputError(f"input.{field}: at most {limit} ({setting})")


_BASE_MODEL = f"{', '.join(BUILTIN_MODELS)}, a cached Hugging Face repo id or a local directory; default MODEL_ID."
Side = Annotated[int, Field(ge=16, le=2048, multiple_of=8)]


# The memory-plan inputs of both GPU actions (README, Memory plans).
DryRun = Annotated[
    bool,
    Field(
        description="Return the memory plan and its estimate (README, Memory plans) without loading weights, "
        "touching storage or running the job."
    ),
]
CpuOffload = Annotated[
    bool | None,
    Field(
        description="The text encoders, the VAE and the caches on the CPU, on the GPU only while they run; "
        "the largest text encoder (T5, Qwen3) runs while a bf16 denoiser waits on the CPU (seconds of "
        "transfers per job). Default: the memory plan's (on only where it is needed to fit).",
    ),
]
GpuMemoryGb = Annotated[
    float | None,
    Field(
        gt=0,
        le=1024,
        strict=True,  # a number: not "24", not true
        allow_inf_nan=False,
        description="Plan for a card of this much memory instead of this worker's GPU: GiB as nvidia-smi "
        "reports it (L4 22.5, RTX 4090 24.0, RTX 5090 31.8, L40S 45.0, A6000 48.0, H100 79.6, H200 140.4).",
    ),
]


class TrainLoraInput(BaseModel):
    """Train a LoRA adapter on the denoiser (UNet or transformer) of an SD 1.x/2.x, SDXL,
    FLUX.1 or Z-Image model, on aspect-ratio buckets."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["train_lora"]
    dataset: str | None = Field(None, description="Dataset name: images plus optional same-name .txt captions.")
    dataset_url: Url | None = Field(None, description="URL of a zip of images and captions.")
    base_model: str | None = Field(None, description=_BASE_MODEL)
    output_name: str = Field(description="Name of the LoRA; stored under loras/<output_name>/.")
    trigger_word: str | None = Field(
        None, min_length=1, max_length=100, description="Prepended to every caption that lacks it."
    )
    caption: str = Field("", max_length=2000, description="Caption for images without a .txt file.")
    steps: int | None = Field(
        None, ge=1, le=100_000, description="Optimizer steps; default: the family's (100 for the builtin tiny models)."
    )
    rank: int | None = Field(None, ge=1, le=256, description="LoRA rank; default: the family's (16).")
    alpha: float | None = Field(
        None, gt=0, le=1024, description="LoRA alpha; default: the rank. Folded into the saved weights."
    )
    learning_rate: float | None = Field(
        None, gt=0, le=1.0, allow_inf_nan=False, description="Default: the family's (1e-4)."
    )
    resolution: Side | list[Side] | None = Field(
        None,
        description="Training side in pixels, or a list of sides for multi-resolution training: each image "
        "trains at its aspect-ratio bucket of about side x side pixels; default: the model's native size.",
    )
    lora_targets: LoraTargets | None = Field(
        None,
        description="Layers that get LoRA: attention, attention+mlp (also the feed-forward layers), or all "
        "(FLUX.1: every linear layer of its blocks); default: the family's (FLUX.1 all, others attention).",
    )
    timestep_sampling: TimestepSampling | None = Field(
        None,
        description="Training noise levels: shift (logit-normal, shifted as the model's scheduler shifts), "
        "sigmoid (logit-normal, unshifted: ai-toolkit's) or uniform; default: the family's (FLUX.1 and "
        "Z-Image shift, SD/SDXL uniform, the only one they take).",
    )
    batch_size: int = Field(1, ge=1, le=64)
    gradient_accumulation: int = Field(1, ge=1, le=64)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    gpus: int | None = Field(
        None,
        ge=1,
        le=8,
        description="GPUs to train on, data-parallel (one process each; the global batch is batch_size x gpus); "
        "default: every GPU of the worker (on the CPU: TRAIN_CPU_RANKS). Part of the resume config.",
    )
    mixed_precision: MixedPrecision = Field(
        "auto", description="auto: bf16 on a CUDA GPU, fp32 on the CPU. fp16 is refused for FLUX.1 and Z-Image."
    )
    gradient_checkpointing: bool | None = Field(
        None,
        description="Less memory, about 2x slower steps; default: the memory plan's on a GPU (on only where "
        "it is needed to fit), else on for full-size FLUX.1 and Z-Image.",
    )
    quantize_base: Literal["none", "nf4"] | None = Field(
        None,
        description="nf4: the frozen denoiser in 4-bit NF4 (bitsandbytes) for smaller GPUs; the LoRA trains "
        "in full precision over it. Default: the memory plan's (nf4 only where bf16 does not fit the GPU).",
    )
    cpu_offload: CpuOffload = None
    cache_latents: bool = Field(True, description="Encode the images with the VAE once.")
    cache_text_embeddings: bool = Field(True, description="Encode the captions once.")
    sample_prompts: list[Prompt] = Field(
        default_factory=list,
        max_length=8,
        description="Prompts rendered with the trained LoRA (and with each snapshot's, see save_every).",
    )
    sample_steps: int | None = Field(
        None, ge=1, le=500, description="Denoising steps of the samples; default: the model variant's."
    )
    training_adapter: str | None = Field(
        None,
        description="Storage key of a LoRA merged into the base model while training and absent from the "
        "saved file: a de-distillation adapter for FLUX.1-schnell or Z-Image-Turbo.",
    )
    training_adapter_url: Url | None = Field(None, description="URL of the training_adapter .safetensors file.")
    export_formats: list[ExportFormat] | None = Field(
        None,
        min_length=1,
        max_length=4,
        description="LoRA file formats; the first is the main file (lora, what generate loads by name), "
        "another is a copy (kohya_lora / diffusers_lora). Default: the one every loader reads in full: "
        "kohya for SD and SDXL, diffusers (peft names) for FLUX.1 and Z-Image. kohya: SD, SDXL, FLUX.1.",
    )

    checkpoint_every: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Save a resumable checkpoint to loras/<output_name>/checkpoints/ every N steps; "
        "default CHECKPOINT_EVERY (also at least every CHECKPOINT_MINUTES).",
    )
    resume: bool = Field(
        True, description="Resume from this output_name's checkpoint when its training config matches."
    )
    overwrite: bool = Field(
        False, description="Delete this output_name's checkpoints and snapshots first and start over."
    )
    keep_checkpoints: bool = Field(False, description="Keep the checkpoints after the job completes.")
    save_every: int | None = Field(
        None,
        ge=1,
        le=100_000,
        description="Keep the LoRA every N steps as loras/<output_name>/steps/<step>.safetensors, "
        "with the sample_prompts rendered as <step>-sample-<i>.png.",
    )
    keep_last: int | None = Field(
        None, ge=1, le=1000, description="Keep only the newest N snapshots (save_every); default: all."
    )
    auto_caption: bool | CaptionOptions = Field(
        False,
        description="Caption the images without a .txt caption with CAPTION_MODEL before training (true, or "
        "caption_dataset's options); the captions are stored beside the images. README, Captions.",
    )
    caption_dropout: float = Field(
        0.0, ge=0.0, lt=1.0, description="Share of training samples on the empty caption (ai-toolkit's); 0: off."
    )
    shuffle_caption: bool = Field(
        False, description="Shuffle each caption's comma-separated tags (kohya's shuffle_caption); off by default."
    )
    keep_tokens: int = Field(0, ge=0, le=64, description="With shuffle_caption: the first N tags stay in place.")
    dry_run: DryRun = False
    gpu_memory_gb: GpuMemoryGb = None

    @field_validator("dataset")
    @classmethod
    def _dataset_name(cls, value: str | None) -> str | None:
        return None if value is None else safe_name(value, "dataset")

    @field_validator("output_name")
    @classmethod
    def _output_name(cls, value: str) -> str:
        return safe_name(value, "output_name")

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, value: str | None) -> str | None:
        return check_base_model(value)

    @field_validator("training_adapter")
    @classmethod
    def _adapter_key(cls, value: str | None) -> str | None:
        return None if value is None else storage_key(value)

    @field_validator("trigger_word")
    @classmethod
    def _trigger_word(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must be non-blank text on one line")
        return None if value is None else one_line_text(value)

    @field_validator("export_formats")
    @classmethod
    def _unique_formats(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else list(dict.fromkeys(value))

    @field_validator("resolution")
    @classmethod
    def _resolutions(cls, value: int | list[int] | None) -> int | list[int] | None:
        if isinstance(value, list) and not 1 <= len(value) <= 4:
            raise ValueError("give 1 to 4 sides")
        return value

    @model_validator(mode="after")
    def _one_dataset(self) -> TrainLoraInput:
        if (self.dataset is None) == (self.dataset_url is None):
            raise ValueError("give exactly one of dataset or dataset_url")
        if self.training_adapter is not None and self.training_adapter_url is not None:
            raise ValueError("give at most one of training_adapter or training_adapter_url")
        if self.quantize_base == "nf4" and (self.training_adapter or self.training_adapter_url):
            raise ValueError("a training_adapter is merged into the base weights: not with quantize_base nf4")
        return self

    def resolutions(self) -> list[int]:
        """The training sides asked for, without duplicates (empty: the model's native size)."""
        if self.resolution is None:
            return []
        sides = self.resolution if isinstance(self.resolution, list) else [self.resolution]
        return list(dict.fromkeys(sides))

    def check_limits(self, settings: Settings) -> None:
        """Bounds from the worker's settings; raises :class:`InputError` naming the field."""
        if self.steps is not None:
            _limit("steps", self.steps, settings.max_train_steps, "MAX_TRAIN_STEPS")
        if self.sample_prompts and self.sample_steps is not None:
            _limit("sample_steps", self.sample_steps, settings.max_gen_steps, "MAX_GEN_STEPS")
        _limit("sample_prompts", len(self.sample_prompts), settings.max_images_per_request, "MAX_IMAGES_PER_REQUEST")
        if isinstance(self.auto_caption, CaptionOptions):
            self.auto_caption.check_caption_limits(settings, "auto_caption.")
        for side in self.resolutions():
            if side * side > settings.max_image_pixels:
                raise InputError(
                    f"input.resolution: {side}x{side} is over {settings.max_image_pixels} pixels (MAX_IMAGE_PIXELS)"
                )


class GenerateInput(BaseModel):
    """Generate images with a base model and optionally a LoRA."""

    model_config = ConfigDict(extra="forbid")

    action: Literal["generate"]
    prompt: Prompt
    negative_prompt: str | None = Field(None, max_length=2000)
    base_model: str | None = Field(None, description=_BASE_MODEL)
    lora: str | None = Field(None, description="Storage key of a LoRA file, or a train_lora output_name.")
    lora_url: Url | None = Field(None, description="URL of a LoRA .safetensors file.")
    lora_scale: float = Field(1.0, ge=-4.0, le=4.0, description="Strength of the LoRA; 0 = the base model.")
    num_images: int = Field(1, ge=1, le=8)
    width: int | None = Field(
        None, ge=16, le=2048, multiple_of=8, description="Pixels; default: the model's native size."
    )
    height: int | None = Field(
        None, ge=16, le=2048, multiple_of=8, description="Pixels; default: the model's native size."
    )
    steps: int | None = Field(
        None,
        ge=1,
        le=500,
        description="Denoising steps; default: the model variant's (FLUX.1-dev 28, schnell 4, Z-Image 50, "
        "Z-Image-Turbo 9, SD/SDXL 25).",
    )
    guidance_scale: float | None = Field(
        None,
        ge=0.0,
        le=30.0,
        description="Guidance; default: the model variant's (FLUX.1-dev 3.5, schnell 0, Z-Image 4, "
        "Z-Image-Turbo 0, SD/SDXL the pipeline's: 7.5 / 5).",
    )
    seed: int | None = Field(
        None, ge=0, le=2**32 - 1, description="Seed of the first image (image i uses seed+i); chosen when absent."
    )
    scheduler: SchedulerName = Field("default", description="Sampler; default: the model's own.")
    format: ImageFormat = "png"
    quality: int = Field(90, ge=1, le=100, description="JPEG/WebP quality.")
    quantize_base: Literal["none", "nf4"] | None = Field(
        None,
        description="nf4: the denoiser in 4-bit NF4 (bitsandbytes), the LoRA applied unfused over it. "
        "Default: the memory plan's (nf4 only where bf16 does not fit the GPU).",
    )
    cpu_offload: CpuOffload = None
    dry_run: DryRun = False
    gpu_memory_gb: GpuMemoryGb = None

    @field_validator("base_model")
    @classmethod
    def _base_model(cls, value: str | None) -> str | None:
        return check_base_model(value)

    @field_validator("lora")
    @classmethod
    def _lora(cls, value: str | None) -> str | None:
        return None if value is None else storage_key(value)

    @model_validator(mode="after")
    def _one_lora(self) -> GenerateInput:
        if self.lora is not None and self.lora_url is not None:
            raise ValueError("give at most one of lora or lora_url")
        return self

    def check_limits(self, settings: Settings) -> None:
        """Bounds from the worker's settings; raises :class:`InputError` naming the field."""
        if self.steps is not None:
            _limit("steps", self.steps, settings.max_gen_steps, "MAX_GEN_STEPS")
        _limit("num_images", self.num_images, settings.max_images_per_request, "MAX_IMAGES_PER_REQUEST")
        if self.width is not None or self.height is not None:
            # One side alone: check it as a square (native sizes are square); the runner checks
            # the exact size once the model is loaded.
            side = self.width or self.height or 0
            check_pixels(self.width or side, self.height or side, settings.max_image_pixels)
