"""The LoRA training loop, the same for every model family: setup, step and teardown on a
cached pipeline. What differs per family (text and latent encoding, noise and target, the
denoiser call, LoRA targets) comes from :mod:`services.gpu.families`.

Fast path (the defaults): the VAE and the text encoders run once per image and caption
(cached latent distributions and embeddings) and then leave the GPU for the rest of the loop;
the denoiser's frozen weights stay in the pipeline's dtype (bf16 on a GPU) under autocast while
the LoRA weights train in fp32; AdamW is fused on CUDA; losses stay on the device (one host
sync per progress report); ``torch.compile`` is optional. Batches are always full and come
from one aspect-ratio bucket each (:class:`~services.gpu.train.buckets.BatchPlan`).

The loop's position is explicit state: the batch plan and its cursor, the noise generator, the
optimizer and the LoRA weights, so a checkpoint can save and restore it.

:class:`LoraTrainer` attaches a peft adapter to the cached denoiser and removes it in
:meth:`LoraTrainer.close`. The step loop, progress and the loss log are in
:mod:`services.gpu.train.loop`; :mod:`services.gpu.train.evaluation` measures what a LoRA learned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from services.errors import CheckpointCorrupt, ModelStateError
from services.gpu.adapters import tuner_layers
from services.gpu.families import trainable
from services.gpu.models import PIPELINES, LoadedPipeline
from services.gpu.train.buckets import BatchPlan
from services.gpu.train.caption_variants import CaptionVariants
from services.gpu.train.checkpoint_state import LoopState, TrainerParts, restore
from services.gpu.train.loop import LossLog, diverged

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from services.job.stop import StopSignal

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
TRAIN_ADAPTER = "lora_train"
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 1e-2
ENCODE_CHUNK = 8


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, resolved (no defaults left to the model)."""

    steps: int
    rank: int = 16
    alpha: float = 16.0
    learning_rate: float = 1e-4
    targets: tuple[str, ...] = ()  # peft target modules; empty: the family's attention layers
    batch_size: int = 1
    gradient_accumulation: int = 1
    seed: int = 0
    precision: Precision = "fp32"
    gradient_checkpointing: bool = False
    timestep_sampling: str | None = None  # None: the family's default
    cache_latents: bool = True
    cache_text_embeddings: bool = True
    compile: bool = False
    compile_key: str = ""  # identifies the compiled graph for the warm-cache marker
    resolutions: tuple[int, ...] = field(default_factory=tuple)  # for the metadata
    caption_dropout: float = 0.0  # see services.gpu.train.caption_variants
    shuffle_caption: bool = False
    keep_tokens: int = 0
    world_size: int = 1  # data-parallel ranks: each step's batch plan holds batch_size x world_size


def torch_dtype(precision: Precision) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def pixel_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Same-size RGB images as one float tensor in [-1, 1], shape (N, 3, H, W), on the CPU."""
    import numpy as np
    import torch

    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def encode_latent_dist(vae: Any, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (fp32, on the VAE's device) of the VAE posterior."""
    import torch

    original = vae.dtype
    # An fp16 VAE that the model marks force_upcast (SDXL's) overflows: encode in fp32.
    upcast = original == torch.float16 and getattr(vae.config, "force_upcast", False)
    if upcast:
        vae.to(torch.float32)
    try:
        means, stds = [], []
        with torch.no_grad():
            for chunk in pixels.split(ENCODE_CHUNK):
                dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
                means.append(dist.mean.float())
                stds.append(dist.std.float())
    finally:
        if upcast:
            vae.to(original)
    return torch.cat(means), torch.cat(stds)


def on_device(value: Any, device: torch.device) -> Any:
    """``value`` (a tensor, or a dict or list of them) on ``device``."""
    if isinstance(value, dict):
        return {key: on_device(item, device) for key, item in value.items()}
    if isinstance(value, list):
        return [on_device(item, device) for item in value]
    return value.to(device) if hasattr(value, "to") else value


def _by_size(images: Sequence[Image.Image]) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for index, image in enumerate(images):
        groups.setdefault(image.size, []).append(index)
    return groups


# --- the trainer ------------------------------------------------------------------------------


class LoraTrainer:
    """Train a LoRA on ``entry``'s denoiser: :meth:`setup`, then :meth:`step` ``cfg.steps`` times,
    :meth:`lora_state_dict`, and always :meth:`close` (it removes the adapter)."""

    def __init__(self, entry: LoadedPipeline, cfg: TrainConfig) -> None:
        self.family = trainable(entry.family, entry.pipe)
        self.entry = entry
        self.cfg = cfg
        self.pipe = entry.pipe
        self.denoiser = self.family.denoiser(entry.pipe)
        self.device = self.denoiser.device
        self._attached = False
        self._checkpointing = False
        self._offload_at_rest = entry.placement.offloaded  # the cached pipeline's placement, restored at close
        self.losses: LossLog | None = None  # set by run_steps
        # Data-parallel (services.gpu.train.distributed): this rank's rows of each planned batch, and the
        # all-reduce of the gradients and the loss after each step's backward passes.
        self.rows = slice(None)
        self.sync: Callable[[list[torch.Tensor], torch.Tensor], torch.Tensor] | None = None

    # setup

    def setup(self, images: Sequence[Image.Image], captions: Sequence[str], stop: StopSignal | None = None) -> None:
        """Fill the latent / text caches, then attach the adapter and build the optimizer and the
        batch plan.

        ``images`` are already at their bucket's size; each batch holds one size. ``stop`` is
        checked between chunks of captions while they are encoded. Under the plan's
        ``cpu_offload`` the denoiser (unless NF4) waits on the CPU while the encoders run, and the
        caches live on the CPU; with everything cached the encoders leave the device for the loop.
        """
        import torch
        from peft import LoraConfig

        cfg, denoiser, placement = self.cfg, self.denoiser, self.entry.placement
        self.plan = BatchPlan.draw(
            [image.size for image in images],
            cfg.batch_size * cfg.world_size,
            cfg.steps * cfg.gradient_accumulation,
            cfg.seed,
        )
        self.variants = CaptionVariants.build(
            captions, cfg.caption_dropout, cfg.shuffle_caption, cfg.keep_tokens, cfg.seed
        )
        self.pixels = [pixel_tensor([image])[0] for image in images]
        self.latent_dist: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.text: list[dict[str, Any]] | None = None
        cache_device = torch.device("cpu") if placement.offloaded else self.device
        caching = cfg.cache_latents or cfg.cache_text_embeddings
        with placement.denoiser_parked(caching and placement.moves_denoiser):
            if cfg.cache_latents:
                self.latent_dist = self._encode_latents(images, cache_device)
                self.pixels = []
            if cfg.cache_text_embeddings:
                self.text = self._encode_captions(self.variants.texts, stop, cache_device)
        if cfg.cache_latents and cfg.cache_text_embeddings and not placement.offloaded:
            # nothing encodes in the loop: the encoders wait on the CPU, and come back one at a
            # time beside the denoiser to render samples (the card holds both: none runs alone)
            placement.set_offload(True, alone=False)

        suffixes = list(cfg.targets) or self.family.target_modules("attention")
        targets = self.family.lora_module_names(denoiser, suffixes)
        config = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=targets)
        # manual_seed seeds every device: fork the CUDA generator too, or the job would reseed it.
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            torch.manual_seed(cfg.seed)
            self._attached = True
            denoiser.add_adapter(config, adapter_name=TRAIN_ADAPTER)
        self.named_params = {name: p for name, p in denoiser.named_parameters() if p.requires_grad}
        self.params = list(self.named_params.values())
        for param in self.params:
            param.data = param.data.float()  # LoRA weights train in fp32 over a bf16/fp16 base
        if cfg.gradient_checkpointing:
            self._checkpointing = True
            denoiser.enable_gradient_checkpointing()
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.learning_rate, weight_decay=WEIGHT_DECAY, **({"fused": True} if cuda else {})
        )
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.amp_dtype = None if cfg.precision == "fp32" else torch_dtype(cfg.precision)
        self.forward = torch.compile(denoiser) if cfg.compile else denoiser
        self.schedule = self.family.schedule(self.pipe, self.device)
        self.schedule.use_sampling(cfg.timestep_sampling or self.family.defaults.timestep_sampling)
        self.noise_generator = torch.Generator(self.device).manual_seed(cfg.seed)

    def _encode_latents(
        self, images: Sequence[Image.Image], cache_device: torch.device
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Each image's latent distribution (mean, std), encoded one size at a time."""
        import torch

        latent_dist: list[tuple[torch.Tensor, torch.Tensor]] = [None] * len(images)  # type: ignore[list-item]
        with self.entry.placement.holding(["vae"]):
            for indices in _by_size(images).values():
                mean, std = encode_latent_dist(self.pipe.vae, torch.stack([self.pixels[i] for i in indices]))
                mean, std = mean.to(cache_device), std.to(cache_device)
                for row, index in enumerate(indices):
                    latent_dist[index] = (mean[row], std[row])
        return latent_dist

    def _encode_captions(
        self, captions: list[str], stop: StopSignal | None, cache_device: torch.device
    ) -> list[dict[str, Any]]:
        """Encode in chunks of ``ENCODE_CHUNK`` (bounded memory), checking ``stop`` between them."""
        encoded: list[dict[str, Any]] = []
        with self.entry.placement.holding(self.family.text_encoders):
            for start in range(0, len(captions), ENCODE_CHUNK):
                if stop is not None:
                    stop.check(f"train_lora encoding captions ({start} of {len(captions)} done)")
                chunk = self.family.encode_text(self.pipe, captions[start : start + ENCODE_CHUNK])
                encoded += [on_device(item, cache_device) for item in chunk]
        return encoded

    # one optimizer step

    def _latents(self, index: list[int]) -> torch.Tensor:
        import torch

        if self.latent_dist is not None:
            mean = torch.stack([self.latent_dist[i][0] for i in index]).to(self.device)
            std = torch.stack([self.latent_dist[i][1] for i in index]).to(self.device)
        else:
            with self.entry.placement.holding(["vae"]):
                mean, std = encode_latent_dist(self.pipe.vae, torch.stack([self.pixels[i] for i in index]))
        sample = mean + std * torch.randn(mean.shape, generator=self.noise_generator, device=self.device)
        return self.family.to_model_latents(self.pipe, sample)

    def _text(self, index: list[int]) -> dict[str, Any]:
        chosen = self.variants.choose(index, self.plan.cursor)[self.rows]
        if self.text is not None:
            return on_device(self.family.collate_text([self.text[t] for t in chosen]), self.device)
        texts = [self.variants.texts[t] for t in chosen]
        return self.family.collate_text(self.family.encode_text(self.pipe, texts))

    def step(self) -> torch.Tensor:
        """One optimizer step (``gradient_accumulation`` micro-batches); the mean loss, on the device."""
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        for _ in range(cfg.gradient_accumulation):
            index = self.plan.next()
            latents = self._latents(index)
            noise = torch.randn(latents.shape, generator=self.noise_generator, device=self.device)
            timesteps = self.schedule.sample(len(index), latents, self.noise_generator)
            noisy, target = self.schedule.noisy_and_target(latents, noise, timesteps)
            # Every rank draws the noise of the whole batch (one RNG stream) and trains on its rows.
            rows = self.rows
            noisy, target, timesteps = noisy[rows], target[rows], timesteps[rows]
            text = self._text(index)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                prediction = self.family.predict(self.pipe, self.forward, noisy, timesteps, text)
            loss = F.mse_loss(prediction.float(), target.float()) / cfg.gradient_accumulation
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach()
        if self.sync is not None:
            total = self.sync(self.params, total)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, MAX_GRAD_NORM)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total

    # divergence

    def check_finite(self, step: int) -> None:
        """Raise :class:`TrainingDiverged` when a loss so far or a LoRA weight is not finite
        (a host sync): run before anything of the trained state is saved."""
        import torch

        if self.losses is not None:
            self.losses.check()
        if self.params and not bool(torch.stack([p.detach().isfinite().all() for p in self.params]).all()):
            raise diverged(step, self.cfg, "a LoRA weight is not finite")

    # checkpoint state

    def parts(self) -> TrainerParts:
        """The live state a checkpoint saves and restores in place."""
        states: dict[str, Any] = {"optimizer": self.optimizer}
        if self.scaler is not None:
            states["scaler"] = self.scaler
        return TrainerParts(params=self.named_params, states=states, generators={"noise": self.noise_generator})

    def loop_state(self, step: int, ema: torch.Tensor | None) -> LoopState:
        return LoopState(step, {"batches": self.plan.batches, "cursor": self.plan.cursor}, ema)

    def resume(self, folder: Path) -> tuple[int, torch.Tensor | None]:
        """Load a checkpoint written by :func:`~services.gpu.train.checkpoint_state.capture` after
        :meth:`setup`; returns the step it was taken at and the loss EMA (on the device)."""
        loop = restore(folder, self.parts())
        order = loop.data_order
        if order.get("batches") != self.plan.batches or not 0 <= order.get("cursor", -1) <= len(self.plan.batches):
            raise CheckpointCorrupt(f"checkpoint in {folder}: its batch plan is not this run's")
        self.plan.cursor = order["cursor"]
        ema = None if loop.loss_ema is None else loop.loss_ema.to(self.device)
        return loop.step, ema

    @contextmanager
    def sampling(self) -> Iterator[None]:
        """For rendering samples mid-run with the training adapter: every torch RNG forked
        (sampling draws none of training's). The encoders come to the device while they run
        (:mod:`services.gpu.placement`).

        No autocast: the pipeline runs in its own dtype as ``generate`` does (peft casts into and
        out of the fp32 LoRA layers), so a snapshot's samples match the final ones, and an fp16
        VAE that the pipeline upcasts to fp32 to decode (SDXL's) is not cast back to fp16.
        """
        import torch

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            yield

    # results and teardown

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained layers in diffusers' naming (without the denoiser's prefix)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.denoiser, adapter_name=TRAIN_ADAPTER))

    def adapter_config(self) -> dict[str, Any]:
        return self.denoiser.peft_config[TRAIN_ADAPTER].to_dict()

    def close(self) -> None:
        """Remove the adapter and training switches and bring the encoders back, so the cached
        pipeline is as at rest."""
        import torch

        # Drop every reference to device memory before empty_cache: optimizer moments, the
        # (compiled) forward, caches, the trained LoRA tensors and the scaler.
        self.optimizer = None  # type: ignore[assignment]
        self.forward = None  # type: ignore[assignment]
        self.latent_dist = self.text = None
        self.pixels = []
        self.params, self.named_params = [], {}
        self.scaler = None
        try:
            placement = self.entry.placement
            placement.release()  # what an encoder that raised left on the device; the denoiser back
            placement.set_offload(self._offload_at_rest, alone=True)
            if self._attached and getattr(self.denoiser, "peft_config", None):
                self.denoiser.unload_lora()
            if self._checkpointing:
                self.denoiser.disable_gradient_checkpointing()
            left = tuner_layers(self.pipe)
        except (RuntimeError, ValueError, AttributeError) as exc:
            PIPELINES.evict(self.entry.key)
            raise ModelStateError(f"could not remove the training adapter from {self.entry.key}: {exc}") from exc
        if left:
            PIPELINES.evict(self.entry.key)
            raise ModelStateError(f"{len(left)} adapter layers stayed in {self.entry.key}; the pipeline was dropped")
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# --- progress ---------------------------------------------------------------------------------
