"""The memory planner: counts from the real configs, the activation model against measurement,
the plans it picks, explicit inputs, refusals and the dry run through the entrypoint."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from config.settings import build_settings
from services.errors import InputError
from services.gpu.families import FAMILIES, FLUX, SD, SDXL, ZIMAGE
from services.gpu.families import full_size as configs
from services.gpu.memory import specs
from services.gpu.memory.estimate import ACTIVATION_ERROR, activation_bytes
from services.gpu.memory.jobs import generate_plan, spec_for, train_plan
from services.gpu.memory.measure import measure
from services.gpu.memory.planner import TrainJob, plan_generation, plan_training
from services.gpu.params import GenerateInput, TrainLoraInput

ROOT = Path(__file__).resolve().parents[2]
FAMILY = {"flux": FLUX, "zimage": ZIMAGE, "sdxl": SDXL, "sd": SD}


@pytest.mark.parametrize("spec", specs.KNOWN, ids=[s.name for s in specs.KNOWN])
def test_parameter_counts_are_those_of_the_real_configs(spec: specs.ModelSpec) -> None:
    """Catches a count in specs.py that drifts from its config (a typo, a changed library):
    every component is built on the meta device from configs.py and counted."""
    family = FAMILY[spec.family]
    for name, (library, cls, config) in configs.MODELS[spec.name].items():
        module = configs.build_empty(library, cls, config)
        assert configs.count_parameters(module) == spec.components[name], name
        if name == spec.denoiser:
            for targets, per_rank in spec.lora_per_rank.items():
                names = family.target_modules(targets)
                assert configs.lora_parameters_per_rank(module, names, family.lora_scope) == per_rank, targets


# --- the activation model against measurement (meta device: full width, no FLOPs) -----------

BF16 = torch.bfloat16


def _empty(*shape: int) -> torch.Tensor:
    return torch.empty(*shape, device="meta", dtype=BF16)


def _denoiser(cls: str, config: dict[str, Any], family: Any) -> torch.nn.Module:
    from peft import LoraConfig

    model = configs.build_empty("diffusers", cls, config).to(BF16).requires_grad_(False)
    model.add_adapter(
        LoraConfig(r=16, lora_alpha=16, target_modules=family.target_modules(family.defaults.lora_targets))
    )
    return model.train()


def _flux_step(config: dict[str, Any], side: int) -> tuple[torch.nn.Module, Any]:
    model, tokens = _denoiser("FluxTransformer2DModel", config, FLUX), (side // 16) ** 2
    inputs = {
        "hidden_states": _empty(1, tokens, 64),
        "encoder_hidden_states": _empty(1, 512, 4096),
        "pooled_projections": _empty(1, 768),
        "timestep": _empty(1),
        "img_ids": _empty(tokens, 3),
        "txt_ids": _empty(512, 3),
        "guidance": _empty(1),
    }
    return model, lambda: model(**inputs, return_dict=False)


def _zimage_step(config: dict[str, Any], side: int) -> tuple[torch.nn.Module, Any]:
    model = _denoiser("ZImageTransformer2DModel", config, ZIMAGE)
    latents = [_empty(16, 1, side // 8, side // 8)]
    return model, lambda: model(latents, _empty(1), [_empty(512, 2560)], return_dict=False)


def _unet_step(config: dict[str, Any], side: int, family: Any) -> tuple[torch.nn.Module, Any]:
    model = _denoiser("UNet2DConditionModel", config, family)
    text = _empty(1, 77, config.get("cross_attention_dim", 768))
    extra = {"added_cond_kwargs": {"text_embeds": _empty(1, 1280), "time_ids": _empty(1, 6)}} if family is SDXL else {}
    latents = _empty(1, 4, side // 8, side // 8)
    return model, lambda: model(latents, _empty(1), encoder_hidden_states=text, return_dict=False, **extra)


SHALLOW = {  # full width; one or two blocks of each kind (the UNets whole: cheap on meta)
    "flux": ({**configs.FLUX_DEV, "num_layers": 1, "num_single_layers": 1}, _flux_step),
    "zimage": ({**configs.ZIMAGE, "n_layers": 1, "n_refiner_layers": 1}, _zimage_step),
    "sdxl": (configs.SDXL_UNET, lambda c, s: _unet_step(c, s, SDXL)),
    "sd": (configs.SD15_UNET, lambda c, s: _unet_step(c, s, SD)),
}
REFERENCE = {"flux": specs.FLUX_DEV, "zimage": specs.ZIMAGE_TURBO, "sdxl": specs.SDXL, "sd": specs.SD15}


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointing"])
@pytest.mark.parametrize("side", [256, 512])
@pytest.mark.parametrize("family", list(SHALLOW))
def test_activation_estimate_is_within_its_error_of_the_measurement(
    family: str, side: int, checkpointing: bool
) -> None:
    """Catches an activation coefficient (or the checkpointing formula) that no longer matches
    what autograd keeps for backward in the real blocks: the estimate for the shallow config
    must be within ACTIVATION_ERROR (10 %) of the bytes counted by saved_tensors_hooks."""
    config, step = SHALLOW[family]
    model, run = step(config, side)
    measured = measure(model, run, checkpointing).peak(checkpointing)
    spec = replace(REFERENCE[family], config=config)
    estimate = activation_bytes(spec, side, side, 1, checkpointing)
    assert abs(estimate - measured) <= ACTIVATION_ERROR * measured, (estimate / 2**20, measured / 2**20)


# --- the planner, a pure function --------------------------------------------------------------

# (model, card GB) -> (gradient checkpointing, quantize_base, cpu_offload, estimated peak GiB) at
# 1024 px, batch 1, 100 images
EXPECTED = {
    ("flux-dev", 80): (False, "none", False, 57.99),
    ("flux-dev", 48): (True, "none", False, 32.76),
    ("flux-dev", 32): (True, "none", True, 26.28),  # T5 never beside the bf16 transformer
    ("flux-dev", 24): (True, "nf4", False, 16.83),
    ("zimage-turbo", 80): (False, "none", False, 45.84),
    ("zimage-turbo", 48): (True, "none", False, 20.3),
    ("zimage-turbo", 24): (True, "none", False, 20.3),
    ("sdxl", 80): (False, "none", False, 10.99),
    ("sdxl", 24): (False, "none", False, 10.99),
}


@pytest.mark.parametrize(("name", "card"), list(EXPECTED), ids=[f"{s}-{gb}" for s, gb in EXPECTED])
def test_planner_picks_the_cheapest_plan_that_fits(name: str, card: int) -> None:
    """Catches a planner that picks a slower plan than needed (checkpointing, NF4 or offload on
    a card where less fits) or one that does not fit (e.g. bf16 FLUX.1 on 24 GB)."""
    spec = next(s for s in specs.KNOWN if s.name == name)
    plan = plan_training(spec, TrainJob(1024, 1024), card)
    assert (plan.gradient_checkpointing, plan.quantize_base, plan.cpu_offload, plan.peak_gib) == EXPECTED[name, card]
    settings = {"gradient_checkpointing": plan.gradient_checkpointing, "quantize_base": plan.quantize_base}
    assert plan.fits and plan.chosen == {**settings, "cpu_offload": plan.cpu_offload}


def test_many_images_move_the_caches_off_the_card() -> None:
    """Catches caches that stay on the GPU whatever their size: 3000 captions of T5 embeddings
    (12 GiB) on a 48 GB card take cpu_offload rather than NF4."""
    plan = plan_training(specs.FLUX_DEV, TrainJob(1024, 1024, images=3000), 48)
    assert (plan.gradient_checkpointing, plan.quantize_base, plan.cpu_offload) == (True, "none", True)


def test_explicit_inputs_win_over_the_plan() -> None:
    """Catches the plan overriding a caller's setting: checkpointing asked on an 80 GB card stays
    on; a bf16 FLUX.1 job asked on 24 GB is refused, naming the plan that would fit."""
    plan = plan_training(specs.FLUX_DEV, TrainJob(1024, 1024), 80, checkpointing=True)
    assert (plan.gradient_checkpointing, plan.quantize_base) == (True, "none")
    assert plan.chosen == {"quantize_base": "none", "cpu_offload": False}
    plan = plan_training(specs.FLUX_DEV, TrainJob(1024, 1024), 80, offload=True)
    assert plan.cpu_offload and plan.chosen == {"gradient_checkpointing": False, "quantize_base": "none"}
    with pytest.raises(InputError) as caught:
        plan_training(specs.FLUX_DEV, TrainJob(1024, 1024), 24, quantize="none")
    assert "its smallest plan (gradient_checkpointing True, quantize_base none, cpu_offload True)" in str(caught.value)
    assert (
        "Without the explicit setting it fits this card with gradient_checkpointing True, quantize_base nf4, "
        "cpu_offload False" in str(caught.value)
    )


def test_a_job_no_plan_fits_fails_naming_estimate_card_and_smallest_card() -> None:
    """Catches a refusal that does not tell the user what would fit: the estimate, the card's
    memory and the smallest rented card with the plan it would take, or that none fits."""
    with pytest.raises(InputError) as caught:
        plan_training(specs.FLUX_DEV, TrainJob(1024, 1024, batch=8), 24)
    text = str(caught.value)
    assert "does not fit a 24.0 GiB card" in text
    assert "peaks at about 30.2 GiB" in text
    assert (
        "The smallest card that fits it: 48 GB (44.99 GiB), with gradient_checkpointing True, quantize_base nf4" in text
    )
    with pytest.raises(InputError, match="No rented card fits it"):
        plan_training(specs.FLUX_DEV, TrainJob(2048, 2048, batch=64), 141)
    with pytest.raises(InputError, match=r"quantize_base none, cpu_offload True\)?.*32 GB"):  # an adapter rules NF4 out
        plan_training(specs.FLUX_DEV, TrainJob(1024, 1024, adapter=True), 24)


# (model, card GB) -> (quantize_base, cpu_offload) of one image at the native side
GENERATION = {
    ("flux-dev", 80): ("none", False),
    ("flux-dev", 48): ("none", False),
    ("flux-dev", 32): ("none", True),  # T5 runs alone while the bf16 transformer waits on the CPU
    ("flux-dev", 24): ("nf4", False),  # bf16 FLUX.1 does not fit 24 GB even with the encoders away
    ("zimage-turbo", 48): ("none", False),
    ("zimage-turbo", 24): ("none", True),  # Qwen3 runs alone, then the transformer
    ("sdxl", 24): ("none", False),
}


@pytest.mark.parametrize(("name", "card"), list(GENERATION), ids=[f"{s}-{gb}" for s, gb in GENERATION])
def test_generation_plan_picks_the_cheapest_that_fits(name: str, card: int) -> None:
    """Catches a generation estimate that is never a plan (bf16 FLUX.1 sent to a 24 GB card and
    run out of memory) or a slower plan than needed."""
    spec = next(s for s in specs.KNOWN if s.name == name)
    plan = plan_generation(spec, spec.native, spec.native, 1, card)
    assert (plan.quantize_base, plan.cpu_offload) == GENERATION[name, card] and plan.fits
    assert plan.gradient_checkpointing is None and set(plan.chosen) == {"quantize_base", "cpu_offload"}


@pytest.mark.parametrize("model", [family.builtin for family in FAMILIES])
def test_every_builtin_gets_a_train_and_a_generation_plan(model: str) -> None:
    """Catches a family whose denoiser config the planner cannot read (a UNet's per-block head
    dims): a dry run with gpu_memory_gb on a builtin must plan, not crash."""
    settings = build_settings()
    train = TrainLoraInput(action="train_lora", dataset="d", output_name="o", base_model=model, gpu_memory_gb=24)
    generate = GenerateInput(action="generate", prompt="p", base_model=model, gpu_memory_gb=24)
    assert train_plan(train, settings).fits and generate_plan(generate, settings).fits


def test_shuffled_captions_count_in_the_caches() -> None:
    """Catches an estimate that ignores shuffle_caption's cached orders (8 T5 embeddings per
    image instead of one: about 2.7 GiB more for 100 FLUX.1 captions)."""
    one = plan_training(specs.FLUX_DEV, TrainJob(1024, 1024), 80)
    shuffled = plan_training(specs.FLUX_DEV, TrainJob(1024, 1024, caption_variants=8), 80)
    assert shuffled.phases["setup"] - one.phases["setup"] == pytest.approx(7 * 100 * 512 * 4096 * 2 / 2**30, abs=0.02)
    params = TrainLoraInput(
        action="train_lora",
        dataset="d",
        output_name="o",
        base_model="black-forest-labs/FLUX.1-dev",
        shuffle_caption=True,
    )
    assert train_plan(params.model_copy(update={"gpu_memory_gb": 80}), build_settings()).phases == shuffled.phases


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"num_layers": 10**9}, r"num_layers is not a model's: 1000000000 \(counts are 0 to 1024\)"),
        ({"num_layers": -3}, r"num_layers is not a model's: -3"),
        ({"num_attention_heads": True}, r"num_attention_heads is not a model's: True"),
        ({"axes_dims_rope": [16] * 2000}, r"axes_dims_rope is not a model's: 2000 entries \(at most 1024\)"),
        ({"num_layers": "many"}, r"cannot describe .*transformer/config.json \(FluxTransformer2DModel\)"),
    ],
)
def test_a_model_directory_no_model_has_is_refused_at_once(tmp_path: Path, config: dict, expected: str) -> None:
    """Catches a dry run on a hostile config.json that builds a billion layers (minutes, the
    worker's memory) or crashes with a traceback: a one-line input error naming the file."""
    model = _configs_only_flux(tmp_path / "flux")
    path = model / "transformer" / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
    with pytest.raises(InputError, match=expected):
        spec_for(str(model), build_settings())
    with pytest.raises(InputError, match="is not a diffusers pipeline directory"):
        spec_for(str(path), build_settings())


def test_a_unet_with_thousands_of_blocks_or_a_broken_index_is_refused_at_once(tmp_path: Path) -> None:
    """Catches block lists of a hostile UNet config (2000 down blocks: minutes of building on the
    meta device) and an index entry that is not [library, class] (an IndexError traceback)."""
    folder = tmp_path / "sdxl"
    (folder / "unet").mkdir(parents=True)
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "UNet2DConditionModel"]})
    )
    (folder / "unet" / "config.json").write_text(json.dumps({"down_block_types": ["DownBlock2D"] * 2000}))
    with pytest.raises(InputError, match=r"down_block_types is not a model's: 2000 entries \(at most 16\)"):
        spec_for(str(folder), build_settings())
    (folder / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers"]})
    )
    with pytest.raises(InputError, match=r"unet is not \[library, class\]"):
        spec_for(str(folder), build_settings())


@pytest.mark.parametrize("value", ["24", True, float("nan"), float("inf"), 0, -1])
def test_gpu_memory_gb_is_a_positive_finite_number(value: object) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError):
        TrainLoraInput(action="train_lora", dataset="d", output_name="o", gpu_memory_gb=value)
    with pytest.raises(ValidationError):
        GenerateInput(action="generate", prompt="p", gpu_memory_gb=value)


def test_generation_refuses_explicit_settings_that_do_not_fit_naming_what_would() -> None:
    with pytest.raises(InputError) as caught:
        plan_generation(specs.FLUX_DEV, 1024, 1024, 1, 24, quantize="none")
    text = str(caught.value)
    assert text.startswith("input.base_model: generate of flux-dev at 1024x1024, 1 image(s) does not fit")
    assert "Without the explicit setting it fits this card with quantize_base nf4, cpu_offload False" in text
    with pytest.raises(InputError, match="The smallest card that fits it: 24 GB"):
        plan_generation(specs.FLUX_DEV, 1024, 1024, 1, 12)


# --- the dry run, as users reach it ------------------------------------------------------------


def _configs_only_flux(folder: Path) -> Path:
    """A full-width, shallow FLUX.1 directory of configs only (no weights: a dry run reads none)."""
    parts = {**configs.MODELS["flux-dev"]}
    parts["transformer"] = (*parts["transformer"][:2], {**configs.FLUX_DEV, "num_layers": 1, "num_single_layers": 1})
    index: dict[str, Any] = {"_class_name": "FluxPipeline"}
    for name, (library, cls, config) in parts.items():
        (folder / name).mkdir(parents=True)
        (folder / name / "config.json").write_text(json.dumps(config))
        index[name] = [library, cls]
    (folder / "model_index.json").write_text(json.dumps(index))
    return folder


def _dry_run(tmp_path: Path, job: dict[str, Any]) -> dict[str, Any]:
    from tests.test_entrypoint import printed_result, run_worker

    completed = run_worker(tmp_path, job)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return printed_result(completed)


def test_dry_run_through_the_entrypoint_returns_a_plan_without_training(tmp_path: Path) -> None:
    """Catches a dry run that loads weights, claims the lease, fetches the dataset or trains:
    the model directory holds configs only and the dataset does not exist, yet the plan comes
    back, and storage stays empty."""
    model = _configs_only_flux(tmp_path / "flux-shallow")
    job = {
        "action": "train_lora",
        "dataset": "absent",
        "output_name": "planned",
        "base_model": str(model),
        "resolution": 1024,
        "dry_run": True,
        "gpu_memory_gb": 24,
    }
    out = _dry_run(tmp_path, job)
    assert out["dry_run"] is True and out["fits"] is True and out["card_gib"] == 24
    assert out["plan"]["quantize_base"] == "none" and out["plan"]["gradient_checkpointing"] is False, out["plan"]
    assert set(out["cards"]) == {"24", "32", "48", "80", "141"}
    storage = tmp_path / "storage"
    assert not storage.exists() or not any(p.is_file() for p in storage.rglob("*"))


def test_dry_run_answers_for_a_known_model_and_a_card_it_does_not_fit(tmp_path: Path) -> None:
    """Catches a dry run that cannot answer "will FLUX.1-dev fit a 24 GB card?" on a worker
    without the model or a GPU: NF4 with checkpointing fits; bf16 asked explicitly does not,
    and the message names what would fit."""
    job = {
        "action": "train_lora",
        "dataset": "absent",
        "output_name": "planned",
        "base_model": "black-forest-labs/FLUX.1-dev",
        "dry_run": True,
        "gpu_memory_gb": 24,
    }
    out = _dry_run(tmp_path, job)
    assert (out["plan"]["quantize_base"], out["plan"]["gradient_checkpointing"]) == ("nf4", True)
    refused = _dry_run(tmp_path, {**job, "quantize_base": "none"})
    assert refused["fits"] is False and "quantize_base nf4" in refused["message"]
    generation = _dry_run(
        tmp_path, {"action": "generate", "prompt": "p", "base_model": "black-forest-labs/FLUX.1-dev", "dry_run": True}
    )
    assert generation["fits"] is None and generation["cards"]["48"]["fits"] is True
    assert generation["cards"]["24"]["quantize_base"] == "nf4"  # bf16 FLUX.1 generation needs 33 GiB
    on_24 = _dry_run(
        tmp_path,
        {
            "action": "generate",
            "prompt": "p",
            "base_model": "black-forest-labs/FLUX.1-dev",
            "dry_run": True,
            "gpu_memory_gb": 24,
            "quantize_base": "none",
        },
    )
    assert on_24["fits"] is False and "fits this card with quantize_base nf4" in on_24["message"]


def test_generation_keeps_the_lora_restore_backup_on_the_cpu(tmp_path: Path) -> None:
    """Catches a restore backup kept beside the weights on the GPU (+4.7 to +12.7 GiB for
    FLUX.1): every backed-up tensor is a CPU copy, and the base comes back bit for bit. (On a
    CPU-only machine the device check cannot tell a GPU-side backup apart; the copy check can.)"""
    from safetensors.torch import save_file

    from services.gpu import adapters
    from services.gpu.families import build_tiny_pipeline
    from services.gpu.models import PipelineKey, wrap_pipeline

    entry = wrap_pipeline(build_tiny_pipeline("builtin:tiny-sd"), PipelineKey("builtin:tiny-sd", "float32", "cpu"))
    before = {k: v.clone() for k, v in entry.pipe.unet.state_dict().items()}
    seen: list[Any] = []
    original = adapters._backup

    def spy(layers: list[Any]) -> list[Any]:
        seen.extend(original(layers))
        return seen

    lora = {
        f"unet.{name}.lora_{ab}.weight": torch.randn(shape) * 0.1
        for name, module in entry.pipe.unet.named_modules()
        if name.endswith("attn1.to_q")
        for ab, shape in (("A", (2, module.in_features)), ("B", (module.out_features, 2)))
    }
    path = tmp_path / "lora.safetensors"
    save_file(lora, str(path))
    adapters._backup = spy
    try:
        with adapters.fused_lora(entry, path, 1.0):
            pass
    finally:
        adapters._backup = original
    assert seen and all(weight.device.type == "cpu" for _, weight, _ in seen)
    assert all(weight.data_ptr() != base.weight.data_ptr() for base, weight, _ in seen)
    after = entry.pipe.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
