"""The memory plan of a ``train_lora`` or ``generate`` job: the model's spec, the card, the plan.

:func:`train_plan` is what the runner calls before loading weights and what a dry run returns;
:func:`apply_train_plan` folds the plan into the job's inputs (an explicit input always wins).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from services.errors import InputError
from services.gpu.catalog import BUILTIN_MODELS, SHUFFLE_VARIANTS
from services.gpu.memory.estimate import MODELLED_FAMILIES
from services.gpu.memory.planner import Plan, TrainJob, plan_generation, plan_training
from services.gpu.memory.specs import REPO_IDS, ModelSpec, spec_of_directory

if TYPE_CHECKING:
    from config.settings import Settings
    from services.gpu.params import GenerateInput, TrainLoraInput

log = logging.getLogger(__name__)

DRY_RUN_IMAGES = 100  # images (and captions) a dry run assumes in the caches
_SPECS: dict[tuple[str, float], ModelSpec] = {}  # described models: (folder or builtin, index mtime)


def spec_for(model: str, settings: Settings) -> ModelSpec:
    """The planner's view of ``model``: a known repo id, a directory's configs, or a builtin."""
    from services.gpu import models

    if model in REPO_IDS:
        return REPO_IDS[model]
    if model.startswith("/") and not (Path(model) / "model_index.json").is_file():
        raise InputError(f"input.base_model: {model} is not a diffusers pipeline directory (no model_index.json)")
    family = models.peek_family(model, settings)
    if family is None:
        known = ", ".join(REPO_IDS)
        raise InputError(f"input.base_model: no memory profile for {model}; use a local directory or one of {known}")
    if family.name not in MODELLED_FAMILIES:
        raise InputError(
            f"input.base_model: no memory model for {family.label} yet; set gradient_checkpointing "
            "and quantize_base yourself"
        )
    targets = {name: family.target_modules(name) for name in family.lora_targets}
    if model in BUILTIN_MODELS:
        key: tuple[str, float] = (model, 0.0)
        if key not in _SPECS:
            _SPECS[key] = _builtin_spec(model, family.name, targets)
        return _SPECS[key]
    folder = Path(model) if model.startswith("/") else _cached_folder(model, settings)
    index = folder / "model_index.json"
    key = (str(folder.resolve()), index.stat().st_mtime if index.is_file() else 0.0)
    if key not in _SPECS:  # every generate job plans: describe a model once (its configs on meta)
        _SPECS[key] = spec_of_directory(folder, family.name, targets)
    return _SPECS[key]


def _cached_folder(repo_id: str, settings: Settings) -> Path:
    from services.gpu.models import hf_cache_dirs

    folder = "models--" + repo_id.replace("/", "--")
    for cache in hf_cache_dirs(settings):
        found = sorted((cache / folder).glob("snapshots/*/model_index.json"))
        if found:
            return found[0].parent
    raise InputError(f"input.base_model: {repo_id} is not in the local Hugging Face cache")


def _builtin_spec(model: str, family: str, targets: dict[str, list[str]]) -> ModelSpec:
    """A builtin tiny model, counted from the model itself (it is built in code, in a moment)."""
    import torch

    from services.gpu.families import build_tiny_pipeline, family_of_builtin
    from services.gpu.families.full_size import count_parameters, lora_parameters_per_rank
    from services.gpu.memory.specs import described

    pipe = build_tiny_pipeline(model)
    fam = family_of_builtin(model)
    counts = {n: count_parameters(c) for n, c in pipe.components.items() if isinstance(c, torch.nn.Module)}
    denoiser = fam.denoiser(pipe)
    lora = {t: lora_parameters_per_rank(denoiser, s, fam.lora_scope) for t, s in targets.items()}
    config = dict(denoiser.config)
    return described(family, model, counts, lora, config, denoiser=fam.denoiser_name, native=fam.native_size(pipe))


def card_gib(requested_gb: float | None) -> float | None:
    """The card's memory: the job's ``gpu_memory_gb``, else this GPU's free memory plus what this
    process holds (None on the CPU: no plan is needed there)."""
    if requested_gb is not None:
        return float(requested_gb)
    import torch

    if not torch.cuda.is_available():
        return None
    free, _total = torch.cuda.mem_get_info()
    return (free + torch.cuda.memory_reserved()) / 2**30


def _planned_spec(model: str, gpu_memory_gb: float | None, settings: Settings) -> ModelSpec | None:
    """The model's spec when the job is planned (a card is known), else None; a model the planner
    cannot describe runs on the job's inputs and the family's defaults (logged)."""
    if card_gib(gpu_memory_gb) is None:
        return None
    try:
        return spec_for(model, settings)
    except (InputError, TypeError, ValueError, KeyError, AttributeError, ImportError) as exc:
        log.warning("no memory plan for %s (%s): running with the inputs and the family's defaults", model, exc)
        return None


def train_job(params: TrainLoraInput, spec: ModelSpec, images: int, precision: str) -> TrainJob:
    side = max(params.resolutions() or [spec.native])
    return TrainJob(
        height=side,
        width=side,
        batch=params.batch_size,
        rank=params.rank or 16,
        targets=params.lora_targets,
        precision="bf16" if precision == "auto" else {"no": "fp32"}.get(precision, precision),
        images=images,
        cache_latents=params.cache_latents,
        cache_text=params.cache_text_embeddings,
        samples=bool(params.sample_prompts),
        caption_variants=SHUFFLE_VARIANTS if params.shuffle_caption else 1,
        adapter=bool(params.training_adapter or params.training_adapter_url),
    )


def train_plan(
    params: TrainLoraInput, settings: Settings, images: int = DRY_RUN_IMAGES, spec: ModelSpec | None = None
) -> Plan | None:
    """The job's plan on its card (``gpu_memory_gb`` or this GPU); None on the CPU without one."""
    card = card_gib(params.gpu_memory_gb)
    if card is None:
        return None
    spec = spec or spec_for(params.base_model or settings.model_id, settings)
    job = train_job(params, spec, images, params.mixed_precision)
    return plan_training(spec, job, card, params.gradient_checkpointing, params.quantize_base, params.cpu_offload)


def apply_train_plan(params: TrainLoraInput, settings: Settings, images: int) -> tuple[TrainLoraInput, Plan | None]:
    """The job's inputs with the plan's choices filled in where the input left them open."""
    spec = _planned_spec(params.base_model or settings.model_id, params.gpu_memory_gb, settings)
    plan = train_plan(params, settings, images, spec) if spec is not None else None
    if plan is None:
        update = {"quantize_base": params.quantize_base or "none", "cpu_offload": bool(params.cpu_offload)}
        return params.model_copy(update=update), None
    log.info("memory plan for %s: %s", params.output_name, plan.metrics())
    update = {
        "gradient_checkpointing": plan.gradient_checkpointing,
        "quantize_base": plan.quantize_base,
        "cpu_offload": plan.cpu_offload,
    }
    return params.model_copy(update=update), plan


def generate_plan(params: GenerateInput, settings: Settings, spec: ModelSpec | None = None) -> Plan | None:
    """The generation's plan on its card (``gpu_memory_gb`` or this GPU); None on the CPU without one."""
    card = card_gib(params.gpu_memory_gb)
    if card is None:
        return None
    spec = spec or spec_for(params.base_model or settings.model_id, settings)
    height, width = params.height or params.width or spec.native, params.width or params.height or spec.native
    return plan_generation(spec, height, width, params.num_images, card, params.quantize_base, params.cpu_offload)


def apply_generate_plan(params: GenerateInput, settings: Settings) -> tuple[GenerateInput, Plan | None]:
    """The generation's inputs with the plan's ``quantize_base`` and ``cpu_offload`` filled in
    where the input left them open (a model without a memory model keeps the inputs)."""
    model = params.base_model or settings.model_id
    spec = _planned_spec(model, params.gpu_memory_gb, settings)
    plan = generate_plan(params, settings, spec) if spec is not None else None
    if plan is None:
        update = {"quantize_base": params.quantize_base or "none", "cpu_offload": bool(params.cpu_offload)}
        return params.model_copy(update=update), None
    log.info("memory plan for generate of %s: %s", model, plan.metrics())
    return params.model_copy(update={"quantize_base": plan.quantize_base, "cpu_offload": plan.cpu_offload}), plan
