"""Variant-aware defaults (issue #16): generation steps and guidance per model variant, FLUX.1's
training targets, fp16 refusal, symmetric buckets, chunked caption encoding, the caption cap,
the distilled-base warning and training adapter, and the tiny Z-Image at its input limits."""

from __future__ import annotations

import base64
import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from services.errors import InputError, JobStopped
from services.gpu import models
from services.gpu.adapters import tuner_layers
from services.gpu.families import FLUX, SD, ZIMAGE
from services.gpu.generate.render import GenerationRequest, generate_images, with_defaults
from services.gpu.params import GenerateInput, TrainLoraInput
from services.gpu.train.buckets import bucket_sizes, nearest_bucket
from services.gpu.train.dataset import scan_dataset
from services.gpu.train.job import train_lora
from services.gpu.train.setup import train_config
from services.gpu.train.trainer import LoraTrainer, TrainConfig
from services.job.stop import StopSignal
from tests.gpu.conftest import decode, gpu_settings, write_dataset
from tests.test_entrypoint import printed_result, result_of, run_worker

pytestmark = pytest.mark.gpu

CPU = torch.device("cpu")
SETTINGS = gpu_settings()


def train(dataset: Path, work: Path, adapter: Path | None = None, **fields: Any) -> Any:
    params = TrainLoraInput(
        **{"action": "train_lora", "dataset": "d", "output_name": "o", "steps": 1, "rank": 2, **fields}
    )
    work.mkdir(parents=True, exist_ok=True)
    return train_lora(params, dataset, work, SETTINGS, training_adapter=adapter)


# --- generation defaults ----------------------------------------------------------------------


def test_schnell_generate_through_test_input_uses_4_steps_at_guidance_0(tmp_path: Path) -> None:
    """Catches generate ignoring the variant (25 steps and the pipeline's 3.5 on schnell)."""
    job = {"action": "generate", "prompt": "a cat", "base_model": "builtin:tiny-flux-schnell", "seed": 1}
    completed = run_worker(tmp_path, job)
    assert completed.returncode == 0, result_of(completed)
    result = printed_result(completed)
    assert (result["steps"], result["guidance_scale"]) == (4, 0.0)


@pytest.mark.parametrize(
    ("model", "steps", "guidance"),
    [
        ("builtin:tiny-flux", 28, 3.5),
        ("builtin:tiny-flux-schnell", 4, 0.0),
        ("builtin:tiny-zimage", 50, 4.0),
        ("builtin:tiny-zimage-turbo", 9, 0.0),
        ("builtin:tiny-sd", 25, 7.5),  # SD: the pipeline's own guidance, as before
    ],
)
def test_variant_defaults_and_caller_overrides(model: str, steps: int, guidance: float) -> None:
    """Catches a wrong variant table or signal, and defaults overriding the caller's values."""
    entry = models.load_pipeline(model, SETTINGS, torch.float32, CPU)
    request = GenerationRequest(prompt="p", width=32, height=32, seed=0)
    resolved = with_defaults(entry, request)
    assert (resolved.steps, resolved.guidance_scale) == (steps, guidance)
    assert with_defaults(entry, request, max_steps=3).steps == min(steps, 3)  # MAX_GEN_STEPS
    own = with_defaults(entry, GenerationRequest(prompt="p", width=32, height=32, seed=0, steps=2, guidance_scale=1.5))
    assert (own.steps, own.guidance_scale) == (2, 1.5)


def test_turbo_generate_reports_and_runs_its_defaults() -> None:
    """Catches a reported value that is not the one the pipeline ran (progress counts the steps)."""
    seen: list[dict[str, Any]] = []
    params = GenerateInput(action="generate", prompt="a cat", base_model="builtin:tiny-zimage-turbo", seed=1)
    result = generate_images(params, None, SETTINGS, progress=lambda update, final=False: seen.append(update))
    assert (result.steps, result.guidance_scale) == (9, 0.0)
    assert seen[-1] == {"step": 9, "total_steps": 9}


@pytest.mark.parametrize(("width", "height"), [(16, 2048), (2048, 16)])
def test_tiny_zimage_takes_the_longest_prompt_at_the_extreme_sizes(width: int, height: int) -> None:
    """Catches the tiny Z-Image's RoPE table (axes_lens) being shorter than the caption plus the
    image ("IndexError: index 513 is out of bounds")."""
    params = GenerateInput(
        action="generate", prompt="x" * 2000, base_model="builtin:tiny-zimage", steps=1, width=width, height=height
    )
    (image,) = generate_images(params, None, SETTINGS).images
    assert decode(image.data).shape == (height, width, 3)


def test_tiny_zimage_trains_on_a_2000_character_caption(tmp_path: Path) -> None:
    """Catches the same RoPE overflow on the training path (a caption at the MAX_CAPTION_CHARS default)."""
    dataset = write_dataset(tmp_path / "d", count=1)
    (dataset / "shape0.txt").write_text("y" * 2000, encoding="utf-8")
    result = train(dataset, tmp_path, base_model="builtin:tiny-zimage")
    assert result.lora_path.is_file()


# --- training defaults ------------------------------------------------------------------------


def test_flux_default_trains_every_linear_of_its_blocks(tmp_path: Path) -> None:
    """Catches FLUX.1 defaulting to attention only (266 of ai-toolkit's 494 modules), and the
    model's own top-level proj_out (not a block) getting LoRA."""
    result = train(write_dataset(tmp_path / "d", count=1), tmp_path, base_model="builtin:tiny-flux")
    modules = {key.split(".lora")[0] for key in load_file(str(result.lora_path))}
    # the tiny FLUX.1 has one double block (14 linear layers) and one single block (6)
    assert len(modules) == 20, sorted(modules)
    assert "transformer.single_transformer_blocks.0.proj_out" in modules
    assert "transformer.transformer_blocks.0.norm1_context.linear" in modules
    assert "transformer.proj_out" not in modules
    assert result.metrics["lora_targets"][-1] == "proj_out"
    assert result.metrics["timestep_sampling"] == "shift"
    assert result.metrics["gradient_checkpointing"] is False  # a tiny model never needs it


@pytest.mark.parametrize(("family", "checkpointing"), [(FLUX, True), (ZIMAGE, True), (SD, False)])
def test_gradient_checkpointing_default_at_full_size(family: Any, checkpointing: bool) -> None:
    """Catches full-size FLUX.1 / Z-Image training without checkpointing by default, and the
    input not turning it off."""
    entry = SimpleNamespace(family=family, pipe=None, native_size=1024)
    params = TrainLoraInput(action="train_lora", dataset="d", output_name="o", steps=1)
    cfg = train_config(params, "m", entry, SETTINGS, "bf16", [1024], CPU, None)  # type: ignore[arg-type]
    assert cfg.gradient_checkpointing is checkpointing
    off = params.model_copy(update={"gradient_checkpointing": False})
    assert train_config(off, "m", entry, SETTINGS, "bf16", [1024], CPU, None).gradient_checkpointing is False  # type: ignore[arg-type]


def test_timestep_sampling_offered_per_family() -> None:
    """Catches a flow-only sampling accepted for a DDPM model, or an offered one refused."""
    params = TrainLoraInput(action="train_lora", dataset="d", output_name="o", steps=1, timestep_sampling="sigmoid")
    flux = SimpleNamespace(family=FLUX, pipe=None, native_size=32)
    assert train_config(params, "m", flux, SETTINGS, "fp32", [32], CPU, None).timestep_sampling == "sigmoid"  # type: ignore[arg-type]
    sd = SimpleNamespace(family=SD, pipe=None, native_size=32)
    with pytest.raises(InputError, match=r"input\.timestep_sampling: sigmoid is not offered for SD"):
        train_config(params, "m", sd, SETTINGS, "fp32", [32], CPU, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(("model", "label"), [("builtin:tiny-flux", "FLUX.1"), ("builtin:tiny-zimage", "Z-Image")])
def test_fp16_is_refused_for_flux_and_zimage(tmp_path: Path, model: str, label: str) -> None:
    """Catches fp16 accepted for a family whose T5/activations overflow in it (checked before the
    model loads and before the CUDA check, so it shows on the CPU too)."""
    dataset = write_dataset(tmp_path / "d", count=1)
    with pytest.raises(InputError, match=rf"input\.mixed_precision: fp16 overflows in {label}.*use bf16"):
        train(dataset, tmp_path, base_model=model, mixed_precision="fp16")


# --- buckets and captions ---------------------------------------------------------------------


@pytest.mark.parametrize(("side", "step"), [(512, 64), (768, 64), (1024, 64), (32, 8)])
def test_buckets_are_symmetric(side: int, step: int) -> None:
    """Catches a bucket list that steps only the widths (portraits got coarser buckets)."""
    sizes = bucket_sizes(side, step)
    assert {(h, w) for w, h in sizes} == set(sizes)
    assert nearest_bucket(512, 768, sizes) == nearest_bucket(768, 512, sizes)[::-1]


def test_portrait_2_3_keeps_its_height_at_512() -> None:
    """Catches the 2:3 portrait's bucket cutting 14 % of its height (448x576) where the 3:2
    landscape's bucket (640x384) cuts 10 % of its width."""
    width, height = nearest_bucket(512, 768, bucket_sizes(512, 64))
    lost = 1 - (height / width) / 1.5  # < 0: the width is cut instead
    assert abs(lost) < 0.12, (width, height)


def test_caption_encoding_is_chunked_and_stops(monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches all captions encoded in one batch, or no stop check between chunks."""
    from PIL import Image

    entry = models.load_pipeline("builtin:tiny-sd", SETTINGS, torch.float32, CPU)
    stop = StopSignal()
    calls: list[int] = []
    encode = entry.family.encode_text  # type: ignore[union-attr]

    def encode_then_stop(pipe: Any, captions: Any) -> Any:
        calls.append(len(captions))
        stop.set("deadline")
        return encode(pipe, captions)

    monkeypatch.setattr(entry.family, "encode_text", encode_then_stop)
    trainer = LoraTrainer(entry, TrainConfig(steps=1, rank=2, alpha=2.0))
    images = [Image.new("RGB", (32, 32), (i, 0, 0)) for i in range(20)]
    try:
        with pytest.raises(JobStopped, match="encoding captions"):
            trainer.setup(images, [f"caption {i}" for i in range(20)], stop)
    finally:
        trainer.close()
    assert calls == [8]  # one chunk, then the stop


def test_caption_over_the_cap_is_named(tmp_path: Path) -> None:
    """Catches an unbounded caption (a 5 MB one held a job past its deadline)."""
    dataset = write_dataset(tmp_path / "d", count=2)
    (dataset / "shape1.txt").write_text("z" * 2001, encoding="utf-8")
    with pytest.raises(InputError, match=r"caption shape1\.txt is over 2000 characters \(MAX_CAPTION_CHARS\)"):
        scan_dataset(dataset)
    (dataset / "shape1.txt").write_text("z" * 5_000_000, encoding="utf-8")
    with pytest.raises(InputError, match=r"shape1\.txt is over 100 characters"):
        scan_dataset(dataset, max_caption_chars=100)
    (dataset / "shape1.txt").write_text("z" * 2000, encoding="utf-8")
    assert len(scan_dataset(dataset)[1].caption) == 2000


# --- distilled bases --------------------------------------------------------------------------


def test_distilled_base_warns_and_the_training_adapter_is_merged_then_gone(tmp_path: Path) -> None:
    """Catches a distilled base trained without a warning, an adapter that is not applied while
    training, one that leaks into the saved file, or base weights left changed."""
    dataset = write_dataset(tmp_path / "d", count=1)
    schnell = "builtin:tiny-flux-schnell"
    plain = train(dataset, tmp_path / "a", base_model=schnell, lora_targets="attention", seed=3)
    assert plain.warnings and "FLUX.1-schnell is step-distilled" in plain.warnings[0]
    assert not train(dataset, tmp_path / "dev", base_model="builtin:tiny-flux", steps=1).warnings
    # a strong adapter: the plain LoRA's weights scaled up, on other layers (rank 2, attention)
    adapter = tmp_path / "adapter.safetensors"
    save_file({k: v * 50 for k, v in load_file(str(plain.lora_path)).items()}, str(adapter))
    entry = models.load_pipeline(schnell, SETTINGS, torch.float32, CPU)
    before = {k: v.clone() for k, v in entry.pipe.transformer.state_dict().items()}
    with_adapter = train(
        dataset, tmp_path / "b", base_model=schnell, lora_targets="attention", seed=3, rank=4, adapter=adapter
    )
    assert with_adapter.warnings == []
    tensors = load_file(str(with_adapter.lora_path))
    assert all(4 in v.shape for v in tensors.values())  # rank 4 only: nothing of the rank-2 adapter
    after = entry.pipe.transformer.state_dict()
    assert tuner_layers(entry.pipe) == [] and all(torch.equal(before[k], after[k]) for k in before)
    # it was active: the same run without it learned other weights
    again = load_file(
        str(train(dataset, tmp_path / "c", base_model=schnell, lora_targets="attention", seed=3, rank=4).lora_path)
    )
    assert any(not torch.equal(tensors[k], again[k]) for k in tensors)


def test_training_adapter_key_is_fetched_from_storage_through_test_input(tmp_path: Path) -> None:
    """Catches a training_adapter input that is accepted but never fetched (the job would train
    without it): a key with no LoRA behind it fails naming the field."""
    buffer = io.BytesIO()
    Image.new("RGB", (16, 8), (200, 30, 30)).save(buffer, "PNG")
    pixel = base64.b64encode(buffer.getvalue()).decode()
    upload = {"action": "upload_training_files", "dataset": "ds", "files": [{"name": "a.png", "data": pixel}]}
    assert run_worker(tmp_path, upload).returncode == 0
    job = {
        "action": "train_lora",
        "dataset": "ds",
        "output_name": "o",
        "base_model": "builtin:tiny-flux-schnell",
        "training_adapter": "no-such-adapter",
    }
    output = result_of(run_worker(tmp_path, job))
    assert "input.training_adapter: no LoRA stored at loras/no-such-adapter/" in output
