"""Generation: reproducibility, formats, schedulers, and LoRA load/unload per job."""

from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from services.errors import InputError
from services.gpu import models
from services.gpu.adapters import tuner_layers
from services.gpu.catalog import SCHEDULER_NAMES
from services.gpu.generate.render import generate_images, scheduler_for
from services.gpu.info import gpu_info
from services.gpu.params import GenerateInput
from tests.gpu.conftest import Trained, decode, gpu_settings

pytestmark = pytest.mark.gpu

CPU = torch.device("cpu")


def run(settings, lora: Path | None = None, **fields: Any) -> list[np.ndarray]:
    params = GenerateInput(**{"action": "generate", "prompt": "sks yellow bar", "steps": 4, "seed": 11, **fields})
    return [decode(image.data) for image in generate_images(params, lora, settings).images]


def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_same_inputs_and_seed_give_the_same_image(settings) -> None:
    first = run(settings)
    assert same(run(settings), first)
    assert not same(run(settings, seed=12), first)
    assert first[0].shape == (32, 32, 3)  # the builtin model's native size


def close(a: np.ndarray, b: np.ndarray, tolerance: int) -> bool:
    return a.shape == b.shape and int(np.abs(a - b).max()) <= tolerance


def test_image_i_uses_seed_plus_i(settings) -> None:
    pair = run(settings, num_images=2, seed=40)
    single = run(settings, seed=41)
    # A batch of two runs the UNet on other tensor shapes than a single image, so the CPU
    # kernels may sum in another order: one 8-bit level of difference is rounding, not a seed.
    assert close(pair[1], single[0], tolerance=2)
    assert int(np.abs(pair[0] - pair[1]).max()) > 16  # other noise, another image


def test_chosen_seed_is_returned_and_reproduces(settings) -> None:
    params = GenerateInput(action="generate", prompt="a cat", steps=2)
    result = generate_images(params, None, settings)
    assert isinstance(result.seed, int) and 0 <= result.seed < 2**32
    again = generate_images(params.model_copy(update={"seed": result.seed}), None, settings)
    assert again.images == result.images


@pytest.mark.parametrize(
    ("fmt", "name", "mime"),
    [
        ("png", "image-0.png", "image/png"),
        ("jpeg", "image-0.jpg", "image/jpeg"),
        ("webp", "image-0.webp", "image/webp"),
    ],
)
def test_formats(settings, fmt: str, name: str, mime: str) -> None:
    params = GenerateInput(
        action="generate", prompt="a cat", steps=2, seed=1, format=fmt, quality=50, width=48, height=40
    )
    (image,) = generate_images(params, None, settings).images
    assert (image.name, image.mime) == (name, mime)
    assert decode(image.data).shape == (40, 48, 3)


def test_scheduler_is_set_per_job(settings) -> None:
    default = run(settings)
    euler = run(settings, scheduler="euler_a")
    assert not same(euler, default)
    entry = models.load_pipeline("builtin:tiny-sd", settings, torch.float32, CPU)
    assert entry.pipe.scheduler is entry.default_scheduler
    assert same(run(settings), default)


def test_incompatible_scheduler_is_an_input_error() -> None:
    from diffusers import FlowMatchEulerDiscreteScheduler

    entry = SimpleNamespace(default_scheduler=FlowMatchEulerDiscreteScheduler(), pipe=SimpleNamespace())
    with pytest.raises(InputError, match=r"input\.scheduler: ddim does not work with"), scheduler_for(entry, "ddim"):
        pass


def test_pixel_limit_applies_to_the_resolved_size() -> None:
    params = GenerateInput(action="generate", prompt="a cat", steps=1, width=80, height=64)
    with pytest.raises(InputError, match="MAX_IMAGE_PIXELS"):
        generate_images(params, None, gpu_settings(max_image_pixels=64 * 64))


def test_sdxl_with_negative_prompt(settings) -> None:
    images = run(settings, base_model="builtin:tiny-sdxl", negative_prompt="blurry", guidance_scale=5.0)
    assert images[0].shape == (32, 32, 3)


# --- LoRA per job -----------------------------------------------------------------------------


def test_lora_changes_the_image_and_scale_zero_is_the_base(trained: Trained, settings) -> None:
    lora = trained.result.lora_path
    base = run(settings)
    tuned = run(settings, lora)
    assert not same(tuned, base)
    assert same(run(settings, lora, lora_scale=0.0), base)
    assert not same(run(settings, lora, lora_scale=0.5), tuned)


def test_no_adapter_leaks_into_the_next_job(trained: Trained, settings) -> None:
    base = run(settings)
    run(settings, trained.result.lora_path)
    entry = models.load_pipeline("builtin:tiny-sd", settings, torch.float32, CPU)
    assert tuner_layers(entry.pipe) == []
    assert entry.pipe.get_list_adapters() == {}
    assert same(run(settings), base)


def test_lora_reproduces_after_save_and_load(trained: Trained, settings) -> None:
    first = run(settings, trained.result.lora_path)
    models.PIPELINES.clear()  # a fresh worker: pipeline rebuilt, file read again
    assert same(run(settings, trained.result.lora_path), first)


def test_kohya_export_reloads_equal(trained: Trained, settings) -> None:
    assert trained.result.kohya_path is not None
    diffusers_images = run(settings, trained.result.lora_path, num_images=2)
    kohya_images = run(settings, trained.result.kohya_path, num_images=2)
    assert same(kohya_images, diffusers_images)


def test_lora_of_another_model_is_an_input_error(trained: Trained, settings, tmp_path: Path) -> None:
    base = run(settings, base_model="builtin:tiny-sdxl")
    with pytest.raises(
        InputError, match=r"input\.lora: the LoRA does not fit builtin:tiny-sdxl \(it was trained for sd\)"
    ) as raised:
        run(settings, trained.result.lora_path, base_model="builtin:tiny-sdxl")
    assert "\n" not in str(raised.value) and len(str(raised.value)) < 400  # one line, not every key
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"not a safetensors file")
    with pytest.raises(InputError, match=r"input\.lora: the LoRA does not fit builtin:tiny-sdxl: "):
        run(settings, broken, base_model="builtin:tiny-sdxl")
    entry = models.load_pipeline("builtin:tiny-sdxl", settings, torch.float32, CPU)
    assert tuner_layers(entry.pipe) == []
    assert same(run(settings, base_model="builtin:tiny-sdxl"), base)


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_every_scheduler_runs(settings, name: str) -> None:
    assert run(settings, scheduler=name, steps=3)[0].shape == (32, 32, 3)


def test_compiled_path_matches_eager_with_lora(trained: Trained, monkeypatch: pytest.MonkeyPatch) -> None:
    """COMPILE=true path (dynamo's eager backend here: the same graph capture, no C++ build)."""
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    plain = gpu_settings()
    compiled = gpu_settings(compile=True)
    lora = trained.result.lora_path
    eager_images = run(plain, lora, guidance_scale=1.0, scheduler="pndm")
    assert same(run(compiled, lora, guidance_scale=1.0, scheduler="pndm"), eager_images)
    assert same(run(compiled), run(plain))  # and the LoRA left nothing behind
    warmups = gpu_info()["compile_warmup_seconds"]
    assert any(key.startswith("generate builtin:tiny-sd 1x32x32") for key in warmups)
    entry = models.load_pipeline("builtin:tiny-sd", compiled, torch.float32, CPU)
    assert type(entry.pipe.unet).__name__ == "UNet2DConditionModel"  # the plain module is back
    models.PIPELINES.clear()  # drop the compiled wrapper (and dynamo's caches) for later tests
