"""``dry_run: true`` on ``train_lora`` and ``generate``: the memory plan, nothing else.

Answered before the lease, the dataset or any storage call, and without loading weights: the
plan comes from the model's configs (services.gpu.memory), so a CPU worker answers too.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

from services.errors import InputError
from services.gpu.params import GenerateInput, TrainLoraInput
from services.job.context import JobContext


class MemoryPlanResult(BaseModel):
    """What a dry run returns (README, Memory plans)."""

    dry_run: bool = Field(True, description="Always true: nothing was loaded, trained or generated.")
    model: str = Field(description="The base model planned for.")
    card_gib: float | None = Field(description="The card planned for: gpu_memory_gb, else this worker's GPU.")
    fits: bool | None = Field(description="Whether the job fits that card; null on a CPU worker without gpu_memory_gb.")
    plan: dict[str, Any] | None = Field(
        description="The chosen plan: gradient_checkpointing, quantize_base, cpu_offload, peak_gib, needed_gib, "
        "phases (GiB), chosen (the settings the plan chose, with their values)."
    )
    message: str = Field("", description="Why the job does not fit, and the smallest card or option that would.")
    cards: dict[str, Any] = Field(
        default_factory=dict,
        description="The plan (or the refusal) on each rented card class: 24, 32, 48, 80, 141 GB, each at the "
        "usable memory of its smaller card (L4 22.5, RTX 5090 31.8, L40S 45.0, H100 79.6, H200 140.4 GiB).",
    )


def _answer(plan_of: Any, request: Any, model: str) -> MemoryPlanResult:
    from services.gpu.memory.planner import CARDS

    cards: dict[str, Any] = {}
    for gb, capacity in CARDS.items():
        try:
            cards[str(gb)] = plan_of(request.model_copy(update={"gpu_memory_gb": capacity})).metrics()
        except InputError as exc:
            cards[str(gb)] = {"fits": False, "message": str(exc)}
    try:
        plan = plan_of(request)
    except InputError as exc:
        if "does not fit" not in str(exc):
            raise
        return MemoryPlanResult(
            model=model, card_gib=request.gpu_memory_gb, fits=False, plan=None, message=str(exc), cards=cards
        )
    if plan is None:
        return MemoryPlanResult(model=model, card_gib=None, fits=None, plan=None, cards=cards)
    # a plan comes back only when it fits; one that does not is the InputError above
    return MemoryPlanResult(
        model=model, card_gib=plan.card_gib, fits=plan.fits, plan=plan.metrics(), message="", cards=cards
    )


async def dry_run_train(request: TrainLoraInput, ctx: JobContext) -> MemoryPlanResult:
    """The memory plan of a ``train_lora`` job (``DRY_RUN_IMAGES`` images assumed in the caches)."""
    from services.gpu.memory.jobs import spec_for, train_plan

    model = request.base_model or ctx.settings.model_id
    spec = await ctx.in_thread("reading the model's configs", spec_for, model, ctx.settings)
    return _answer(lambda r: train_plan(r, ctx.settings, spec=spec), request, model)


async def dry_run_generate(request: GenerateInput, ctx: JobContext) -> MemoryPlanResult:
    """The memory estimate of a ``generate`` job."""
    from services.gpu.memory.jobs import generate_plan, spec_for

    model = request.base_model or ctx.settings.model_id
    spec = await ctx.in_thread("reading the model's configs", spec_for, model, ctx.settings)
    return _answer(lambda r: generate_plan(r, ctx.settings, spec), request, model)
