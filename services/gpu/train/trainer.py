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
:meth:`LoraTrainer.close`; :func:`evaluation_loss` is a deterministic denoising loss (fixed
noise and timesteps) used by the tests and the benchmark to show that training learns.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from services.errors import CheckpointCorrupt, ModelStateError, TrainingDiverged
from services.gpu.adapters import tuner_layers
from services.gpu.families import trainable
from services.gpu.models import PIPELINES, LoadedPipeline
from services.gpu.train.buckets import BatchPlan
from services.gpu.train.caption_variants import CaptionVariants
from services.gpu.train.checkpoint_state import LoopState, TrainerParts, restore

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from services.job.stop import StopSignal

log = logging.getLogger(__name__)

Precision = Literal["fp32", "fp16", "bf16"]
TRAIN_ADAPTER = "lora_train"
MAX_GRAD_NORM = 1.0
WEIGHT_DECAY = 1e-2
LOSS_EMA = 0.9
ENCODE_CHUNK = 8
EVAL_FRACTIONS = (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)
MAX_CURVE_POINTS = 500  # a longer run's loss curve is averaged into this many points
CHECK_SECONDS = 1.0  # on a GPU the loss is checked for divergence (a host sync) this often


class Progress(Protocol):
    """``progress(update, final=False)``: the caller throttles; the last update has final=True."""

    def __call__(self, update: dict[str, Any], final: bool = False) -> None: ...


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
        self._offloaded: list[str] = []
        self.losses: LossLog | None = None  # set by run_steps

    # setup

    def setup(self, images: Sequence[Image.Image], captions: Sequence[str], stop: StopSignal | None = None) -> None:
        """Attach the adapter, build the optimizer, the batch plan and the latent / text caches.

        ``images`` are already at their bucket's size; each batch holds one size. ``stop`` is
        checked between chunks of captions while they are encoded.
        """
        import torch
        from peft import LoraConfig

        cfg, denoiser = self.cfg, self.denoiser
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
        self.plan = BatchPlan.draw(
            [image.size for image in images], cfg.batch_size, cfg.steps * cfg.gradient_accumulation, cfg.seed
        )

        self.pixels = [pixel_tensor([image])[0] for image in images]
        self.latent_dist: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if cfg.cache_latents:
            self.latent_dist = [None] * len(images)  # type: ignore[list-item]
            for indices in _by_size(images).values():
                mean, std = encode_latent_dist(self.pipe.vae, torch.stack([self.pixels[i] for i in indices]))
                for row, index in enumerate(indices):
                    self.latent_dist[index] = (mean[row], std[row])
            self.pixels = []
        self.variants = CaptionVariants.build(
            captions, cfg.caption_dropout, cfg.shuffle_caption, cfg.keep_tokens, cfg.seed
        )
        self.text = self._encode_captions(self.variants.texts, stop) if cfg.cache_text_embeddings else None
        if cfg.cache_latents and cfg.cache_text_embeddings and cuda:
            self._offload_encoders()

    def _encode_captions(self, captions: list[str], stop: StopSignal | None) -> list[dict[str, Any]]:
        """Encode in chunks of ``ENCODE_CHUNK`` (bounded memory), checking ``stop`` between them."""
        encoded: list[dict[str, Any]] = []
        for start in range(0, len(captions), ENCODE_CHUNK):
            if stop is not None:
                stop.check(f"train_lora encoding captions ({start} of {len(captions)} done)")
            encoded += self.family.encode_text(self.pipe, captions[start : start + ENCODE_CHUNK])
        return encoded

    def _offload_encoders(self) -> None:
        """Move the text encoders and the VAE to the CPU for the loop (back in :meth:`close`)."""
        import torch

        for name in self.family.encoder_modules(self.pipe):
            getattr(self.pipe, name).to("cpu")
            self._offloaded.append(name)
        torch.cuda.empty_cache()

    # one optimizer step

    def _latents(self, index: list[int]) -> torch.Tensor:
        import torch

        if self.latent_dist is not None:
            mean = torch.stack([self.latent_dist[i][0] for i in index])
            std = torch.stack([self.latent_dist[i][1] for i in index])
        else:
            mean, std = encode_latent_dist(self.pipe.vae, torch.stack([self.pixels[i] for i in index]))
        sample = mean + std * torch.randn(mean.shape, generator=self.noise_generator, device=self.device)
        return self.family.to_model_latents(self.pipe, sample)

    def _text(self, index: list[int]) -> dict[str, Any]:
        chosen = self.variants.choose(index, self.plan.cursor)
        if self.text is not None:
            return self.family.collate_text([self.text[t] for t in chosen])
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
            text = self._text(index)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                prediction = self.family.predict(self.pipe, self.forward, noisy, timesteps, text)
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
        """For rendering samples mid-run with the training adapter: the encoders on the device,
        and every torch RNG forked (sampling draws none of training's).

        No autocast: the pipeline runs in its own dtype as ``generate`` does (peft casts into and
        out of the fp32 LoRA layers), so a snapshot's samples match the final ones, and an fp16
        VAE that the pipeline upcasts to fp32 to decode (SDXL's) is not cast back to fp16.
        """
        import torch

        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for name in self._offloaded:
                getattr(self.pipe, name).to(self.device)
            try:
                yield
            finally:
                for name in self._offloaded:
                    getattr(self.pipe, name).to("cpu")

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
            for name in self._offloaded:
                getattr(self.pipe, name).to(self.device)
            self._offloaded = []
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


class ProgressReporter:
    """Sends ``{"step", "total_steps", "loss", "steps_per_second", "eta_seconds",
    "last_checkpoint_step"}`` to ``progress`` at most once per ``interval`` seconds, and always
    the last step (with ``final=True``). ``loss`` is read (a device sync) only when an update
    goes out; speed and ETA count the steps of this run only (a resumed run starts at
    ``start_step``)."""

    def __init__(
        self,
        callback: Progress | None,
        total_steps: int,
        interval: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        start_step: int = 0,
    ) -> None:
        self.callback = callback
        self.total = total_steps
        self.interval = interval
        self.clock = clock
        self.started = clock()
        self.start_step = start_step
        self.last: float | None = None
        self.last_checkpoint_step: int | None = None

    def update(self, step: int, loss: Callable[[], float]) -> None:
        if self.callback is None:
            return
        now = self.clock()
        final = step >= self.total
        if not final and self.last is not None and now - self.last < self.interval:
            return
        self.last = now
        elapsed, done = now - self.started, step - self.start_step
        rate = done / elapsed if done > 0 and elapsed > 0 else None
        update = {
            "step": step,
            "total_steps": self.total,
            "loss": _finite(loss()),
            "steps_per_second": None if rate is None else round(rate, 3),
            "eta_seconds": None if rate is None else round((self.total - step) / rate, 1),
            "last_checkpoint_step": self.last_checkpoint_step,
        }
        self.callback(update, final=final)


def _finite(value: float) -> float | None:
    """Rounded; None for NaN or infinity (progress updates are strict JSON)."""
    return round(value, 6) if math.isfinite(value) else None


@dataclass(frozen=True)
class TrainStats:
    """Measured by :func:`run_steps` (``steps`` counts this run's steps, ``start_step`` the resumed ones)."""

    steps: int
    final_loss: float | None  # None: no step ran (resumed at the last step without a loss)
    seconds: float
    first_step_seconds: float
    start_step: int = 0


StepHook = Callable[[int, "torch.Tensor | None"], None]


def run_steps(
    trainer: LoraTrainer,
    reporter: ProgressReporter | None = None,
    stop: StopSignal | None = None,
    clock: Callable[[], float] = time.perf_counter,
    start_step: int = 0,
    ema: torch.Tensor | None = None,
    before_step: StepHook | None = None,
) -> TrainStats:
    """Run optimizer steps ``start_step + 1 .. cfg.steps``; the loss is an EMA kept on the device.

    Before every step, ``before_step(steps_done, ema)`` runs when given (checkpoints, and the
    stop signal: it raises :class:`JobStopped`); without it ``stop`` is checked there. Every
    step's loss goes to ``trainer.losses`` (a :class:`LossLog`), checked for divergence after
    every step on the CPU, every ``CHECK_SECONDS`` on a GPU, and at the end.
    """
    import torch

    total = trainer.cfg.steps
    cpu = trainer.device.type != "cuda"
    sync = (lambda: None) if cpu else torch.cuda.synchronize
    losses = trainer.losses = LossLog(trainer.cfg, start_step, trainer.device)
    started = checked = clock()
    first = 0.0
    for step in range(start_step + 1, total + 1):
        if before_step is not None:
            before_step(step - 1, ema)
        elif stop is not None:
            stop.check(f"train_lora at step {step - 1} of {total}")
        loss = trainer.step()
        ema = loss if ema is None else ema * LOSS_EMA + loss * (1 - LOSS_EMA)
        losses.record(loss, ema)
        if step == start_step + 1:
            sync()
            first = clock() - started
        if cpu or clock() - checked >= CHECK_SECONDS:
            losses.check()
            checked = clock()
        if reporter is not None:
            current = ema
            reporter.update(step, lambda current=current: float(current))
    losses.check()
    sync()
    final = float(ema) if ema is not None else None
    return TrainStats(total - start_step, final, clock() - started, first, start_step)


def diverged(step: int, cfg: TrainConfig, what: str) -> TrainingDiverged:
    return TrainingDiverged(
        f"train_lora diverged at step {step} of {cfg.steps}: {what}; nothing of the diverged state was "
        f"stored (an earlier LoRA of this name is unchanged). Lower learning_rate (now {cfg.learning_rate:g}) "
        f"or alpha (now {cfg.alpha:g})"
    )


class LossLog:
    """This run's per-step losses and their EMA, on the device (recording costs no host sync).

    :meth:`check` syncs and raises :class:`TrainingDiverged` naming the first non-finite step;
    :meth:`curve` is the result's loss curve, at most ``MAX_CURVE_POINTS`` points.
    """

    def __init__(self, cfg: TrainConfig, start_step: int, device: torch.device) -> None:
        import torch

        self.cfg = cfg
        self.start = start_step
        self.loss = torch.full((max(cfg.steps - start_step, 0),), math.nan, device=device)
        self.ema = torch.full_like(self.loss, math.nan)
        self.count = 0
        self.checked = 0

    def record(self, loss: torch.Tensor, ema: torch.Tensor) -> None:
        self.loss[self.count] = loss
        self.ema[self.count] = ema
        self.count += 1

    def check(self) -> None:
        import torch

        if self.count == self.checked:
            return
        finite = torch.isfinite(self.loss[self.checked : self.count])
        if not bool(finite.all()):
            index = self.checked + int((~finite).nonzero()[0, 0])
            value = float(self.loss[index])
            raise diverged(self.start + index + 1, self.cfg, f"the loss is {value}")
        self.checked = self.count

    def curve(self, max_points: int = MAX_CURVE_POINTS) -> dict[str, Any]:
        """``{"steps", "loss", "ema", "every", "start_step"}``: with more steps than ``max_points``
        each point is the mean loss of ``every`` consecutive steps (``steps``: the last of them)
        and the EMA at that step."""
        count = self.count
        every = max(1, math.ceil(count / max_points))
        loss = self.loss[:count].double().cpu()
        ema = self.ema[:count].double().cpu()
        starts = range(0, count, every)
        ends = [min(begin + every, count) for begin in starts]
        return {
            "steps": [self.start + end for end in ends],
            "loss": [round(float(loss[b:e].mean()), 6) for b, e in zip(starts, ends, strict=True)],
            "ema": [round(float(ema[end - 1]), 6) for end in ends],
            "every": every,
            "start_step": self.start,
        }


# --- evaluation -------------------------------------------------------------------------------


def evaluation_loss(
    entry: LoadedPipeline,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    seed: int = 0,
    fractions: Sequence[float] = EVAL_FRACTIONS,
) -> float:
    """Denoising loss with fixed noise and timesteps over the posterior means of same-size
    images: it falls when the model (with whatever LoRA is fused in) has learned them."""
    import torch
    import torch.nn.functional as F

    family = trainable(entry.family, entry.pipe)
    denoiser = family.denoiser(entry.pipe)
    device = denoiser.device
    mean, _ = encode_latent_dist(entry.pipe.vae, pixel_tensor(images))
    latents = family.to_model_latents(entry.pipe, mean)
    text = family.collate_text(family.encode_text(entry.pipe, captions))
    schedule = family.schedule(entry.pipe, device)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with torch.no_grad():
        for fraction in fractions:
            noise = torch.randn(latents.shape, generator=generator).to(device)
            steps = schedule.at(fraction, len(images), device)
            noisy, target = schedule.noisy_and_target(latents, noise, steps)
            prediction = family.predict(entry.pipe, denoiser, noisy.to(denoiser.dtype), steps, text)
            losses.append(F.mse_loss(prediction.float(), target.float()).item())
    return sum(losses) / len(losses)
