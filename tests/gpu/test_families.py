"""Every model family through the same runner: the file loads in diffusers' own loader to the
same image, the base comes back bit for bit, non-square images train in non-square buckets,
progress and stop work between steps, and only the seam names a family (that training learns:
tests/gpu/test_learning.py)."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from services.errors import InputError, JobStopped
from services.gpu import models
from services.gpu.adapters import tuner_layers
from services.gpu.families import FAMILIES, build_tiny_pipeline, family_of_builtin
from services.gpu.generate.render import generate_images
from services.gpu.params import GenerateInput, TrainLoraInput
from services.gpu.train.dataset import fit, load_rgb
from services.gpu.train.job import train_lora
from services.gpu.train.loop import ProgressReporter, run_steps
from services.gpu.train.trainer import LoraTrainer, TrainConfig
from services.job.stop import StopSignal
from tests.gpu.conftest import SIZE, decode, write_dataset

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
MODELS = [family.builtin for family in FAMILIES]  # every registered family, a new one included
STEPS = 40
# fp32 on the CPU: a LoRA fused into the weights and the same LoRA run unfused by peft round
# differently; a couple of 8-bit levels is rounding, a wrong strength or layer is far more.
SAME_IMAGE_TOLERANCE = 3


@dataclass
class FamilyRun:
    model: str
    result: Any
    dataset: Path
    base_digest: str


def denoiser_digest(model: str, settings) -> str:
    entry = models.load_pipeline(model, settings, torch.float32, CPU)
    digest = hashlib.sha256()
    for key, value in sorted(family_of_builtin(model).denoiser(entry.pipe).state_dict().items()):
        digest.update(key.encode())
        digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def with_wide_image(folder: Path) -> Path:
    write_dataset(folder, count=3)
    pixels = np.zeros((24, 64, 3), np.uint8)  # 8:3, far from square
    pixels[:, :32] = (30, 30, 220)
    Image.fromarray(pixels).save(folder / "wide.png")
    (folder / "wide.txt").write_text("blue half", encoding="utf-8")
    return folder


@pytest.fixture(scope="module", params=MODELS)
def family_run(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, settings) -> FamilyRun:
    model = request.param
    dataset = with_wide_image(tmp_path_factory.mktemp("dataset"))
    before = denoiser_digest(model, settings)
    params = TrainLoraInput(
        action="train_lora",
        dataset="d",
        output_name="fam",
        base_model=model,
        trigger_word="sks",
        steps=STEPS,
        rank=4,
        alpha=8.0,
        learning_rate=3e-3,
        batch_size=2,
        lora_targets="attention+mlp",
        export_formats=["diffusers"],  # the default SDXL kohya file: tests/gpu/test_lora_formats.py
    )
    result = train_lora(params, dataset, tmp_path_factory.mktemp("work"), settings)
    return FamilyRun(model=model, result=result, dataset=dataset, base_digest=before)


def test_non_square_image_trains_in_a_non_square_bucket(family_run: FamilyRun) -> None:
    buckets = family_run.result.metrics["buckets"]
    assert buckets.get("32x32") == 3
    wide = [size for size in buckets if size != "32x32"]
    assert len(wide) == 1 and buckets[wide[0]] == 1
    width, height = map(int, wide[0].split("x"))
    assert width > height and width % 8 == 0 and height % 8 == 0


def _file_layers(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """The file's tensors in peft naming (``lora.down`` -> ``lora_A``), without the component prefix."""
    layers = {}
    for key, value in load_file(str(path)).items():
        assert key.startswith(prefix), key
        name = key.removeprefix(prefix).replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B.")
        layers[name] = value
    return layers


def test_diffusers_loader_reads_every_key_and_gives_the_workers_image(family_run: FamilyRun, settings) -> None:
    from peft.utils import get_peft_model_state_dict

    family = family_of_builtin(family_run.model)
    path = family_run.result.lora_path
    pipe = build_tiny_pipeline(family_run.model)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="x")
    loaded = get_peft_model_state_dict(family.denoiser(pipe), adapter_name="x")
    in_file = _file_layers(path, f"{family.denoiser_name}.")
    assert set(loaded) == set(in_file)  # no missing, no unexpected keys
    assert all(torch.equal(loaded[key].float(), in_file[key].float()) for key in in_file)

    seed, steps, guidance = 5, 4, 3.0  # guidance given: the worker's defaults are the variant's
    theirs = pipe(
        prompt="sks yellow bar",
        width=SIZE,
        height=SIZE,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=[torch.Generator("cpu").manual_seed(seed)],
        output_type="np",
    ).images[0]
    theirs = np.round(theirs * 255).astype(np.int16)
    params = GenerateInput(
        action="generate",
        prompt="sks yellow bar",
        base_model=family_run.model,
        steps=steps,
        seed=seed,
        guidance_scale=guidance,
    )
    ours = decode(generate_images(params, path, settings).images[0].data)
    base = decode(generate_images(params, None, settings).images[0].data)
    assert int(np.abs(ours - theirs).max()) <= SAME_IMAGE_TOLERANCE
    assert int(np.abs(ours - base).max()) > 4 * SAME_IMAGE_TOLERANCE  # the LoRA does something


def test_base_is_restored_bit_for_bit(family_run: FamilyRun, settings) -> None:
    params = GenerateInput(action="generate", prompt="a cat", base_model=family_run.model, steps=2, seed=1)
    generate_images(params, family_run.result.lora_path, settings)
    assert denoiser_digest(family_run.model, settings) == family_run.base_digest
    assert tuner_layers(models.load_pipeline(family_run.model, settings, torch.float32, CPU).pipe) == []


def test_alpha_is_folded_so_header_blind_loaders_get_the_trained_strength(family_run: FamilyRun) -> None:
    from services.gpu.lora_files import read_metadata

    metadata = read_metadata(family_run.result.lora_path)
    assert (metadata["rank"], metadata["alpha"], metadata["alpha_folded_into_weights"]) == ("4", "8", "true")
    assert re.search(r'"(unet|transformer)\.lora_alpha": 4\b', metadata["lora_adapter_metadata"])
    assert metadata["base_model_family"] == family_of_builtin(family_run.model).name


# --- progress and stop ------------------------------------------------------------------------


def test_generate_reports_every_step_and_stops_between_steps(settings, tmp_path: Path) -> None:
    model = "builtin:tiny-flux"
    updates: list[tuple[dict, bool]] = []
    params = GenerateInput(action="generate", prompt="a cat", base_model=model, steps=5, seed=2)
    base = generate_images(params, None, settings, progress=lambda u, final=False: updates.append((u, final)))
    assert [(u["step"], u["total_steps"], final) for u, final in updates] == [(i, 5, i == 5) for i in range(1, 6)]

    stop = StopSignal()
    seen: list[int] = []

    def stop_at_two(update: dict, final: bool = False) -> None:
        seen.append(update["step"])
        if update["step"] == 2:
            stop.set("cancelled")

    lora = _a_flux_lora(tmp_path, settings)
    with pytest.raises(JobStopped, match=r"generate at step 2 of 5: stopped \(cancelled\)"):
        generate_images(params, lora, settings, progress=stop_at_two, stop=stop)
    assert seen == [1, 2]
    entry = models.load_pipeline(model, settings, torch.float32, CPU)
    assert tuner_layers(entry.pipe) == [] and entry.pipe.scheduler is entry.default_scheduler
    assert generate_images(params, None, settings).images == base.images  # at rest: the same base image


def _a_flux_lora(tmp_path: Path, settings) -> Path:
    params = TrainLoraInput(
        action="train_lora", dataset="d", output_name="f", base_model="builtin:tiny-flux", steps=2, rank=2
    )
    return train_lora(params, write_dataset(tmp_path / "d", count=1), tmp_path / "w", settings).lora_path


def test_training_reports_every_step_and_stops_between_steps(settings, tmp_path: Path) -> None:
    model = "builtin:tiny-flux"
    entry = models.load_pipeline(model, settings, torch.float32, CPU)
    images = [fit(load_rgb(p), (SIZE, SIZE)) for p in sorted(write_dataset(tmp_path / "d", 2).glob("*.png"))]
    updates: list[tuple[int, bool]] = []
    trainer = LoraTrainer(entry, TrainConfig(steps=4, rank=2, alpha=2.0))
    try:
        trainer.setup(images, ["a", "b"])
        reporter = ProgressReporter(lambda u, final=False: updates.append((u["step"], final)), 4, interval=0.0)
        run_steps(trainer, reporter)
    finally:
        trainer.close()
    assert updates == [(1, False), (2, False), (3, False), (4, True)]

    stop = StopSignal()

    def stop_after_first(update: dict, final: bool = False) -> None:
        stop.set("shutdown")

    params = TrainLoraInput(action="train_lora", dataset="d", output_name="s", base_model=model, steps=50, rank=2)
    with pytest.raises(JobStopped, match=r"train_lora at step 1 of 50: stopped \(shutdown\)"):
        train_lora(params, tmp_path / "d", tmp_path / "work", settings, progress=stop_after_first, stop=stop)
    assert tuner_layers(entry.pipe) == []
    assert not any(p.requires_grad for p in entry.pipe.transformer.parameters())


# --- inputs and the seam ----------------------------------------------------------------------


def test_kohya_export_is_refused_where_the_family_does_not_offer_it(settings, tmp_path: Path) -> None:
    params = TrainLoraInput(
        action="train_lora",
        dataset="d",
        output_name="k",
        base_model="builtin:tiny-zimage",
        steps=1,
        export_formats=["kohya"],
    )
    with pytest.raises(InputError, match=r"input\.export_formats: kohya is not offered for Z-Image"):
        train_lora(params, write_dataset(tmp_path / "d", 1), tmp_path / "w", settings)


def test_multi_resolution_trains_each_image_at_each_side(settings, tmp_path: Path) -> None:
    params = TrainLoraInput(
        action="train_lora",
        dataset="d",
        output_name="m",
        base_model="builtin:tiny-zimage",
        steps=2,
        rank=2,
        resolution=[32, 48],
    )
    result = train_lora(params, with_wide_image(tmp_path / "d"), tmp_path / "w", settings)
    metrics = result.metrics
    assert metrics["resolution"] == [32, 48]
    assert sum(metrics["buckets"].values()) == 8 and metrics["buckets"]["32x32"] == 3
    assert metrics["buckets"]["48x48"] == 3


def test_families_are_detected_from_model_index(tmp_path: Path) -> None:
    from services.gpu.families import family_of_index

    for family in FAMILIES:
        assert family_of_index({"_class_name": family.pipeline_classes[0]}) is family
    assert family_of_index({"_class_name": "SomethingElsePipeline"}) is None


def test_only_the_family_seam_names_a_family() -> None:
    """Catches family knowledge leaking out of ``services/gpu/families/`` (an ``if family ==
    "flux"`` in the loop, say). One documented exception: the memory planner's calibrated
    activation models (``services/gpu/memory/``), which a new family may add to and otherwise
    lacks (its jobs then get no plan and run on their explicit inputs)."""
    names = [family.name for family in FAMILIES]
    classes = [cls for family in FAMILIES for cls in family.pipeline_classes]
    literal = re.compile(r"""["']({})["']""".format("|".join(map(re.escape, names))))
    pipeline = re.compile(r"\b({})\b".format("|".join(map(re.escape, classes))))
    seams = (ROOT / "services" / "gpu" / "families", ROOT / "services" / "gpu" / "memory")
    offenders = []
    for path in [ROOT / "rp_handler.py", *sorted((ROOT / "services").rglob("*.py"))]:
        if any(seam in path.parents for seam in seams):
            continue
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if literal.search(line) or pipeline.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert offenders == []


def test_quantized_base_trains_a_lora_that_loads_on_the_full_precision_model(settings, tmp_path: Path) -> None:
    """NF4 frozen base (bitsandbytes runs on the CPU too): the LoRA trains over 4-bit layers,
    samples render with it unfused, the base stays bit for bit, and the file fits the bf16/fp32 model."""
    model = "builtin:tiny-flux"
    entry = models.load_pipeline(model, settings, torch.float32, CPU, quantize=True)
    transformer = family_of_builtin(model).denoiser(entry.pipe)
    assert type(transformer.transformer_blocks[0].attn.to_q).__name__ == "Linear4bit"
    packed = {k: v.clone() for k, v in transformer.state_dict().items()}
    params = TrainLoraInput(
        action="train_lora",
        dataset="d",
        output_name="q",
        base_model=model,
        steps=6,
        rank=2,
        quantize_base="nf4",
        gradient_checkpointing=True,
        sample_prompts=["a cat"],
        sample_steps=2,
    )
    result = train_lora(params, write_dataset(tmp_path / "d", 2), tmp_path / "w", settings)
    assert result.metrics["quantized_base"] == "nf4" and len(result.samples) == 1
    after = transformer.state_dict()
    assert set(after) == set(packed) and all(torch.equal(after[k], packed[k]) for k in packed)
    assert tuner_layers(entry.pipe) == []
    plain = GenerateInput(action="generate", prompt="a cat", base_model=model, steps=2, seed=3)
    assert generate_images(plain, result.lora_path, settings).images != generate_images(plain, None, settings).images
