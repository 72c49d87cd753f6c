#!/usr/bin/env python
"""GPU benchmark: this runner against plain diffusers, on random-initialised full-size models.

    python bench/gpu.py                 # CUDA: SD1.5-size 512 px and SDXL-size 1024 px
    python bench/gpu.py --tiny          # CPU smoke run on the builtin tiny models (seconds)
    python bench/gpu.py --only gen --no-sdxl --steps 25 --train-steps 20 --budget 400

Generation (seconds per image, 25 steps, CFG): plain diffusers is an fp16 pipeline called as
is; this runner is ``services.gpu.generate.render.render`` (bf16, the UNet compiled in
reduce-overhead mode, LoRA fused per job). Training (seconds per optimizer step, LoRA rank
16, batch 4): plain is the diffusers ``train_text_to_image_lora`` recipe (fp16 weights, VAE
and text encoder every step, autocast + GradScaler, AdamW, a loss ``.item()`` per step); this
runner is ``services.gpu.train.trainer.LoraTrainer`` (cached latents and embeddings, bf16 autocast,
fused AdamW; eager, then compiled).

FLUX.1 (``--flux``, on by default): a FLUX.1-dev-size pipeline (12 B transformer, T5-XXL- and
CLIP-L-size encoders) at 1024 px; generation, 28 steps, against a plain bf16 ``FluxPipeline``
(with the pixel difference); a LoRA rank 16 step at batch 1 against the diffusers
``train_dreambooth_lora_flux.py`` recipe as it runs for one instance prompt (embeddings
precomputed, encoders freed; a second row with ``--cache_latents``), both training the recipe's
12 target modules; this runner with checkpointing; the 1000-step projection; and
(``--flux-nf4``) the NF4 base against the bf16 one, both with checkpointing.

Every row prints the peak ``torch.cuda.max_memory_allocated`` of both sides, reset after setup
(the steps' or the calls' own peak), and the memory planner's estimate for this runner's side
(``services.gpu.memory``).

Models are built in code from the SD1.5 / SDXL / FLUX.1 configs with random weights and the offline
tokenizer: nothing is downloaded. Rows print as they complete (a timeout still shows them);
compiled sections run last and are skipped when the time left (``--budget``) would not cover
their warm-up. Needs torch, diffusers, transformers, peft, safetensors and Pillow only.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from PIL import Image

from services.gpu import models
from services.gpu.families import FLUX, SD, SDXL, build_tiny_pipeline
from services.gpu.generate.render import GenerationRequest, render
from services.gpu.train.trainer import LoraTrainer, TrainConfig

PROMPT = "a photo of an astronaut riding a horse on the moon, detailed, 8k"
TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
# Rough warm-up costs on an H200 (../shared/REFERENCE.md), used to skip what the budget cannot cover.
WARMUP_ESTIMATE = {
    "gen sd15": 75.0,
    "train sd15": 190.0,
    "gen sdxl": 160.0,
    "train sdxl": 300.0,
    "gen flux": 240.0,  # a guess, to measure
    "train flux": 400.0,  # a guess, to measure
}
BENCH_ERRORS = (RuntimeError, ValueError, TypeError, KeyError, AttributeError, OSError, AssertionError, ImportError)


# --- models built in code ---------------------------------------------------------------------


def build(family: str, tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """A frozen, eval-mode pipeline on ``device`` in ``dtype`` (weights from seed 0): the family's
    tiny built-in model, or its full-size one (``ModelFamily.build_full``: the real configs with
    random weights, through the same ``assemble`` the worker's pipelines go through)."""
    torch.manual_seed(0)
    model = SD if family == "sd15" else SDXL
    pipe = build_tiny_pipeline(model.builtin).to(device) if tiny else model.build_full(device)
    if dtype != torch.float32:
        pipe = pipe.to(dtype=dtype)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def free(*objects: Any) -> None:
    del objects
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- measuring ------------------------------------------------------------------------------


class Clock:
    """Synchronised wall time and peak memory on the bench device."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    def reset_peak(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float | None:
        return torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


@dataclass
class Timing:
    per_item: float  # seconds per image or per step, median of the timed runs
    first: float  # seconds of the first call (compile warm-up when compiled)
    peak_gib: float | None  # after setup: the steps' (or the calls') own peak
    setup: float = 0.0
    setup_peak_gib: float | None = None


def time_calls(
    clock: Clock, call: Callable[[], Any], runs: int, per: int, warmups: int = 1, reset_peak: bool = True
) -> Timing:
    """``warmups`` untimed calls (the first one timed apart), then the median of ``runs``."""
    if reset_peak:
        clock.reset_peak()
    started = clock.now()
    call()
    first = clock.now() - started
    for _ in range(warmups - 1):
        call()
    samples = []
    for _ in range(runs):
        started = clock.now()
        call()
        samples.append((clock.now() - started) / per)
    return Timing(statistics.median(samples), first, clock.peak_gib())


# --- generation -----------------------------------------------------------------------------


def plain_generate(pipe: Any, batch: int, size: int, steps: int) -> Any:
    return pipe(
        prompt=PROMPT,
        num_images_per_prompt=batch,
        height=size,
        width=size,
        num_inference_steps=steps,
        guidance_scale=7.5,
        output_type="pil",
    )


def ours_generate(entry: Any, batch: int, size: int, steps: int, compile: bool) -> Any:
    request = GenerationRequest(
        prompt=PROMPT, width=size, height=size, seed=0, steps=steps, num_images=batch, guidance_scale=7.5
    )
    return render(entry, request, None, compile=compile)


# --- training -------------------------------------------------------------------------------


def dataset(size: int, count: int = 8) -> tuple[list[Image.Image], list[str]]:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in range(count)]
    return images, [f"a photo of sks object number {i}" for i in range(count)]


class RecipeTrainer:
    """The diffusers ``train_text_to_image_lora`` step: VAE and text encoders every step,
    fp16 weights (SDXL's VAE in fp32, as its script does), LoRA in fp32, autocast + GradScaler
    on CUDA, AdamW, gradient clipping, and the loss read back every step."""

    def __init__(
        self, pipe: Any, sdxl: bool, images: list[Image.Image], captions: list[str], rank: int, batch: int
    ) -> None:
        from diffusers import DDPMScheduler
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        from services.gpu.train.trainer import pixel_tensor

        self.pipe, self.sdxl, self.batch = pipe, sdxl, batch
        self.device = pipe.unet.device
        self.cuda = self.device.type == "cuda"
        self.weight_dtype = pipe.unet.dtype
        self.vae_upcast = sdxl and self.cuda  # the SDXL script keeps its VAE in fp32 (fp16 overflows)
        if self.vae_upcast:
            pipe.vae.to(torch.float32)
        pipe.unet.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(TARGETS))
        )
        cast_training_params(pipe.unet, dtype=torch.float32)
        self.params = [p for p in pipe.unet.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
        self.scaler = torch.amp.GradScaler("cuda") if self.cuda and self.weight_dtype == torch.float16 else None
        self.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.pixels = pixel_tensor(images)
        self.captions = captions
        self.cursor = 0

    def step(self) -> None:
        import torch.nn.functional as F

        pipe = self.pipe
        index = [(self.cursor + i) % len(self.captions) for i in range(self.batch)]
        self.cursor += self.batch
        pixels = self.pixels[index].to(self.device, pipe.vae.dtype)
        captions = [self.captions[i] for i in index]
        with torch.no_grad():
            latents = pipe.vae.encode(pixels).latent_dist.sample() * pipe.vae.config.scaling_factor
            latents = latents.to(self.weight_dtype)
            kwargs: dict[str, Any]
            if self.sdxl:
                hidden, _, pooled, _ = pipe.encode_prompt(
                    prompt=captions, device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False
                )
                size = float(pixels.shape[-1])
                ids = torch.tensor([[size, size, 0, 0, size, size]], device=self.device).repeat(len(index), 1)
                kwargs = {
                    "encoder_hidden_states": hidden,
                    "added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids.to(hidden.dtype)},
                }
            else:
                ids = pipe.tokenizer(
                    captions, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
                ).input_ids.to(self.device)
                kwargs = {"encoder_hidden_states": pipe.text_encoder(ids, return_dict=False)[0]}
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(index),), device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        with torch.autocast(self.device.type, dtype=self.weight_dtype, enabled=self.scaler is not None):
            prediction = pipe.unet(noisy, timesteps, return_dict=False, **kwargs)[0]
        loss = F.mse_loss(prediction.float(), noise.float())
        loss.item()  # the recipe logs the loss every step
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, 1.0)
            self.optimizer.step()
        self.optimizer.zero_grad()

    def close(self) -> None:
        self.pipe.unet.unload_lora()
        if self.vae_upcast:
            self.pipe.vae.to(self.weight_dtype)


def timed_steps(clock: Clock, setup: Callable[[], Any], args: argparse.Namespace) -> Timing:
    """Time ``setup()`` (it returns a trainer with ``step`` and ``close``) with its own peak, then
    reset the peak and time the steps: both sides of a row measure the steps alike."""
    clock.reset_peak()
    started = clock.now()
    trainer = setup()
    try:
        seconds, setup_peak = clock.now() - started, clock.peak_gib()
        timing = time_calls(clock, trainer.step, args.train_steps, per=1, warmups=args.warmup_steps)
        timing.setup, timing.setup_peak_gib = seconds, setup_peak
        return timing
    finally:
        trainer.close()


def recipe_train(clock: Clock, pipe: Any, sdxl: bool, data: tuple, args: argparse.Namespace) -> Timing:
    return timed_steps(clock, lambda: RecipeTrainer(pipe, sdxl, *data, rank=args.rank, batch=args.train_batch), args)


def ours_train(
    clock: Clock,
    entry: Any,
    data: tuple,
    args: argparse.Namespace,
    compile: bool,
    precision: str,
    checkpointing: bool = False,
    targets: tuple[str, ...] = (),
) -> Timing:
    cfg = TrainConfig(
        steps=args.warmup_steps + args.train_steps,
        rank=args.rank,
        alpha=float(args.rank),
        batch_size=args.train_batch,
        precision=precision,
        compile=compile,
        gradient_checkpointing=checkpointing,
        targets=targets,
    )

    def setup() -> LoraTrainer:
        trainer = LoraTrainer(entry, cfg)
        try:
            trainer.setup(*data)
        except BENCH_ERRORS:
            trainer.close()
            raise
        return trainer

    return timed_steps(clock, setup, args)


def estimate(
    family: str,
    tiny: bool,
    size: int,
    batch: int,
    *,
    generate: bool = False,
    rank: int = 16,
    targets: str = "attention",
    checkpointing: bool = False,
    quantize: str = "none",
    precision: str = "bf16",
    images: int = 8,
) -> float:
    """The memory planner's estimate (GiB) for a row of this runner: a generation's peak, or a
    training step's (the ``training`` phase: the peaks are reset after setup)."""
    from services.gpu.memory.estimate import GIB
    from services.gpu.memory.planner import TrainJob, generation_bytes, train_phases

    spec = _spec(family, tiny)
    if generate:
        return generation_bytes(spec, size, size, batch, quantize, False) / GIB
    job = TrainJob(size, size, batch=batch, rank=rank, targets=targets, precision=precision, images=images)
    return train_phases(spec, job, checkpointing, quantize)["training"] / GIB


def _spec(family: str, tiny: bool) -> Any:
    from config.settings import build_settings
    from services.gpu.memory import specs
    from services.gpu.memory.jobs import spec_for

    model = {"sd15": SD, "sdxl": SDXL, "flux": FLUX}[family]
    if tiny:
        return spec_for(model.builtin, build_settings())
    return {"sd15": specs.SD15, "sdxl": specs.SDXL, "flux": specs.FLUX_DEV}[family]


def checkpoint_overhead(clock: Clock, entry: Any, data: tuple, args: argparse.Namespace, precision: str) -> str:
    """A report row: the step time, the time to capture one checkpoint (LoRA, optimizer, RNG,
    batch plan; the upload runs in the background), and its share of the step time at the
    default ``CHECKPOINT_EVERY``."""
    import tempfile

    from config.settings import Settings
    from services.gpu.train.checkpoint_state import capture

    every = Settings.model_fields["checkpoint_every"].default
    cfg = TrainConfig(
        steps=args.warmup_steps + args.train_steps + 3,
        rank=args.rank,
        alpha=float(args.rank),
        batch_size=args.train_batch,
        precision=precision,
    )
    trainer = LoraTrainer(entry, cfg)
    try:
        trainer.setup(*data)
        step = time_calls(clock, trainer.step, args.train_steps, per=1, warmups=args.warmup_steps)
        with tempfile.TemporaryDirectory() as folder:
            saves = []
            for i in range(3):
                started = clock.now()
                capture(trainer.parts(), trainer.loop_state(i, None), Path(folder) / str(i))
                saves.append(clock.now() - started)
        save = statistics.median(saves)
    finally:
        trainer.close()
    share = save / (every * step.per_item) * 100
    return (
        f"{step.per_item:.4f} s/step without; +{save:.3f} s per checkpoint: {share:.2f} % of step time "
        f"at checkpoint_every {every}"
    )


# --- the run --------------------------------------------------------------------------------


class Report:
    """Prints comparison rows as they complete, and the summary at the end."""

    HEADER = "| workload | plain diffusers | this runner | speed-up | peak GiB plain / ours (planner est.) | notes |"

    def __init__(self, budget: float) -> None:
        self.started = time.perf_counter()
        self.budget = budget
        self.rows: list[str] = []
        self.results: dict[str, Timing] = {}
        print(self.HEADER + "\n|---|---|---|---|---|---|", flush=True)

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def allows(self, what: str) -> bool:
        estimate = WARMUP_ESTIMATE.get(what, 0.0)
        if self.elapsed() + estimate <= self.budget:
            return True
        self.line(
            f"| {what} compiled | | skipped | | | {self.elapsed():.0f} s + ~{estimate:.0f} s warm-up "
            f"would pass --budget {self.budget:.0f} s |"
        )
        return False

    def line(self, text: str) -> None:
        self.rows.append(text)
        print(text, flush=True)

    def compare(
        self,
        workload: str,
        plain: Timing | None,
        ours: Timing | None,
        unit: str,
        note: str = "",
        estimate: float | None = None,
    ) -> None:
        """One row; ``estimate``: the memory planner's GiB for the runner's side, printed beside
        its measured ``torch.cuda.max_memory_allocated`` (peaks are reset after setup)."""

        def peak(t: Timing | None) -> str:
            return "-" if t is None or t.peak_gib is None else f"{t.peak_gib:.1f}"

        base = f"{plain.per_item:.4f} {unit}" if plain else "-"
        mine = f"{ours.per_item:.4f} {unit}" if ours else "-"
        ratio = f"{plain.per_item / ours.per_item:.2f}x" if plain and ours and ours.per_item > 0 else "-"
        planned = "" if estimate is None else f" (est. {estimate:.1f})" if estimate >= 1 else f" (est. {estimate:.3f})"
        self.line(f"| {workload} | {base} | {mine} | {ratio} | {peak(plain)} / {peak(ours)}{planned} | {note} |")

    def failed(self, what: str, exc: BaseException) -> None:
        traceback.print_exc()
        self.line(f"| {what} | | failed | | | {type(exc).__name__}: {str(exc)[:160]} |")


def run_guarded(report: Report, what: str, body: Callable[[], Any]) -> Any:
    try:
        return body()
    except BENCH_ERRORS as exc:
        report.failed(what, exc)
        return None


def eager_phase(family: str, args: argparse.Namespace, device: torch.device, report: Report) -> None:
    """Plain diffusers and this runner without compilation, for one model size."""
    clock = Clock(device)
    cuda = device.type == "cuda"
    size = args.size or (32 if args.tiny else (512 if family == "sd15" else 1024))
    label = f"{family} {size}px"
    plain_dtype = torch.float16 if cuda else torch.float32
    ours_dtype = models.inference_dtype(device)
    pipe = build(family, args.tiny, device, plain_dtype)
    batches = args.batches
    runs = 3 if family == "sd15" and not args.tiny else 2
    plain_gen: dict[int, Timing] = {}
    if "gen" in args.only:
        for batch in batches:
            plain_gen[batch] = run_guarded(
                report,
                f"gen {label} b{batch} plain",
                lambda b=batch: time_calls(
                    clock, lambda: plain_generate(pipe, b, size, args.steps), runs, per=b, warmups=args.gen_warmups
                ),
            )
    data = dataset(size)
    plain_train = None
    if "train" in args.only:
        plain_train = run_guarded(
            report, f"train {label} plain", lambda: recipe_train(clock, pipe, family == "sdxl", data, args)
        )
    pipe = pipe.to(dtype=ours_dtype) if ours_dtype != plain_dtype else pipe
    entry = models.wrap_pipeline(pipe, models.PipelineKey(f"bench:{family}", str(ours_dtype), str(device)))
    for batch, plain in plain_gen.items():
        ours = run_guarded(
            report,
            f"gen {label} b{batch} ours",
            lambda b=batch: time_calls(
                clock,
                lambda: ours_generate(entry, b, size, args.steps, compile=False),
                runs,
                per=b,
                warmups=args.gen_warmups,
            ),
        )
        report.results[f"gen {family} b{batch} plain"] = plain
        report.compare(
            f"gen {label} {args.steps} steps b{batch}, eager",
            plain,
            ours,
            "s/img",
            f"ours {str(ours_dtype).removeprefix('torch.')}, no compile",
            estimate(family, args.tiny, size, batch, generate=True),
        )
    if "train" in args.only:
        precision = "bf16" if cuda else "fp32"
        ours = run_guarded(
            report,
            f"train {label} ours",
            lambda: ours_train(clock, entry, data, args, compile=False, precision=precision),
        )
        report.results[f"train {family} plain"] = plain_train
        report.results[f"train {family} eager"] = ours
        note = f"rank {args.rank} b{args.train_batch}; cached latents+text, {precision}"
        if ours:
            note += f", setup {ours.setup:.1f} s"
        planned = estimate(family, args.tiny, size, args.train_batch, rank=args.rank, precision=precision)
        report.compare(f"train {label} b{args.train_batch}, eager", plain_train, ours, "s/step", note, planned)
        overhead = run_guarded(
            report, f"train {label} checkpoints", lambda: checkpoint_overhead(clock, entry, data, args, precision)
        )
        if overhead:
            report.line(f"| train {label} b{args.train_batch}, checkpoint overhead | | | | | {overhead} |")
    free(entry, pipe)


def compiled_phase(family: str, args: argparse.Namespace, device: torch.device, report: Report) -> None:
    """This runner with torch.compile: generation (reduce-overhead) and training."""
    clock = Clock(device)
    size = args.size or (32 if args.tiny else (512 if family == "sd15" else 1024))
    label = f"{family} {size}px"
    dtype = models.inference_dtype(device)
    pipe = build(family, args.tiny, device, dtype)
    entry = models.wrap_pipeline(pipe, models.PipelineKey(f"bench:{family}", str(dtype), str(device)))
    batches = args.batches

    def gen(batch: int) -> None:
        if not report.allows(f"gen {family}"):
            return
        ours = run_guarded(
            report,
            f"gen {label} b{batch} compiled",
            lambda: time_calls(
                clock, lambda: ours_generate(entry, batch, size, args.steps, compile=True), 3, per=batch
            ),
        )
        if ours:
            report.compare(
                f"gen {label} {args.steps} steps b{batch}, compiled",
                report.results.get(f"gen {family} b{batch} plain"),
                ours,
                "s/img",
                f"reduce-overhead; first call (compile warm-up) {ours.first:.1f} s",
                estimate(family, args.tiny, size, batch, generate=True),
            )

    def reset() -> None:  # frees the CUDA graph pools before a memory-measured section
        torch._dynamo.reset()
        entry.compiled = None
        entry.warm_shapes.clear()
        free()

    if "gen" in args.only and batches:
        gen(batches[0])
        reset()
    if "train" in args.only and report.allows(f"train {family}"):
        data = dataset(size)
        precision = "bf16" if device.type == "cuda" else "fp32"
        ours = run_guarded(
            report,
            f"train {label} compiled",
            lambda: ours_train(clock, entry, data, args, compile=True, precision=precision),
        )
        if ours:
            report.results[f"train {family} compiled"] = ours
            report.compare(
                f"train {label} b{args.train_batch}, compiled",
                report.results.get(f"train {family} plain"),
                ours,
                "s/step",
                f"first step (compile warm-up) {ours.first:.1f} s",
                estimate(family, args.tiny, size, args.train_batch, rank=args.rank, precision=precision),
            )
        reset()
    if "gen" in args.only:
        for batch in batches[1:]:
            gen(batch)
    free(entry, pipe)


# --- FLUX.1 ------------------------------------------------------------------------------------


def build_flux(tiny: bool, device: torch.device, dtype: torch.dtype) -> Any:
    """FLUX.1-dev-size pipeline (12 B transformer, T5-XXL- and CLIP-L-size encoders, 16-channel
    VAE) built by the family with random weights directly on ``device`` in ``dtype``; or the
    builtin tiny one."""
    torch.manual_seed(0)
    pipe = build_tiny_pipeline(FLUX.builtin).to(device, dtype) if tiny else FLUX.build_full(device, dtype)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# train_dreambooth_lora_flux.py's default --lora_layers: the worker trains the same modules in the
# FLUX.1 rows (its own default, "all", trains more), at the same rank and alpha
RECIPE_FLUX_TARGETS = ("to_k", "to_q", "to_v", "to_out.0", "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")
RECIPE_FLUX_TARGETS += ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


class FluxRecipeTrainer:
    """The diffusers ``train_dreambooth_lora_flux.py`` step as it runs for a single instance
    prompt: the prompt embeddings computed once and the text encoders freed (here: moved to the
    CPU, since the pipeline is shared), the VAE every step, or (``cache_latents``, its
    ``--cache_latents``) the latent distributions encoded once and the VAE freed too; bf16
    weights, the LoRA (its default targets) in fp32, AdamW, uniform sigmas, the loss read back
    every step. The constructor is the setup; :meth:`close` brings the encoders back."""

    def __init__(
        self, pipe: Any, images: list[Image.Image], captions: list[str], rank: int, cache_latents: bool
    ) -> None:
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        from services.gpu.train.trainer import pixel_tensor

        self.pipe = pipe
        self.device = pipe.transformer.device
        with torch.no_grad():
            self.embeds, self.pooled, self.text_ids = pipe.encode_prompt(
                prompt=[captions[0]], prompt_2=None, device=self.device, max_sequence_length=512
            )
        self.parked = ["text_encoder", "text_encoder_2"]
        self.pixels, self.cursor = pixel_tensor(images), 0
        self.latents: list[Any] = []
        if cache_latents:
            with torch.no_grad():
                for i in range(len(images)):
                    pixels = self.pixels[i : i + 1].to(self.device, pipe.vae.dtype)
                    self.latents.append(pipe.vae.encode(pixels).latent_dist)
            self.parked.append("vae")
        for name in self.parked:
            getattr(pipe, name).to("cpu")
        free()
        pipe.transformer.add_adapter(
            LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(RECIPE_FLUX_TARGETS))
        )
        cast_training_params(pipe.transformer, dtype=torch.float32)
        self.params = [p for p in pipe.transformer.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=1e-4)

    def step(self) -> None:
        import torch.nn.functional as F

        pipe, i = self.pipe, self.cursor % len(self.pixels)
        self.cursor += 1
        with torch.no_grad():
            if self.latents:
                latents = self.latents[i].sample()
            else:
                pixels = self.pixels[i : i + 1].to(self.device, pipe.vae.dtype)
                latents = pipe.vae.encode(pixels).latent_dist.sample()
            latents = (latents - pipe.vae.config.shift_factor) * pipe.vae.config.scaling_factor
        b, c, h, w = latents.shape
        noise = torch.randn_like(latents)
        sigma = torch.rand((b,), device=self.device).view(-1, 1, 1, 1).to(latents.dtype)
        noisy = (1 - sigma) * latents + sigma * noise
        packed = pipe._pack_latents(noisy, b, c, h, w)
        ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, self.device, latents.dtype)
        guidance = torch.full((b,), 3.5, device=self.device)
        out = pipe.transformer(
            hidden_states=packed,
            timestep=sigma.flatten(),
            guidance=guidance,
            pooled_projections=self.pooled,
            encoder_hidden_states=self.embeds,
            txt_ids=self.text_ids,
            img_ids=ids,
            return_dict=False,
        )[0]
        prediction = pipe._unpack_latents(
            out, h * pipe.vae_scale_factor, w * pipe.vae_scale_factor, pipe.vae_scale_factor
        )
        loss = F.mse_loss(prediction.float(), (noise - latents).float())
        loss.backward()
        loss.item()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()

    def close(self) -> None:
        self.pipe.transformer.unload_lora()
        for name in self.parked:
            getattr(self.pipe, name).to(self.device)
        self.latents = []


def flux_phase(args: argparse.Namespace, device: torch.device, report: Report, compile: bool) -> None:
    """FLUX.1-dev-size rows: generation (plain bf16 FluxPipeline vs this runner, eager and
    compiled) and a LoRA rank 16 step at batch 1 (the dreambooth recipe vs this runner)."""
    clock = Clock(device)
    size = args.size or (32 if args.tiny else 1024)
    steps = 4 if args.tiny else 28
    label = f"flux {size}px"
    dtype = models.inference_dtype(device)
    pipe = build_flux(args.tiny, device, dtype)
    entry = models.wrap_pipeline(pipe, models.PipelineKey("bench:flux", str(dtype), str(device)))

    def plain_call() -> Any:
        generator = torch.Generator("cpu").manual_seed(0)
        return pipe(
            prompt=PROMPT, height=size, width=size, num_inference_steps=steps, generator=generator, output_type="np"
        )

    def ours_call(compiled: bool) -> Any:
        request = GenerationRequest(prompt=PROMPT, width=size, height=size, seed=0, steps=steps)
        return render(entry, request, None, compile=compiled)

    if "gen" in args.only:
        plain = run_guarded(report, f"gen {label} plain", lambda: time_calls(clock, plain_call, 2, per=1))
        for compiled in (False, True) if compile else (False,):
            if compiled and not report.allows("gen flux"):
                continue
            ours = run_guarded(
                report, f"gen {label} ours", lambda c=compiled: time_calls(clock, lambda: ours_call(c), 2, per=1)
            )
            reference = np.asarray(plain_call().images[0], dtype=np.float32)
            mine = np.asarray(ours_call(compiled)[0], dtype=np.float32) / 255.0
            note = f"max |pixel diff| vs plain {np.abs(reference - mine).max():.4f} (0..1)"
            report.compare(
                f"gen {label} {steps} steps b1, {'compiled' if compiled else 'eager'}", plain, ours, "s/img", note
            )
    if "train" in args.only:
        flux_train_rows(args, clock, pipe, entry, size, report, compile)
    free(entry, pipe)


def flux_train_rows(
    args: argparse.Namespace, clock: Clock, pipe: Any, entry: Any, size: int, report: Report, compile: bool
) -> None:
    """A LoRA step at batch 1, like for like: both sides train the recipe's 12 target modules at
    the same rank on one instance prompt, the recipe with its prompt embeddings precomputed and
    (second row) ``--cache_latents``, peaks reset after setup on both sides. Then this runner
    with ``cpu_offload`` (:func:`offload_row`) and with gradient checkpointing, the baseline of
    the NF4 row (:func:`flux_nf4_row`)."""
    label = f"flux {size}px"
    images, _captions = dataset(size, count=4)
    data = (images, ["a photo of sks dog"] * len(images))  # one instance prompt, as the recipe runs
    train_args = argparse.Namespace(**{**vars(args), "train_batch": 1})
    precision = "bf16" if clock.cuda else "fp32"
    planned = estimate("flux", args.tiny, size, 1, rank=args.rank, targets="attention+mlp", precision=precision)
    recipes = {}
    for cache_latents in (False, True):
        name = "recipe --cache_latents" if cache_latents else "recipe"
        recipes[name] = run_guarded(
            report,
            f"train {label} {name}",
            lambda c=cache_latents: timed_steps(
                clock, lambda: FluxRecipeTrainer(pipe, *data, rank=args.rank, cache_latents=c), train_args
            ),
        )
    report.results["train flux plain"] = recipes["recipe --cache_latents"]
    for compiled in (False, True) if compile else (False,):
        if compiled and not report.allows("train flux"):
            continue
        variant = "compiled" if compiled else "eager"
        ours = run_guarded(
            report,
            f"train {label} {variant}",
            lambda c=compiled: ours_train(
                clock, entry, data, train_args, compile=c, precision=precision, targets=RECIPE_FLUX_TARGETS
            ),
        )
        report.results[f"train flux {variant}"] = ours
        for name, recipe in recipes.items():
            report.compare(
                f"train {label} b1 r{args.rank}, {name} vs ours {variant}",
                recipe,
                ours,
                "s/step",
                "same 12 modules and rank; embeddings precomputed on both sides; "
                + ("latents cached on both" if "cache" in name else "recipe encodes the latents every step"),
                planned,
            )
    offload_row(args, clock, entry, data, train_args, precision, report)
    ckpt = run_guarded(
        report,
        f"train {label} checkpointing",
        lambda: ours_train(
            clock,
            entry,
            data,
            train_args,
            compile=False,
            precision=precision,
            checkpointing=True,
            targets=RECIPE_FLUX_TARGETS,
        ),
    )
    report.results["train flux bf16 checkpointing"] = ckpt
    report.compare(
        f"train {label} b1 r{args.rank}, ours eager vs ours + checkpointing",
        report.results.get("train flux eager"),
        ckpt,
        "s/step",
        "what checkpointing costs in time and saves in memory",
        estimate(
            "flux", args.tiny, size, 1, rank=args.rank, targets="attention+mlp", precision=precision, checkpointing=True
        ),
    )


def offload_row(
    args: argparse.Namespace,
    clock: Clock,
    entry: Any,
    data: tuple,
    train_args: argparse.Namespace,
    precision: str,
    report: Report,
) -> None:
    """This runner resident against ``cpu_offload`` (services.gpu.placement): the setup's time
    and peak (T5 alone on the GPU, the transformer parked) and the steps' time and peak."""
    from services.gpu.memory.estimate import GIB
    from services.gpu.memory.planner import TrainJob, train_phases

    resident = report.results.get("train flux eager")
    entry.placement.set_offload(True)
    try:
        offloaded = run_guarded(
            report,
            "train flux cpu_offload",
            lambda: ours_train(
                clock, entry, data, train_args, compile=False, precision=precision, targets=RECIPE_FLUX_TARGETS
            ),
        )
    finally:
        entry.placement.set_offload(False)
    job = TrainJob(
        args.size or (32 if args.tiny else 1024),
        args.size or (32 if args.tiny else 1024),
        rank=args.rank,
        targets="attention+mlp",
        precision=precision,
        images=len(data[0]),
    )
    phases = {
        "resident": train_phases(_spec("flux", args.tiny), job, False, "none", False),
        "offload": train_phases(_spec("flux", args.tiny), job, False, "none", True),
    }

    def setup(t: Timing | None, name: str) -> str:
        measured = "-" if t is None or t.setup_peak_gib is None else f"{t.setup_peak_gib:.1f}"
        seconds = "-" if t is None else f"{t.setup:.1f} s"
        return f"{name} setup {seconds}, peak {measured} GiB (est. {phases[name]['setup'] / GIB:.1f})"

    report.compare(
        f"train flux b1 r{args.rank}, ours resident vs cpu_offload",
        resident,
        offloaded,
        "s/step",
        f"{setup(resident, 'resident')}; {setup(offloaded, 'offload')}",
        phases["offload"]["training"] / GIB,
    )


def flux_nf4_row(args: argparse.Namespace, device: torch.device, report: Report) -> None:
    """FLUX.1 LoRA training on the NF4 base against the bf16 base, both with gradient
    checkpointing (the 24 GB card configuration). A phase of its own, so the bf16 FLUX.1 of
    :func:`flux_phase` is gone from the GPU; the peak is reset after setup (the packing)."""
    from services.gpu.quantize import quantize_linear_layers

    clock = Clock(device)
    size = args.size or (32 if args.tiny else 1024)
    dtype = models.inference_dtype(device)
    pipe = build_flux(args.tiny, device, dtype)  # bf16 until packed
    quantize_linear_layers(pipe.transformer, dtype, device)
    key = models.PipelineKey("bench:flux", f"nf4-{str(dtype).removeprefix('torch.')}", str(device))
    entry = models.wrap_pipeline(pipe, key)
    images, _captions = dataset(size, count=4)
    data = (images, ["a photo of sks dog"] * len(images))
    nf4_args = argparse.Namespace(**{**vars(args), "train_batch": 1})
    precision = "bf16" if device.type == "cuda" else "fp32"
    ours = ours_train(
        clock,
        entry,
        data,
        nf4_args,
        compile=False,
        precision=precision,
        checkpointing=True,
        targets=RECIPE_FLUX_TARGETS,
    )
    report.compare(
        f"train flux {size}px b1 r{args.rank}, bf16 vs NF4 base, both checkpointing",
        report.results.get("train flux bf16 checkpointing"),
        ours,
        "s/step",
        "the NF4 base's cost in time, its saving in memory (24 GB card)",
        estimate(
            "flux",
            args.tiny,
            size,
            1,
            rank=args.rank,
            targets="attention+mlp",
            precision=precision,
            checkpointing=True,
            quantize="nf4",
        ),
    )
    free(entry, pipe)


def projections(report: Report, args: argparse.Namespace) -> None:
    """A 1000-step job end to end: setup + warm-up + steps."""
    steps = 1000
    for family in ("sd15", "sdxl", "flux"):
        plain = report.results.get(f"train {family} plain")
        if plain is None:
            continue
        recipe = steps * plain.per_item
        for variant in ("eager", "compiled"):
            ours = report.results.get(f"train {family} {variant}")
            if ours is None:
                continue
            warm = ours.first if variant == "compiled" else 0.0
            total = ours.setup + warm + steps * ours.per_item
            note = f"compile warm-up {warm:.1f} s (cold inductor cache)" if warm else "no compile"
            batch = 1 if family == "flux" else args.train_batch
            report.line(
                f"| {steps}-step job {family} b{batch}, {variant} (s, incl. setup and "
                f"warm-up) | {recipe:.1f} s | {total:.1f} s | {recipe / total:.2f}x | | {note} |"
            )
    from services.gpu.train.compile_policy import TRAIN_COMPILE_MIN_STEPS, TRAIN_COMPILE_MIN_STEPS_WARM

    report.line(
        f"| policy | | | | | with COMPILE unset the worker compiles training from {TRAIN_COMPILE_MIN_STEPS} "
        f"steps ({TRAIN_COMPILE_MIN_STEPS_WARM} with a warm inductor cache on the volume); generation always on CUDA |"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="builtin tiny models (CPU smoke run)")
    parser.add_argument("--only", default="gen,train", help="comma list of sections: gen, train")
    parser.add_argument("--sdxl", action=argparse.BooleanOptionalAction, default=True, help="SDXL-size rows")
    parser.add_argument(
        "--compile", action=argparse.BooleanOptionalAction, default=None, help="compiled rows (default: on with CUDA)"
    )
    parser.add_argument(
        "--sdxl-compile", action=argparse.BooleanOptionalAction, default=True, help="compiled SDXL rows (long warm-up)"
    )
    parser.add_argument(
        "--flux-nf4", action=argparse.BooleanOptionalAction, default=True, help="FLUX.1 training on the NF4 base"
    )
    parser.add_argument("--flux", action=argparse.BooleanOptionalAction, default=True, help="FLUX.1-size rows")
    parser.add_argument("--steps", type=int, default=None, help="generation steps (25; tiny 4)")
    parser.add_argument("--batches", default="1,4", help="generation batch sizes")
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps (15; tiny 3)")
    parser.add_argument("--warmup-steps", type=int, default=3, help="untimed training steps first")
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--size", type=int, default=None, help="override the image size")
    parser.add_argument(
        "--budget", type=float, default=400.0, help="seconds; compiled sections whose warm-up would pass it are skipped"
    )
    args = parser.parse_args(argv)
    args.only = {part.strip() for part in args.only.split(",") if part.strip()}
    args.batches = [int(part) for part in args.batches.split(",") if part.strip()]
    args.steps = args.steps or (4 if args.tiny else 25)
    args.train_steps = args.train_steps or (3 if args.tiny else 15)
    args.warmup_steps = 1 if args.tiny else max(1, args.warmup_steps)
    args.gen_warmups = 2 if args.tiny else 1  # oneDNN sets up per shape on the first CPU calls
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = models.runtime_device()
    compile = device.type == "cuda" if args.compile is None else args.compile
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU"
    print(
        f"bench/gpu.py on {name}; torch {torch.__version__}; tiny={args.tiny}; compile={compile}; "
        f"sections={','.join(sorted(args.only))}; sdxl={args.sdxl}; budget {args.budget:.0f} s",
        flush=True,
    )
    if args.tiny and device.type == "cpu":
        torch.set_num_threads(1)  # tiny models gain nothing from threads; shared CI cores stall them
        print("smoke run: CPU timings of the tiny models exercise the code paths, they measure nothing", flush=True)
    report = Report(args.budget)
    phases: list[tuple[str, Callable[[], None]]] = [
        (f"{family} eager phase", lambda f=family: eager_phase(f, args, device, report))
        for family in (["sd15", "sdxl"] if args.sdxl else ["sd15"])
    ]
    if compile:
        phases.append(("sd15 compiled phase", lambda: compiled_phase("sd15", args, device, report)))
        if args.sdxl and (args.sdxl_compile or args.tiny):
            phases.append(("sdxl compiled phase", lambda: compiled_phase("sdxl", args, device, report)))
    if args.flux:
        phases.append(("flux phase", lambda: flux_phase(args, device, report, compile)))
        if "train" in args.only and args.flux_nf4:
            phases.append(("flux nf4 phase", lambda: flux_nf4_row(args, device, report)))
    for what, phase in phases:
        run_guarded(report, what, phase)
        torch._dynamo.reset()  # drops compiled graphs and their CUDA graph pools
        free()
    projections(report, args)
    print(f"\nsummary ({report.elapsed():.0f} s)\n{Report.HEADER}\n|---|---|---|---|---|---|", flush=True)
    for row in report.rows:
        print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
