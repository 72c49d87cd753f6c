"""Choose a memory plan for a job: the cheapest settings whose estimated peak fits the card.

Pure functions of a :class:`ModelSpec`, the job's settings and the card's memory (GiB). Plans,
cheapest (fastest) first: bf16 base without gradient checkpointing, bf16 with it, NF4 without,
NF4 with. A plan fits when ``peak * (1 + MARGIN) + RESERVE_GIB <= card``: the margin covers the
allocator's fragmentation and what the estimate leaves out (autocast's fp32 copies, cuBLAS
workspaces); the reserve the CUDA context. A job's explicit ``gradient_checkpointing`` or
``quantize_base`` restricts the plans to that value; when no plan fits, :class:`InputError`
names the estimate, the card and the smallest card (or option) that would fit.

The peak is the largest of the job's phases, as the trainer runs them today: ``setup`` (the
whole pipeline on the GPU, the VAE encoding one image at a time, the caches),
``training`` (the denoiser, the LoRA with its gradient and AdamW state, the caches, the kept
activations and the backward's buffers; the encoders on the CPU once everything is cached) and
``sampling`` (the encoders back beside the trained LoRA to render sample prompts).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from services.errors import InputError
from services.gpu.memory.estimate import GIB, LORA_BYTES, NF4_BYTES, activation_bytes, blocks, inference_bytes
from services.gpu.memory.specs import ModelSpec

MARGIN = 0.10
RESERVE_GIB = 1.0
CARDS_GB = (24, 48, 80, 141)  # what RunPod rents: RTX 4090 / L4, A6000 / L40S, A100 / H100, H200
VAE_ENCODE_PER_PIXEL = 768.0  # one image (VAE slicing), 128 channels, 3 live tensors, bf16: to measure
WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
PLANS = ((False, "none"), (True, "none"), (False, "nf4"), (True, "nf4"))


@dataclass(frozen=True)
class TrainJob:
    """What the planner needs of a ``train_lora`` job (sides in pixels; ``images``: cached)."""

    height: int
    width: int
    batch: int = 1
    rank: int = 16
    targets: str | None = None
    precision: str = "bf16"
    images: int = 100
    cache_latents: bool = True
    cache_text: bool = True
    samples: bool = False
    adapter: bool = False


@dataclass(frozen=True)
class Plan:
    """The chosen settings, the estimated peak and each phase (GiB), and the card."""

    gradient_checkpointing: bool | None
    quantize_base: str
    peak_gib: float
    needed_gib: float
    card_gib: float
    phases: dict[str, float] = field(default_factory=dict)
    chosen: list[str] = field(default_factory=list)  # the settings the plan chose (not the input)
    model: str = ""

    @property
    def fits(self) -> bool:
        return self.needed_gib <= self.card_gib

    def metrics(self) -> dict[str, Any]:
        data = asdict(self)
        data["fits"] = self.fits
        data["margin"] = f"peak x {1 + MARGIN:g} + {RESERVE_GIB:g} GiB"
        return data


def needed(peak_gib: float) -> float:
    return peak_gib * (1 + MARGIN) + RESERVE_GIB


def _caches(spec: ModelSpec, job: TrainJob) -> float:
    latents = 2 * 4 * spec.latent_channels * (job.height // 8) * (job.width // 8) if job.cache_latents else 0
    text = spec.text_tokens * spec.text_width * WEIGHT_BYTES[job.precision] if job.cache_text else 0
    return (latents + text) * job.images


def train_phases(spec: ModelSpec, job: TrainJob, checkpointing: bool, quantize: str) -> dict[str, float]:
    """Bytes of each phase of the job under one plan."""
    weight = WEIGHT_BYTES[job.precision]
    denoiser = spec.denoiser_params * (NF4_BYTES if quantize == "nf4" else weight)
    encoders = spec.encoder_params * weight
    targets = job.targets or spec.default_targets
    lora = spec.lora_per_rank.get(targets, max(spec.lora_per_rank.values(), default=0)) * job.rank * LORA_BYTES
    caches = _caches(spec, job)
    vae = VAE_ENCODE_PER_PIXEL * job.height * job.width
    model = blocks(spec, job.height, job.width)
    kept = activation_bytes(spec, job.height, job.width, job.batch, checkpointing, job.precision)
    offloaded = job.cache_latents and job.cache_text
    phases = {
        "setup": denoiser + encoders + caches + vae,
        "training": denoiser + (0 if offloaded else encoders) + lora + caches + kept + model.backward * job.batch,
    }
    if job.samples:
        phases["sampling"] = denoiser + encoders + lora + caches + inference_bytes(spec, job.height, job.width, 1)
    return phases


def _plan(spec: ModelSpec, job: TrainJob, card: float, ckpt: bool, quant: str, chosen: list[str]) -> Plan:
    phases = {k: round(v / GIB, 2) for k, v in train_phases(spec, job, ckpt, quant).items()}
    peak = max(phases.values())
    return Plan(ckpt, quant, peak, round(needed(peak), 2), round(card, 2), phases, chosen, spec.name)


def plan_training(
    spec: ModelSpec, job: TrainJob, card_gib: float, checkpointing: bool | None = None, quantize: str | None = None
) -> Plan:
    """The cheapest plan that fits ``card_gib``; explicit settings restrict the choice.
    Raises :class:`InputError` when none fits."""
    chosen = [
        name
        for name, value in (("gradient_checkpointing", checkpointing), ("quantize_base", quantize))
        if value is None
    ]
    allowed = [
        (c, q)
        for c, q in PLANS
        if (checkpointing is None or c == checkpointing)
        and (quantize is None or q == quantize)
        and not (q == "nf4" and job.adapter)
    ]
    plans = [_plan(spec, job, card_gib, c, q, chosen) for c, q in allowed]
    for plan in plans:
        if plan.fits:
            return plan
    raise InputError(_refusal(spec, job, card_gib, plans, checkpointing, quantize))


def _refusal(
    spec: ModelSpec, job: TrainJob, card: float, plans: list[Plan], ckpt: bool | None, quant: str | None
) -> str:
    smallest = min(plans, key=lambda p: p.needed_gib)
    what = f"train_lora of {spec.name} at {job.width}x{job.height}, batch {job.batch}, rank {job.rank}"
    setting = f"gradient_checkpointing {smallest.gradient_checkpointing}, quantize_base {smallest.quantize_base}"
    text = (
        f"input.base_model: {what} does not fit this GPU: its smallest plan ({setting}) peaks at about "
        f"{smallest.peak_gib:.1f} GiB and needs {smallest.needed_gib:.1f} GiB with the margin; the card has "
        f"{card:.1f} GiB. "
    )
    if ckpt is not None or quant is not None:
        free = [
            p for c, q in PLANS if (p := _plan(spec, job, card, c, q, [])).fits and not (q == "nf4" and job.adapter)
        ]
        if free:
            return text + (
                f"Without the explicit setting it fits this card with gradient_checkpointing "
                f"{free[0].gradient_checkpointing} and quantize_base {free[0].quantize_base}"
            )
    cards = [gb for gb in CARDS_GB if smallest.needed_gib <= gb]
    if cards:
        return text + f"The smallest card that fits it: {cards[0]} GB"
    return text + "No rented card fits it: lower resolution or batch_size"


def plan_generation(spec: ModelSpec, height: int, width: int, images: int, card_gib: float) -> Plan:
    """Generation: the whole pipeline in bf16, one forward's and the VAE decode's transient."""
    weights = (spec.denoiser_params + spec.encoder_params) * WEIGHT_BYTES["bf16"]
    run = weights + inference_bytes(spec, height, width, images)
    peak = round(run / GIB, 2)
    return Plan(None, "none", peak, round(needed(peak), 2), round(card_gib, 2), {"generation": peak}, [], spec.name)
