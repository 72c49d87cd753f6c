"""Choose a memory plan for a job: the cheapest settings whose estimated peak fits the card.

Pure functions of a :class:`ModelSpec`, the job's settings and the card's memory (GiB). A plan
sets three things: gradient checkpointing, the frozen base in bf16 or NF4, and ``cpu_offload``
(the text encoders, the VAE and the caches on the CPU, on the device only while they run:
:mod:`services.gpu.placement`). Plans, cheapest (fastest) first: the base in bf16 before NF4
(NF4 dequantizes every matmul and is lossy); within each, checkpointing off before on (it
recomputes every block: about 30 % of each step); within each, every component resident before
``cpu_offload`` (a few seconds of transfers per job). A plan fits when
``peak * (1 + MARGIN) + RESERVE_GIB <= card``: the margin covers the allocator's fragmentation
and what the estimate leaves out (autocast's fp32 copies, cuBLAS workspaces); the reserve the
CUDA context. A job's explicit ``gradient_checkpointing``, ``quantize_base`` or ``cpu_offload``
restricts the plans to that value; when no plan fits, :class:`InputError` names the estimate,
the card and the smallest card (or the option) that would fit.

The peak is the largest of the job's phases, as the trainer runs them:

- ``setup``: the caches being filled. Resident: the whole pipeline, the VAE encoding one image
  at a time, the caches. Offloaded: the text encoders, then the VAE, alone on the device (a bf16
  denoiser waits on the CPU; an NF4 one stays), the caches on the CPU.
- ``training``: the denoiser, the LoRA with its gradient and AdamW state, the caches (resident),
  the kept activations and the backward's buffers; the encoders leave the device once everything
  is cached.
- ``sampling``: the denoiser and the LoRA, one encoder at a time and one forward's transient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from services.errors import InputError
from services.gpu.memory.estimate import GIB, LORA_BYTES, NF4_BYTES, activation_bytes, blocks, inference_bytes
from services.gpu.memory.specs import ModelSpec

MARGIN = 0.10
RESERVE_GIB = 1.0
# What RunPod rents, by class: the usable GiB (nvidia-smi's total) of the smaller card of each:
# 24 GB: L4 22.5 (RTX 4090 24.0); 32 GB: RTX 5090; 48 GB: L40S 45.0 (A6000 48.0); 80 GB: H100
# 79.6 (A100 80.0); 141 GB: H200. The CUDA context comes out of RESERVE_GIB.
CARDS = {24: 22.49, 32: 31.84, 48: 44.99, 80: 79.65, 141: 140.4}
CARDS_GB = tuple(CARDS)
VAE_ENCODE_PER_PIXEL = 768.0  # one image (VAE slicing), 128 channels, 3 live tensors, bf16: to measure
WEIGHT_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# (gradient_checkpointing, quantize_base, cpu_offload), cheapest first (see the module docstring)
PLANS = tuple((c, q, o) for q in ("none", "nf4") for c in (False, True) for o in (False, True))
GENERATION_PLANS = tuple((q, o) for q in ("none", "nf4") for o in (False, True))
SETTINGS = ("gradient_checkpointing", "quantize_base", "cpu_offload")


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
    caption_variants: int = 1  # cached texts per image: shuffle_caption's orders (+ the empty one)


@dataclass(frozen=True)
class Plan:
    """The chosen settings, the estimated peak and each phase (GiB), and the card.

    ``chosen``: the settings the plan chose, with their values (those the job left open);
    ``gradient_checkpointing`` is None for generation."""

    gradient_checkpointing: bool | None
    quantize_base: str
    cpu_offload: bool
    peak_gib: float
    needed_gib: float
    card_gib: float
    phases: dict[str, float] = field(default_factory=dict)
    chosen: dict[str, Any] = field(default_factory=dict)
    model: str = ""

    @property
    def fits(self) -> bool:
        return self.needed_gib <= self.card_gib

    def settings(self) -> str:
        parts = [] if self.gradient_checkpointing is None else [f"gradient_checkpointing {self.gradient_checkpointing}"]
        return ", ".join([*parts, f"quantize_base {self.quantize_base}", f"cpu_offload {self.cpu_offload}"])

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
    return (latents + text * job.caption_variants) * job.images


def train_phases(
    spec: ModelSpec, job: TrainJob, checkpointing: bool, quantize: str, offload: bool = False
) -> dict[str, float]:
    """Bytes of each phase of the job under one plan."""
    weight = WEIGHT_BYTES[job.precision]
    denoiser = spec.denoiser_params * (NF4_BYTES if quantize == "nf4" else weight)
    text, largest = spec.text_encoder_params * weight, spec.largest_text_encoder * weight
    vae = spec.vae_params * weight
    vae_run = vae + VAE_ENCODE_PER_PIXEL * job.height * job.width
    targets = job.targets or spec.default_targets
    lora = spec.lora_per_rank.get(targets, max(spec.lora_per_rank.values(), default=0)) * job.rank * LORA_BYTES
    caches = 0.0 if offload else _caches(spec, job)
    model = blocks(spec, job.height, job.width)
    kept = activation_bytes(spec, job.height, job.width, job.batch, checkpointing, job.precision)
    step = kept + model.backward * job.batch
    cached = job.cache_latents and job.cache_text
    # what encodes during a step when something is not cached
    encoding = (0.0 if job.cache_text else text) + (0.0 if job.cache_latents else vae_run)
    if offload:
        setup = (denoiser if quantize == "nf4" else 0.0) + max(text, vae_run)
        on_demand = 0.0 if cached else _one_at_a_time(spec, weight, vae_run, quantize)
        training = lora + max(denoiser + step, on_demand)
    else:
        setup = denoiser + text + vae_run + caches
        training = denoiser + lora + caches + step + encoding
    phases = {"setup": setup, "training": training}
    if job.samples:
        inference = inference_bytes(spec, job.height, job.width, 1)
        if offload:  # the encoders come to the device one at a time, the largest alone
            phases["sampling"] = lora + max(denoiser + inference, _one_at_a_time(spec, weight, vae, quantize))
        elif cached:  # one at a time beside the denoiser
            phases["sampling"] = denoiser + lora + caches + max(largest, vae) + inference
        else:
            phases["sampling"] = denoiser + lora + caches + text + vae + inference
    return phases


def _one_at_a_time(spec: ModelSpec, weight: int, vae: float, quantize: str) -> float:
    """The peak of the encoders coming to the device one at a time beside the denoiser, the
    largest text encoder alone (a bf16 denoiser waits on the CPU; an NF4 one stays)."""
    denoiser = spec.denoiser_params * (NF4_BYTES if quantize == "nf4" else weight)
    largest, second = spec.largest_text_encoder * weight, spec.second_text_encoder * weight
    if quantize == "nf4":
        return denoiser + max(largest, vae)
    return max(largest, denoiser + max(second, vae))


def _plan(phases: dict[str, float], settings: tuple[Any, ...], card: float, chosen: dict[str, Any], model: str) -> Plan:
    gib = {k: round(v / GIB, 2) for k, v in phases.items()}
    peak = max(gib.values())
    ckpt, quant, offload = settings
    return Plan(ckpt, quant, offload, peak, round(needed(peak), 2), round(card, 2), gib, chosen, model)


def _choose(plans: list[Plan], card: float, what: str, free: list[Plan]) -> Plan:
    """The first plan that fits, else :class:`InputError` naming the smallest plan, and what would
    fit: this card without the job's explicit settings (``free``), and the smallest rented card
    with them (or, when none, without them)."""
    if not plans:
        raise InputError(f"input: no memory plan has these settings for {what}")
    for plan in plans:
        if plan.fits:
            return plan
    smallest = min(plans, key=lambda p: p.needed_gib)
    parts = [
        f"input.base_model: {what} does not fit a {card:.1f} GiB card: its smallest plan ({smallest.settings()}) "
        f"peaks at about {smallest.peak_gib:.1f} GiB and needs {smallest.needed_gib:.1f} GiB with the margin."
    ]
    fitting = [p for p in free if p.fits]
    if fitting:
        parts.append(f"Without the explicit setting it fits this card with {fitting[0].settings()}.")
    card_with = _smallest_card(plans)
    if card_with is not None:
        lead = "With your settings, the smallest card" if free else "The smallest card"
        parts.append(f"{lead} that fits it: {card_with}.")
    elif not fitting:
        card_without = _smallest_card(free)
        parts.append(
            f"Without the explicit setting, the smallest card that fits it: {card_without}."
            if card_without
            else "No rented card fits it: lower the resolution or batch_size."
        )
    raise InputError(" ".join(parts))


def _smallest_card(plans: list[Plan]) -> str | None:
    """The smallest rented card some plan fits, with the plan it would take (the cheapest)."""
    for gb, capacity in CARDS.items():
        chosen = next((p for p in plans if p.needed_gib <= capacity), None)
        if chosen is not None:
            return f"{gb} GB ({capacity:g} GiB), with {chosen.settings()}"
    return None


def _explicit(values: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The settings left open, and a test of a plan's settings against the explicit ones."""
    open_ = {name: None for name, value in values.items() if value is None}

    def allowed(settings: dict[str, Any]) -> bool:
        return all(value is None or settings[name] == value for name, value in values.items())

    return open_, allowed


def plan_training(
    spec: ModelSpec,
    job: TrainJob,
    card_gib: float,
    checkpointing: bool | None = None,
    quantize: str | None = None,
    offload: bool | None = None,
) -> Plan:
    """The cheapest plan that fits ``card_gib``; explicit settings restrict the choice.
    Raises :class:`InputError` when none fits."""
    open_, allowed = _explicit(
        {"gradient_checkpointing": checkpointing, "quantize_base": quantize, "cpu_offload": offload}
    )
    every, plans = [], []
    for settings in PLANS:
        named = dict(zip(SETTINGS, settings, strict=True))
        if settings[1] == "nf4" and job.adapter:
            continue  # a training adapter is merged into the base weights: not into NF4 ones
        chosen = {name: named[name] for name in open_}
        plan = _plan(train_phases(spec, job, *settings), settings, card_gib, chosen, spec.name)
        every.append(plan)
        if allowed(named):
            plans.append(plan)
    what = f"train_lora of {spec.name} at {job.width}x{job.height}, batch {job.batch}, rank {job.rank}"
    return _choose(plans, card_gib, what, every if len(open_) < len(SETTINGS) else [])


def generation_bytes(spec: ModelSpec, height: int, width: int, images: int, quantize: str, offload: bool) -> float:
    """The generation's peak: the denoiser beside the encoders (all of them, or with
    ``cpu_offload`` one at a time, the largest alone), one forward's and the VAE decode's transient."""
    weight = WEIGHT_BYTES["bf16"]
    denoiser = spec.denoiser_params * (NF4_BYTES if quantize == "nf4" else weight)
    inference = inference_bytes(spec, height, width, images)
    vae = spec.vae_params * weight
    if offload:
        return max(denoiser + inference, _one_at_a_time(spec, weight, vae, quantize))
    return denoiser + spec.text_encoder_params * weight + vae + inference


def plan_generation(
    spec: ModelSpec,
    height: int,
    width: int,
    images: int,
    card_gib: float,
    quantize: str | None = None,
    offload: bool | None = None,
) -> Plan:
    """The cheapest generation plan that fits ``card_gib`` (bf16 before NF4, resident before
    ``cpu_offload``); explicit settings restrict the choice. Raises :class:`InputError` when none fits."""
    open_, allowed = _explicit({"quantize_base": quantize, "cpu_offload": offload})
    every, plans = [], []
    for quant, off in GENERATION_PLANS:
        named = {"quantize_base": quant, "cpu_offload": off}
        chosen = {name: named[name] for name in open_}
        phases = {"generation": generation_bytes(spec, height, width, images, quant, off)}
        plan = _plan(phases, (None, quant, off), card_gib, chosen, spec.name)
        every.append(plan)
        if allowed(named):
            plans.append(plan)
    what = f"generate of {spec.name} at {width}x{height}, {images} image(s)"
    return _choose(plans, card_gib, what, every if len(open_) < 2 else [])
