"""The model-family protocol: everything the runner needs to know about one architecture.

A family is one module under :mod:`services.gpu.families` holding a subclass of
:class:`ModelFamily`: how to recognise its pipelines, its tiny built-in model, how to encode
text and latents for training, its noise schedule and training target, the denoiser call, the
LoRA target modules, the training defaults, and its export formats and metadata. The trainer
loop, the caches, precision and compilation never name a family.

Conventions shared by every family: text conditioning is cached per caption as a dict of
tensors without a batch dimension (:meth:`ModelFamily.encode_text`) and put together per batch
by :meth:`ModelFamily.collate_text`; latents are (B, C, H, W) in the denoiser's space; flow
families predict the velocity ``noise - latents``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from services.errors import InputError

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

Text = dict[str, "torch.Tensor"]
Tensors = dict[str, "torch.Tensor"]
DIFFUSERS = "diffusers"  # export formats (services.gpu.catalog.ExportFormat)
KOHYA = "kohya"
FORMAT_KEY = "lora_format"  # the LoRA header key that names the file's format
BUCKET_STEP = 64  # pixels, for full-size models
TINY_BUCKET_STEP = 8  # the builtin tiny models (32 px native) bucket in 8 px steps
TINY_NATIVE_LIMIT = 256  # a model whose native side is below this is a tiny test model


@dataclass(frozen=True)
class TrainDefaults:
    """A family's LoRA training defaults (``alpha`` None means: the rank).

    ``gradient_checkpointing`` applies to full-size models only (the tiny test models never
    need it); ``timestep_sampling`` is one of the family's :attr:`ModelFamily.timestep_samplings`.
    """

    rank: int = 16
    alpha: float | None = None
    learning_rate: float = 1e-4
    steps: int = 1000
    lora_targets: str = "attention"
    gradient_checkpointing: bool = False
    timestep_sampling: str = "uniform"


@dataclass(frozen=True)
class Variant:
    """A model variant's generation defaults (its reference call) and whether it is distilled.

    ``guidance`` None keeps the pipeline's own default; ``distilled`` (non-empty) says why LoRA
    training on it drifts, and is reported as a warning by ``train_lora``.
    """

    name: str
    steps: int
    guidance: float | None = None
    max_sequence_length: int | None = None
    distilled: str = ""


# --- noise schedules --------------------------------------------------------------------------


class DdpmSchedule:
    """DDPM forward process (SD, SDXL): integer timesteps, epsilon / v-prediction / sample target."""

    def __init__(self, scheduler_config: Any, device: torch.device) -> None:
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise InputError(f"input.base_model: prediction type {self.prediction_type} is not trainable here")
        alphas = scheduler.alphas_cumprod.to(device).float()
        self.sqrt_alpha = alphas.sqrt()
        self.sqrt_one_minus = (1.0 - alphas).sqrt()
        self.num_timesteps = int(scheduler.config.num_train_timesteps)

    def use_sampling(self, sampling: str) -> None:
        """Only ``uniform`` (integer timesteps drawn uniformly, as the DDPM recipes do)."""
        if sampling != "uniform":
            raise InputError(f"input.timestep_sampling: {sampling} is for flow models; use uniform here")

    def sample(self, batch: int, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import torch

        return torch.randint(0, self.num_timesteps, (batch,), generator=generator, device=generator.device).to(
            latents.device
        )

    def at(self, fraction: float, batch: int, device: torch.device) -> torch.Tensor:
        """A fixed timestep (``fraction`` of the schedule), for evaluation."""
        import torch

        step = min(self.num_timesteps - 1, int(fraction * self.num_timesteps))
        return torch.full((batch,), step, device=device, dtype=torch.long)

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.sqrt_alpha[timesteps].view(-1, 1, 1, 1)
        s = self.sqrt_one_minus[timesteps].view(-1, 1, 1, 1)
        noisy = a * latents + s * noise
        if self.prediction_type == "epsilon":
            return noisy, noise
        if self.prediction_type == "v_prediction":
            return noisy, a * noise - s * latents
        return noisy, latents


class FlowSchedule:
    """Rectified flow (Flux, Z-Image): ``x_t = (1 - s) x + s noise``, target ``noise - x``.

    Sigma sampling (``timestep_sampling``), the loss unweighted in every case:

    - ``shift`` (the default): logit-normal (mean 0, std 1, as SD3's paper and SimpleTuner do),
      then shifted the way the model's own scheduler shifts them at inference: by ``exp(mu)``
      from the image's token count when the scheduler uses dynamic shifting (FLUX.1), else by its
      static ``shift`` (Z-Image-Turbo: 3.0);
    - ``sigmoid``: the same logit-normal draw, unshifted (ai-toolkit's default);
    - ``uniform``: uniform in (0, 1).
    """

    SAMPLINGS = ("shift", "sigmoid", "uniform")

    def __init__(self, scheduler_config: Any, tokens_per_latent: float) -> None:
        self.config = scheduler_config
        self.tokens_per_latent = tokens_per_latent
        self.sampling = "shift"

    def use_sampling(self, sampling: str) -> None:
        if sampling not in self.SAMPLINGS:
            raise InputError(f"input.timestep_sampling: use one of {', '.join(self.SAMPLINGS)}")
        self.sampling = sampling

    def _shift(self, sigmas: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        config = self.config
        if config.get("use_dynamic_shifting", False):
            tokens = latents.shape[-1] * latents.shape[-2] * self.tokens_per_latent
            base, top = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
            low, high = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
            mu = low + (high - low) * (tokens - base) / (top - base)
            return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
        shift = float(config.get("shift", 1.0))
        return shift * sigmas / (1 + (shift - 1) * sigmas)

    def sample(self, batch: int, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        import torch

        if self.sampling == "uniform":
            return torch.rand((batch,), generator=generator, device=generator.device).to(latents.device)
        normal = torch.randn((batch,), generator=generator, device=generator.device).to(latents.device)
        sigmas = torch.sigmoid(normal)
        return self._shift(sigmas, latents) if self.sampling == "shift" else sigmas

    def at(self, fraction: float, batch: int, device: torch.device) -> torch.Tensor:
        import torch

        return torch.full((batch,), fraction, device=device)

    def noisy_and_target(
        self, latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s = sigmas.view(-1, 1, 1, 1).to(latents.dtype)
        return (1 - s) * latents + s * noise, noise - latents


# --- the protocol -----------------------------------------------------------------------------


class ModelFamily(ABC):
    """One architecture. Subclasses set the class attributes and the abstract methods."""

    name: ClassVar[str]  # stored in LoRA metadata (``base_model_family``)
    label: ClassVar[str]  # for people (README, errors)
    pipeline_classes: ClassVar[tuple[str, ...]]  # diffusers pipeline class names
    builtin: ClassVar[str]  # the tiny built-in model, ``builtin:tiny-<name>``
    denoiser_name: ClassVar[str] = "transformer"
    defaults: ClassVar[TrainDefaults] = TrainDefaults()
    native_resolution: ClassVar[int] = 1024  # when the pipeline does not say
    lora_targets: ClassVar[dict[str, tuple[str, ...]]]  # "attention" and "attention+mlp"
    export_formats: ClassVar[tuple[str, ...]] = (DIFFUSERS,)  # offered; the first is the default
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    builtin_variants: ClassVar[tuple[str, ...]] = ()  # more tiny builtins, e.g. a distilled one
    full_model: ClassVar[str]  # the key of its real configs in full_size.MODELS (build_full)
    lora_scope: ClassVar[tuple[str, ...]] = ()  # LoRA only under these module prefixes (empty: anywhere)
    timestep_samplings: ClassVar[tuple[str, ...]] = ("uniform",)
    fp16_trains: ClassVar[bool] = True  # False: fp16 overflows (T5, large activations)

    # recognition

    def matches(self, pipe: Any) -> bool:
        """True for a pipeline of this family (its class or a subclass of it)."""
        return any(cls.__name__ in self.pipeline_classes for cls in type(pipe).__mro__)

    def matches_index(self, index: dict[str, Any]) -> bool:
        """True for a model directory whose ``model_index.json`` names this family's pipeline."""
        return index.get("_class_name") in self.pipeline_classes

    @abstractmethod
    def build_tiny(self) -> DiffusionPipeline:
        """The tiny built-in pipeline (fp32, CPU); seeded by the caller."""

    @abstractmethod
    def assemble(self, components: dict[str, Any]) -> DiffusionPipeline:
        """The pipeline around ``components`` (denoiser, VAE and text encoders by their pipeline
        names, tiny or full size): adds the tokenizers and the scheduler. :meth:`build_tiny` and
        :meth:`build_full` both end here, so a benchmark runs the pipeline the worker runs."""

    def build_full(self, device: torch.device, dtype: torch.dtype | None = None) -> DiffusionPipeline:
        """The full-size pipeline with random weights (the real configs of
        :mod:`services.gpu.families.full_size`), initialised on ``device``: for benchmarks and
        memory measurements, never for images worth looking at."""
        from services.gpu.families import full_size

        return self.assemble(full_size.build_components(self.full_model, device, dtype))

    def build_tiny_named(self, name: str) -> DiffusionPipeline:
        """The tiny built-in ``name`` (:attr:`builtin` or one of :attr:`builtin_variants`)."""
        return self.build_tiny()

    def variant(self, pipe: Any, model: str) -> Variant:
        """The generation defaults of the loaded ``pipe`` (``model`` is its name as given)."""
        return Variant(self.name, steps=25)

    def check_precision(self, precision: str) -> None:
        """Refuse fp16 training where the family overflows in it."""
        if precision == "fp16" and not self.fp16_trains:
            raise InputError(
                f"input.mixed_precision: fp16 overflows in {self.label} (its text encoder and activations "
                "exceed fp16's range); use bf16 (or auto)"
            )

    # sizes

    def native_size(self, pipe: Any) -> int:
        """The default image side in pixels."""
        factor = getattr(pipe, "vae_scale_factor", 8)
        sample = getattr(pipe, "default_sample_size", None)
        if not isinstance(sample, int):
            sample = getattr(getattr(self.denoiser(pipe), "config", None), "sample_size", None)
        return int(sample * factor) if isinstance(sample, int) else self.native_resolution

    def pixel_multiple(self, pipe: Any) -> int:
        """Image sides must be a multiple of this (the VAE factor, times the patch size)."""
        return int(getattr(pipe, "vae_scale_factor", 8))

    def bucket_step(self, pipe: Any) -> int:
        """Aspect-ratio buckets step in 64 px on full-size models, 8 px on the tiny ones."""
        step = TINY_BUCKET_STEP if self.native_size(pipe) < TINY_NATIVE_LIMIT else BUCKET_STEP
        multiple = self.pixel_multiple(pipe)
        return math.lcm(step, multiple)

    def denoiser(self, pipe: Any) -> torch.nn.Module:
        return getattr(pipe, self.denoiser_name)

    # training

    @abstractmethod
    def encode_text(self, pipe: Any, captions: Sequence[str]) -> list[Text]:
        """Per caption, the conditioning exactly as the pipeline computes it (no guidance)."""

    def collate_text(self, items: Sequence[Text]) -> Text:
        """A batch of cached per-caption conditioning."""
        import torch

        return {key: torch.stack([item[key] for item in items]) for key in items[0]}

    def to_model_latents(self, pipe: Any, sample: torch.Tensor) -> torch.Tensor:
        """VAE latents into the denoiser's space (shift, then scaling factor)."""
        shift = getattr(pipe.vae.config, "shift_factor", None)
        if shift is not None:
            sample = sample - shift
        return sample * pipe.vae.config.scaling_factor

    @abstractmethod
    def schedule(self, pipe: Any, device: torch.device) -> DdpmSchedule | FlowSchedule:
        """The training noise schedule (noisy input and target)."""

    @abstractmethod
    def predict(
        self, pipe: Any, denoiser: Any, noisy: torch.Tensor, timesteps: torch.Tensor, text: Text
    ) -> torch.Tensor:
        """The denoiser's prediction for ``noisy``, in the layout of :meth:`noisy_and_target`'s target.

        Inputs, as the trainer passes them:

        - ``noisy``: (B, C, H, W) latents in the denoiser's space (after ``encode_latents``:
          scaled and shifted; a family that packs latents, as FLUX.1 does, packs and unpacks
          them inside this method);
        - ``timesteps``: (B,) on ``noisy``'s device, in the family schedule's convention: integer
          DDPM steps in ``0..num_train_timesteps-1`` (long) for SD/SDXL; flow families pass the
          sigma in ``0..1`` (float, 1 = pure noise) and scale it to what their denoiser expects
          (FLUX.1 takes ``sigma``, Z-Image ``1 - sigma``);
        - ``text``: :meth:`collate_text`'s batch (tensors with a batch dimension);
        - ``denoiser``: the pipeline's denoiser with the LoRA attached (call this, not
          ``pipe``'s attribute, so training and sampling share one code path).

        Returns a tensor shaped like the target (B, C, H, W).
        """

    # LoRA files

    def target_modules(self, which: str) -> list[str]:
        """peft target module names (suffixes) for ``attention``, ``attention+mlp`` or ``all``."""
        if which not in self.lora_targets:
            offered = " or ".join(self.lora_targets)
            raise InputError(f"input.lora_targets: {which} is not offered for {self.label}; use {offered}")
        return list(self.lora_targets[which])

    def default_exports(self) -> list[str]:
        """``export_formats`` when the job gives none: the one format every loader reads in full."""
        return [self.export_formats[0]]

    def lora_module_names(self, denoiser: Any, suffixes: Sequence[str]) -> list[str]:
        """peft ``target_modules``: ``suffixes`` as they are, or, with a :attr:`lora_scope`, the
        full names of the modules under it that end in one of them."""
        if not self.lora_scope:
            return list(suffixes)
        return [
            name
            for name, _ in denoiser.named_modules()
            if name.startswith(self.lora_scope) and any(name == s or name.endswith(f".{s}") for s in suffixes)
        ]

    def check_exports(self, formats: Sequence[str]) -> None:
        unsupported = [f for f in formats if f not in self.export_formats]
        if unsupported:
            raise InputError(
                f"input.export_formats: {', '.join(unsupported)} is not offered for {self.label}; "
                f"use {' or '.join(self.export_formats)}"
            )

    def save_kwargs(self, layers: Tensors, adapter_config: dict[str, Any]) -> dict[str, Any]:
        """Keyword arguments of the pipeline's ``save_lora_weights`` for the denoiser's layers."""
        return {
            f"{self.denoiser_name}_lora_layers": layers,
            f"{self.denoiser_name}_lora_adapter_metadata": adapter_config,
        }

    # Key conversion. ``layers`` are the denoiser's LoRA tensors in peft naming
    # (``<module>.lora_A.weight`` / ``lora_B.weight``, no component prefix) with alpha folded in
    # (alpha = rank). The diffusers format is those names behind ``<denoiser_name>.``, written by
    # the pipeline's ``save_lora_weights``; any other format is :meth:`export_lora`'s tensors.
    # On the way back, :meth:`import_lora` may hand diffusers' loader a converted state dict
    # where that loader would not read the family's own file (a round trip must give the same
    # weights). Both must keep every module: tests/gpu/test_lora_formats.py maps every key of
    # every format onto the model's original checkpoint layout.

    def export_lora(self, fmt: str, layers: Tensors, pipe: Any) -> Tensors:
        """The tensors of a ``fmt`` file (not ``diffusers``: :func:`~services.gpu.lora_files.save_lora`
        writes that through the pipeline)."""
        if fmt == DIFFUSERS:
            return {f"{self.denoiser_name}.{key}": value for key, value in layers.items()}
        raise InputError(f"input.export_formats: {fmt} is not offered for {self.label}")

    def import_lora(self, path: Path, pipe: Any) -> Tensors | None:
        """The state dict for ``pipe.load_lora_weights`` when its own importer would not read the
        file at ``path`` right; None (the default) lets diffusers read the file as it is."""
        return None

    def format_metadata(self, fmt: str) -> dict[str, str]:
        """Header keys that say which format a file is in (kohya's ``ss_network_module`` only on
        kohya files: loaders branch on it)."""
        if fmt == KOHYA:
            return {FORMAT_KEY: fmt, "ss_network_module": "networks.lora"}
        return {FORMAT_KEY: fmt}

    def file_metadata(self, pipe: Any) -> dict[str, str]:
        """Family keys of the LoRA header (kohya's ``ss_base_model_version`` and friends)."""
        return {"base_model_family": self.name}
