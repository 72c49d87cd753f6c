"""LoRA files load in full everywhere: every exported key patches a weight of the model's
original checkpoint layout (what ComfyUI, A1111/Forge and kohya sd-scripts map to) with the
right shape, each file uses one naming, says its format, and the formats load in diffusers to
the same image. The original layouts are checked against diffusers' single-file converters in
``tests/gpu/original_layout.py``; no UI code is vendored."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from services.gpu.families import FLUX, SD, SDXL, ZIMAGE, build_tiny_pipeline, family_of_builtin
from services.gpu.families.flux_bfl import from_bfl, to_bfl
from services.gpu.lora_files import read_metadata, save_lora
from tests.gpu import original_layout as ol

pytestmark = pytest.mark.gpu

MODELS = [SD.builtin, SDXL.builtin, FLUX.builtin, ZIMAGE.builtin]
TARGETS = ["attention", "attention+mlp"]  # every family; FLUX.1 also offers "all" (its default)


def targets_of(model: str) -> list[str]:
    """Every ``lora_targets`` value the model's family offers, its default included."""
    return list(family_of_builtin(model).lora_targets)


RANK = 2
# fp32 on the CPU: the same LoRA read through two importers runs through different but equal
# arithmetic (split vs fused matrices); a wrong or missing module moves pixels far more.
SAME_IMAGE_TOLERANCE = 2


def layout_of(model: str, denoiser: Any) -> dict[str, ol.Slot]:
    family = family_of_builtin(model)
    if family in (SD, SDXL):
        return ol.unet_layout(denoiser)
    return ol.flux_layout(denoiser) if family is FLUX else ol.zimage_layout(denoiser)


def random_adapter(pipe: Any, model: str, targets: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A LoRA with non-zero up matrices, in the trainer's naming (diffusers' mixed one)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    family = family_of_builtin(model)
    denoiser = family.denoiser(pipe)
    modules = family.lora_module_names(denoiser, family.target_modules(targets))  # as the trainer picks them
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=modules)
    denoiser.add_adapter(config, adapter_name="t")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, param in denoiser.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser, adapter_name="t"))
    return layers, denoiser.peft_config["t"].to_dict()


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], dict[str, Any]]:
    """Per model and targets: every offered format saved by the worker, the base's layout."""
    out = {}
    torch.manual_seed(0)
    for model in MODELS:
        family = family_of_builtin(model)
        for targets in targets_of(model):
            pipe = build_tiny_pipeline(model)
            layout = layout_of(model, family.denoiser(pipe))
            state = {k: v for k, v in family.denoiser(pipe).state_dict().items()}
            layers, config = random_adapter(pipe, model, targets)
            folder = tmp_path_factory.mktemp(f"{family.name}-{targets.replace('+', '-')}")
            entry = SimpleNamespace(family=family, pipe=pipe, key=model)
            files = {
                fmt: save_lora(entry, layers, config, folder / f"{fmt}.safetensors", {}, torch.float32, fmt)
                for fmt in family.export_formats
            }
            modules = {k.split(".lora")[0] for k in layers}
            out[(model, targets)] = {"files": files, "layout": layout, "state": state, "modules": modules}
    return out


def _slot_check(slot: ol.Slot, shapes: dict, down: torch.Tensor, up: torch.Tensor) -> str | None:
    name, start, rows = slot
    if name not in shapes:
        return f"{name} not in the original layout"
    shape = shapes[name]
    if down.shape[1] != int(np.prod(shape[1:])) or up.shape[0] != rows or start + rows > shape[0]:
        return f"{name}: down {tuple(down.shape)} up {tuple(up.shape)} vs {shape} rows {start}+{rows}"
    return None


def unmatched_keys(case: dict[str, Any], fmt: str, path: Path) -> tuple[list[str], int]:
    """Map each module of a file the way the loaders do; the problems, and the modules matched."""
    layout, tensors = case["layout"], load_file(str(path))
    shapes = ol.original_shapes(layout, case["state"])
    problems: list[str] = []
    if fmt == "diffusers":
        names = {key.rsplit(".lora_", 1)[0] for key in tensors}
        for name in names:
            module = name.split(".", 1)[1]
            down, up = tensors.get(f"{name}.lora_A.weight"), tensors.get(f"{name}.lora_B.weight")
            if down is None or up is None or f"{module}.weight" not in layout:
                problems.append(f"{name}: no lora_A/lora_B pair or no such weight")
            elif issue := _slot_check(layout[f"{module}.weight"], shapes, down, up):
                problems.append(issue)
        return problems, len(names)
    # kohya: lora_unet_ + a module name with "." -> "_": diffusers paths (SD/SDXL) or original names
    by_kohya = {"lora_unet_" + k.removesuffix(".weight").replace(".", "_"): layout[k] for k in layout}
    by_kohya |= {"lora_unet_" + n.removesuffix(".weight").replace(".", "_"): (n, 0, s[0]) for n, s in shapes.items()}
    names = {key.split(".", 1)[0] for key in tensors}
    for name in names:
        down, up = tensors.get(f"{name}.lora_down.weight"), tensors.get(f"{name}.lora_up.weight")
        alpha = tensors.get(f"{name}.alpha")
        if down is None or up is None or alpha is None or name not in by_kohya:
            problems.append(f"{name}: no lora_down/lora_up/alpha or no such module")
        elif float(alpha) != down.shape[0]:
            problems.append(f"{name}: alpha {float(alpha)} is not the rank {down.shape[0]} (alpha is folded)")
        elif issue := _slot_check(by_kohya[name], shapes, down, up):
            problems.append(issue)
    return problems, len(names)


# --- the original layouts are diffusers' converters' inverse -----------------------------------


@pytest.mark.parametrize("model", [SD.builtin, SDXL.builtin, ZIMAGE.builtin])
def test_original_layout_converts_back_to_the_model(model: str) -> None:
    """Catches a wrong original-layout map (which would make the key tests below prove nothing):
    a synthetic LDM/SGM or Z-Image checkpoint built from it must convert, through diffusers'
    own single-file converter, to exactly the model's keys and tensors."""
    from diffusers.loaders import single_file_utils as sfu

    family = family_of_builtin(model)
    denoiser = family.denoiser(build_tiny_pipeline(model))
    state = denoiser.state_dict()
    layout = layout_of(model, denoiser)
    shapes = ol.original_shapes(layout, state)
    generator = torch.Generator().manual_seed(1)
    original = {name: torch.randn(shape, generator=generator) for name, shape in shapes.items()}
    if family is ZIMAGE:
        converted = sfu.convert_z_image_transformer_checkpoint_to_diffusers(dict(original))
    else:
        prefixed = {f"model.diffusion_model.{k}": v for k, v in original.items()}
        converted = sfu.convert_ldm_unet_checkpoint(prefixed, dict(denoiser.config))
    assert set(converted) == set(state)
    for key, (name, start, rows) in layout.items():
        assert torch.equal(converted[key], original[name][start : start + rows]), key


def test_flux_original_layout_converts_back_at_flux1_width() -> None:
    """Catches a wrong BFL map. diffusers' FLUX.1 converter splits ``linear1`` at FLUX.1's
    3072/12288 widths, so the check runs at that width on the meta device (shapes only)."""
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders import single_file_utils as sfu

    with torch.device("meta"):
        model = FluxTransformer2DModel(num_layers=2, num_single_layers=2, guidance_embeds=True)
    state = model.state_dict()
    layout = ol.flux_layout(model)
    original = {n: torch.empty(s, device="meta") for n, s in ol.original_shapes(layout, state).items()}
    converted = sfu.convert_flux_transformer_checkpoint_to_diffusers(original)
    assert {k: tuple(v.shape) for k, v in converted.items()} == {k: tuple(v.shape) for k, v in state.items()}


# --- every exported key applies ----------------------------------------------------------------


CASES = [(m, f, t) for m in MODELS for f in family_of_builtin(m).export_formats for t in targets_of(m)]


@pytest.mark.parametrize(("model", "fmt", "targets"), CASES)
def test_every_exported_key_patches_an_original_weight(exported, model: str, fmt: str, targets: str) -> None:
    """Catches modules a UI would skip ("lora key not loaded"): a key in a naming the loaders do
    not map, a module left out or renamed wrongly (BFL fusion), a shape that does not fit its
    original weight, alpha that is not the rank. Every trained module must be in the file."""
    case = exported[(model, targets)]
    problems, matched = unmatched_keys(case, fmt, case["files"][fmt])
    assert problems == []
    if fmt == "diffusers" or family_of_builtin(model) is not FLUX:
        assert matched == len(case["modules"])
    else:  # q/k/v (and the single blocks' MLP input) fused
        assert matched == len({ol._flux_slot(f"{m}.weight", 1)[0] for m in case["modules"]})


@pytest.mark.parametrize(("model", "fmt", "targets"), CASES)
def test_each_file_uses_one_naming_and_says_its_format(exported, model: str, fmt: str, targets: str) -> None:
    """Catches mixed naming (diffusers' ``convert_state_dict_to_diffusers`` renames only the
    attention projections to ``lora.down``; kohya's FLUX converter then drops those modules) and
    kohya metadata on a file whose keys are not kohya's."""
    path = exported[(model, targets)]["files"][fmt]
    keys = load_file(str(path))
    metadata = read_metadata(path)
    assert metadata["lora_format"] == fmt
    if fmt == "diffusers":
        prefix = family_of_builtin(model).denoiser_name + "."
        assert all(k.startswith(prefix) and re.search(r"\.lora_[AB]\.weight$", k) for k in keys)
        assert "ss_network_module" not in metadata
    else:
        assert all(
            k.startswith("lora_unet_") and re.search(r"\.(lora_down\.weight|lora_up\.weight|alpha)$", k) for k in keys
        )
        expected = "networks.lora_flux" if family_of_builtin(model) is FLUX else "networks.lora"
        assert metadata["ss_network_module"] == expected


def test_default_export_is_the_format_every_loader_reads() -> None:
    """Catches the SD/SDXL default going back to the diffusers file ComfyUI applies nothing of."""
    assert [f.default_exports() for f in (SD, SDXL, FLUX, ZIMAGE)] == [
        ["kohya"],
        ["kohya"],
        ["diffusers"],
        ["diffusers"],
    ]


# --- the formats load in diffusers to the same image --------------------------------------------


def render(pipe: Any, seed: int = 5) -> np.ndarray:
    image = pipe(
        prompt="sks yellow bar",
        width=32,
        height=32,
        num_inference_steps=3,
        generator=[torch.Generator("cpu").manual_seed(seed)],
        output_type="np",
    ).images[0]
    return np.round(image * 255).astype(np.int16)


def render_with(model: str, source: Any, **kwargs: Any) -> np.ndarray:
    pipe = build_tiny_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    if source is not None:
        pipe.load_lora_weights(source, adapter_name="x", **kwargs)
    return render(pipe)


@pytest.mark.parametrize("model", [SD.builtin, SDXL.builtin])
def test_kohya_file_loads_in_diffusers_to_the_diffusers_files_image(exported, model: str) -> None:
    """Catches a kohya file diffusers' kohya importer reads only in part or at another strength
    (the default SD/SDXL file must also work with ``pipe.load_lora_weights``)."""
    files = exported[(model, "attention+mlp")]["files"]
    kohya = render_with(model, str(files["kohya"].parent), weight_name=files["kohya"].name)
    peft = render_with(model, str(files["diffusers"].parent), weight_name=files["diffusers"].name)
    base = render_with(model, None)
    assert int(np.abs(kohya - peft).max()) <= SAME_IMAGE_TOLERANCE
    assert int(np.abs(kohya - base).max()) > 4 * SAME_IMAGE_TOLERANCE  # the LoRA does something


@pytest.mark.parametrize("targets", list(FLUX.lora_targets))
def test_flux_kohya_file_round_trips_to_the_peft_files_image(exported, targets: str) -> None:
    """Catches a BFL export or import that loses or mixes up q/k/v or MLP rows: the kohya file,
    read back through the family's import hook (what ``generate`` does), renders the peft file's
    image."""
    files = exported[(FLUX.builtin, targets)]["files"]
    pipe = build_tiny_pipeline(FLUX.builtin)
    converted = FLUX.import_lora(files["kohya"], pipe)
    assert converted is not None
    kohya = render_with(FLUX.builtin, converted)
    peft = render_with(FLUX.builtin, str(files["diffusers"].parent), weight_name=files["diffusers"].name)
    base = render_with(FLUX.builtin, None)
    assert int(np.abs(kohya - peft).max()) <= SAME_IMAGE_TOLERANCE
    assert int(np.abs(kohya - base).max()) > 4 * SAME_IMAGE_TOLERANCE


@pytest.mark.parametrize("targets", TARGETS)
def test_diffusers_importer_reads_the_flux_kohya_file_at_flux1_width(tmp_path: Path, targets: str) -> None:
    """Catches a BFL file diffusers' own FLUX importer (``load_lora_weights`` on a FluxPipeline)
    would read wrongly: at FLUX.1's widths (3072, MLP 12288; one block of each kind, rank 2) every
    module's weight change ``up @ down`` read back equals the exported one."""
    from diffusers import FluxPipeline

    config = SimpleNamespace(num_attention_heads=24, attention_head_dim=128, num_layers=1, num_single_layers=1)
    modules = [m for m in _flux_modules() if targets == "attention+mlp" or not re.search(r"ff|proj_mlp", m)]
    generator = torch.Generator().manual_seed(3)
    layers = {}
    for module in modules:
        rows, cols = _flux_shape(module)
        layers[f"{module}.lora_A.weight"] = torch.randn(RANK, cols, generator=generator)
        layers[f"{module}.lora_B.weight"] = torch.randn(rows, RANK, generator=generator)
    save_file(to_bfl(layers, config), str(tmp_path / "k.safetensors"))
    read = FluxPipeline.lora_state_dict(str(tmp_path), weight_name="k.safetensors")
    ours = from_bfl(load_file(str(tmp_path / "k.safetensors")), config)
    assert ours is not None
    assert {k.removeprefix("transformer.").rsplit(".lora_", 1)[0] for k in ours} == set(modules)
    for module in _flux_modules():  # diffusers also reads untrained parts of a fused module: as zero
        rows, cols = _flux_shape(module)
        probe = torch.randn(cols, 3, generator=generator)  # compares up @ down through a probe
        expected = torch.zeros(rows, 3)
        if module in modules:
            expected = layers[f"{module}.lora_B.weight"] @ (layers[f"{module}.lora_A.weight"] @ probe)
        sources = [read, ours] if module in modules else [read]
        for source in sources:
            if f"transformer.{module}.lora_B.weight" not in source:
                assert module not in modules and source is read, module
                continue
            got = source[f"transformer.{module}.lora_B.weight"] @ (
                source[f"transformer.{module}.lora_A.weight"] @ probe
            )
            assert torch.allclose(got, expected, atol=1e-3), module


def _flux_modules() -> list[str]:
    double = ["attn.to_q", "attn.to_k", "attn.to_v", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"]
    double += ["attn.to_out.0", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj"]
    double += ["ff_context.net.2"]
    single = ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"]
    return [f"transformer_blocks.0.{m}" for m in double] + [f"single_transformer_blocks.0.{m}" for m in single]


def _flux_shape(module: str) -> tuple[int, int]:
    width, mlp = 3072, 12288
    if module.endswith(("ff.net.0.proj", "ff_context.net.0.proj", "proj_mlp")):
        return mlp, width
    if module.endswith(("ff.net.2", "ff_context.net.2")):
        return width, mlp
    return width, width


# --- through the train job -----------------------------------------------------------------------


@pytest.mark.parametrize(("model", "formats"), [(SD.builtin, None), (FLUX.builtin, ["kohya", "diffusers"])])
def test_train_job_writes_the_main_file_in_the_first_format(settings, tmp_path: Path, model: str, formats) -> None:
    """Catches the train job writing the old default (a diffusers file for SD) or a main file the
    worker's own generate path cannot load (the sample is rendered from the main file)."""
    from services.gpu.params import TrainLoraInput
    from services.gpu.train.job import train_lora
    from tests.gpu.conftest import write_dataset

    params = TrainLoraInput(
        action="train_lora",
        dataset="d",
        output_name="f",
        base_model=model,
        steps=2,
        rank=2,
        sample_prompts=["a bar"],
        sample_steps=2,
        export_formats=formats,
    )
    result = train_lora(params, write_dataset(tmp_path / "d", count=2), tmp_path / "work", settings)
    main = "kohya" if formats is None else formats[0]
    assert result.lora_format == main and read_metadata(result.lora_path)["lora_format"] == main
    assert all(key.startswith("lora_unet_") for key in load_file(str(result.lora_path)))
    assert len(result.samples) == 1
    assert result.kohya_path is None
    if formats is not None:
        assert result.diffusers_path is not None and read_metadata(result.diffusers_path)["lora_format"] == "diffusers"
