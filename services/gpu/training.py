"""The LoRA training core: setup, step and teardown on a cached SD / SDXL pipeline.

Fast path (the defaults): the VAE and the text encoders run once per image and caption
(cached latent distributions and embeddings), the UNet's frozen weights stay in the pipeline's
dtype (bf16 on a GPU) under autocast while the LoRA weights train in fp32, AdamW is fused on
CUDA, losses stay on the device (one host sync per progress report), and ``torch.compile`` is
optional. Batches are always full, so a compiled step never sees a new shape.

:class:`LoraTrainer` attaches a peft adapter to the cached UNet and removes it in
:meth:`LoraTrainer.close`; :func:`evaluation_loss` is a deterministic denoising loss (fixed
noise and timesteps) used by the tests and the benchmark to show that training learns.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from services.errors import InputError, ModelStateError
from services.gpu.adapters import tuner_layers
from services.gpu.models import PIPELINES, LoadedPipeline

if TYPE_CHECKING:
    import torch
    from PIL import Image

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
TRAIN_ADAPTER = "lora_train"
TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")  # the diffusers LoRA examples' choice
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 1e-2
LOSS_EMA = 0.9
ENCODE_CHUNK = 8
EVAL_TIMESTEPS = (50, 200, 400, 600, 800, 950)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run needs, resolved (no defaults left to the model)."""

    steps: int
    rank: int = 16
    alpha: float = 16.0
    learning_rate: float = 1e-4
    resolution: int = 512
    batch_size: int = 1
    gradient_accumulation: int = 1
    seed: int = 0
    precision: Precision = "fp32"
    gradient_checkpointing: bool = False
    cache_latents: bool = True
    cache_text_embeddings: bool = True
    compile: bool = False
    compile_key: str = ""  # identifies the compiled graph for the warm-cache marker


def torch_dtype(precision: Precision) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]


def pixel_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """Square RGB images as one float tensor in [-1, 1], shape (N, 3, H, W), on the CPU."""
    import numpy as np
    import torch

    array = np.stack([np.asarray(image.convert("RGB"), dtype=np.uint8) for image in images])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


# --- conditioning -----------------------------------------------------------------------------


@dataclass
class Conditioning:
    """Text conditioning of a batch: hidden states, plus SDXL's pooled embeddings and time ids."""

    hidden: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def select(self, index: torch.Tensor) -> Conditioning:
        return Conditioning(
            self.hidden[index],
            None if self.pooled is None else self.pooled[index],
            None if self.time_ids is None else self.time_ids[index],
        )

    def unet_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"encoder_hidden_states": self.hidden}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs


def encode_text(entry: LoadedPipeline, captions: Sequence[str], resolution: int) -> Conditioning:
    """Embeddings exactly as the pipeline computes them at inference (no guidance)."""
    import torch

    pipe = entry.pipe
    device = pipe.unet.device
    with torch.no_grad():
        if entry.family == "sdxl":
            hidden, _, pooled, _ = pipe.encode_prompt(
                prompt=list(captions), device=device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            size = float(resolution)
            ids = torch.tensor([[size, size, 0.0, 0.0, size, size]], device=device, dtype=hidden.dtype)
            return Conditioning(hidden, pooled, ids.repeat(len(captions), 1))
        hidden, _ = pipe.encode_prompt(list(captions), device, 1, False)
        return Conditioning(hidden)


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


def scale_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """VAE latents into the UNet's space (shift, then scaling factor)."""
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    return latents * vae.config.scaling_factor


class NoiseSchedule:
    """DDPM forward process on the device: noisy samples and the model's training target."""

    def __init__(self, entry: LoadedPipeline, device: torch.device) -> None:
        from diffusers import DDPMScheduler

        config = entry.pipe.scheduler.config
        scheduler = DDPMScheduler.from_config(config)
        self.prediction_type = config.get("prediction_type", "epsilon")
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise InputError(f"input.base_model: prediction type {self.prediction_type} is not trainable here")
        alphas = scheduler.alphas_cumprod.to(device, dtype=scheduler.alphas_cumprod.dtype).float()
        self.sqrt_alpha = alphas.sqrt()
        self.sqrt_one_minus = (1.0 - alphas).sqrt()
        self.num_timesteps = int(scheduler.config.num_train_timesteps)

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


# --- the trainer ------------------------------------------------------------------------------


class LoraTrainer:
    """Train a LoRA on ``entry``'s UNet: :meth:`setup`, then :meth:`step` ``cfg.steps`` times,
    :meth:`lora_state_dict`, and always :meth:`close` (it removes the adapter)."""

    def __init__(self, entry: LoadedPipeline, cfg: TrainConfig) -> None:
        if entry.family not in ("sd", "sdxl"):
            raise InputError(
                f"input.base_model: training supports SD 1.x/2.x and SDXL pipelines, not {type(entry.pipe).__name__}"
            )
        self.entry = entry
        self.cfg = cfg
        self.pipe = entry.pipe
        self.unet = entry.pipe.unet
        self.device = self.unet.device
        self._attached = False
        self._checkpointing = False

    # setup

    def setup(self, images: Sequence[Image.Image], captions: Sequence[str]) -> None:
        """Attach the adapter, build the optimizer and the latent / text caches."""
        import torch
        from peft import LoraConfig

        cfg, unet = self.cfg, self.unet
        config = LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, init_lora_weights="gaussian", target_modules=list(TARGET_MODULES)
        )
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            self._attached = True
            unet.add_adapter(config, adapter_name=TRAIN_ADAPTER)
        self.params = [p for p in unet.parameters() if p.requires_grad]
        for param in self.params:
            param.data = param.data.float()  # LoRA weights train in fp32 over a bf16/fp16 base
        if cfg.gradient_checkpointing:
            self._checkpointing = True
            unet.enable_gradient_checkpointing()
        cuda = self.device.type == "cuda"
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.learning_rate, weight_decay=WEIGHT_DECAY, **({"fused": True} if cuda else {})
        )
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None
        self.amp_dtype = None if cfg.precision == "fp32" else torch_dtype(cfg.precision)
        self.forward = torch.compile(unet) if cfg.compile else unet
        self.schedule = NoiseSchedule(self.entry, self.device)
        self.noise_generator = torch.Generator(self.device).manual_seed(cfg.seed)
        self.batch_generator = torch.Generator().manual_seed(cfg.seed)

        pixels = pixel_tensor(images)
        self.count = len(images)
        self._plan_batches()
        self.pixels = None if cfg.cache_latents else pixels
        self.latent_dist = encode_latent_dist(self.pipe.vae, pixels) if cfg.cache_latents else None
        unique = list(dict.fromkeys(captions))
        self.captions = list(captions)
        self.caption_index = torch.tensor([unique.index(c) for c in captions], device=self.device)
        self.text = encode_text(self.entry, unique, cfg.resolution) if cfg.cache_text_embeddings else None

    # one optimizer step

    def _plan_batches(self) -> None:
        """Every micro-batch of the run, drawn up front: shuffled epochs, always full batches.

        The indices go to the device once, so a step never waits on a host-to-device copy.
        """
        import torch

        cfg = self.cfg
        batches: list[list[int]] = []
        order: list[int] = []
        for _ in range(cfg.steps * cfg.gradient_accumulation):
            batch: list[int] = []
            while len(batch) < cfg.batch_size:
                if not order:
                    order = torch.randperm(self.count, generator=self.batch_generator).tolist()
                batch.append(order.pop())
            batches.append(batch)
        self.batches = batches
        self.batches_on_device = torch.tensor(batches, device=self.device)
        self.cursor = 0

    def _latents(self, index: list[int], picked: torch.Tensor) -> torch.Tensor:
        import torch

        if self.latent_dist is not None:
            mean, std = self.latent_dist[0][picked], self.latent_dist[1][picked]
        else:
            mean, std = encode_latent_dist(self.pipe.vae, self.pixels[index])
        sample = mean + std * torch.randn(mean.shape, generator=self.noise_generator, device=self.device)
        return scale_latents(self.pipe.vae, sample)

    def _conditioning(self, index: list[int], picked: torch.Tensor) -> Conditioning:
        if self.text is not None:
            return self.text.select(self.caption_index[picked])
        return encode_text(self.entry, [self.captions[i] for i in index], self.cfg.resolution)

    def step(self) -> torch.Tensor:
        """One optimizer step (``gradient_accumulation`` micro-batches); the mean loss, on the device."""
        import torch
        import torch.nn.functional as F

        cfg = self.cfg
        total = torch.zeros((), device=self.device)
        for _ in range(cfg.gradient_accumulation):
            index, picked = self.batches[self.cursor], self.batches_on_device[self.cursor]
            self.cursor += 1
            latents = self._latents(index, picked)
            noise = torch.randn(latents.shape, generator=self.noise_generator, device=self.device)
            timesteps = torch.randint(
                0, self.schedule.num_timesteps, (len(index),), generator=self.noise_generator, device=self.device
            )
            noisy, target = self.schedule.noisy_and_target(latents, noise, timesteps)
            cond = self._conditioning(index, picked)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                prediction = self.forward(noisy, timesteps, **cond.unet_kwargs(), return_dict=False)[0]
            loss = F.mse_loss(prediction.float(), target.float()) / cfg.gradient_accumulation
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
            total += loss.detach()
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

    # results and teardown

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained layers in diffusers' naming (without the ``unet.`` prefix)."""
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        return convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet, adapter_name=TRAIN_ADAPTER))

    def adapter_config(self) -> dict[str, Any]:
        return self.unet.peft_config[TRAIN_ADAPTER].to_dict()

    def close(self) -> None:
        """Remove the adapter and training switches, so the cached pipeline is as at rest."""
        import torch

        self.optimizer = None  # type: ignore[assignment]
        self.forward = None  # type: ignore[assignment]
        self.latent_dist = self.text = self.pixels = None
        try:
            if self._attached and getattr(self.unet, "peft_config", None):
                self.unet.unload_lora()
            if self._checkpointing:
                self.unet.disable_gradient_checkpointing()
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


class ProgressReporter:
    """Calls ``callback({"step", "total_steps", "loss", "eta_seconds"})`` at most once per
    ``interval`` seconds, and always for the last step. ``loss`` is read (a device sync) only
    when a report goes out."""

    def __init__(
        self,
        callback: Callable[[dict[str, Any]], None] | None,
        total_steps: int,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.callback = callback
        self.total = total_steps
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.last: float | None = None

    def update(self, step: int, loss: Callable[[], float]) -> None:
        if self.callback is None:
            return
        now = self.clock()
        final = step >= self.total
        if not final and self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        elapsed = now - self.started
        eta = elapsed / step * (self.total - step) if step else None
        self.callback(
            {
                "step": step,
                "total_steps": self.total,
                "loss": round(loss(), 6),
                "eta_seconds": None if eta is None else round(eta, 1),
            }
        )


@dataclass(frozen=True)
class TrainStats:
    """Measured by :func:`run_steps`."""

    steps: int
    final_loss: float
    seconds: float
    first_step_seconds: float


def run_steps(
    trainer: LoraTrainer, reporter: ProgressReporter | None = None, clock: Callable[[], float] = time.perf_counter
) -> TrainStats:
    """Run ``trainer.cfg.steps`` optimizer steps; the loss is an EMA kept on the device."""
    import torch

    total = trainer.cfg.steps
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    ema: torch.Tensor | None = None
    started = clock()
    first = 0.0
    for step in range(1, total + 1):
        loss = trainer.step()
        ema = loss if ema is None else ema * LOSS_EMA + loss * (1 - LOSS_EMA)
        if step == 1:
            sync()
            first = clock() - started
        if reporter is not None:
            current = ema
            reporter.update(step, lambda current=current: float(current))
    sync()
    return TrainStats(total, float(ema) if ema is not None else float("nan"), clock() - started, first)


# --- evaluation -------------------------------------------------------------------------------


def evaluation_loss(
    entry: LoadedPipeline,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    seed: int = 0,
    timesteps: Sequence[int] = EVAL_TIMESTEPS,
) -> float:
    """Denoising loss with fixed noise and timesteps over the posterior means: it falls when
    the model (with whatever LoRA is fused in) has learned the images."""
    import torch
    import torch.nn.functional as F

    device = entry.pipe.unet.device
    resolution = images[0].size[0]
    mean, _ = encode_latent_dist(entry.pipe.vae, pixel_tensor(images))
    latents = scale_latents(entry.pipe.vae, mean)
    cond = encode_text(entry, captions, resolution)
    schedule = NoiseSchedule(entry, device)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with torch.no_grad():
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=generator).to(device)
            steps = torch.full((len(images),), t, device=device, dtype=torch.long)
            noisy, target = schedule.noisy_and_target(latents, noise, steps)
            prediction = entry.pipe.unet(
                noisy.to(entry.pipe.unet.dtype), steps, **cond.unet_kwargs(), return_dict=False
            )[0]
            losses.append(F.mse_loss(prediction.float(), target.float()).item())
    return sum(losses) / len(losses)
