"""Job inputs of the GPU actions: static bounds, names, settings-dependent limits."""

from __future__ import annotations

from typing import Annotated, Any

import pytest
from pydantic import Field, TypeAdapter, ValidationError

from services.errors import InputError
from services.gpu.params import GenerateInput, TrainLoraInput
from tests.gpu.conftest import gpu_settings

pytestmark = pytest.mark.gpu

Job = TypeAdapter(Annotated[TrainLoraInput | GenerateInput, Field(discriminator="action")])


def train(**fields: Any) -> TrainLoraInput:
    return TrainLoraInput(**{"action": "train_lora", "dataset": "set", "output_name": "out", **fields})


def generate(**fields: Any) -> GenerateInput:
    return GenerateInput(**{"action": "generate", "prompt": "a cat", **fields})


def test_defaults() -> None:
    job = train()
    assert (job.steps, job.rank, job.alpha, job.mixed_precision) == (None, None, None, "auto")
    assert (job.learning_rate, job.resolution, job.lora_targets) == (None, None, None)  # the family's
    assert (job.gradient_checkpointing, job.timestep_sampling, job.sample_steps) == (None, None, None)
    assert job.cache_latents and job.cache_text_embeddings
    assert job.export_formats is None  # the family's default, resolved by the runner
    gen = generate()
    assert (gen.num_images, gen.width, gen.seed, gen.scheduler, gen.format) == (1, None, None, "default", "png")


def test_discriminated_union_picks_the_model() -> None:
    assert isinstance(Job.validate_python({"action": "generate", "prompt": "x"}), GenerateInput)
    job = Job.validate_python({"action": "train_lora", "dataset_url": "https://x/y.zip", "output_name": "o"})
    assert isinstance(job, TrainLoraInput)


@pytest.mark.parametrize("name", ["../x", "a/b", "..", ".", "a\\b", "", "x" * 129, "a b", "é"])
def test_unsafe_names_are_rejected(name: str) -> None:
    with pytest.raises(ValidationError, match="output_name"):
        train(output_name=name)
    with pytest.raises(ValidationError, match="dataset"):
        train(dataset=name)


@pytest.mark.parametrize("name", ["my-lora", "v1.2_final", "A", "x" * 128])
def test_safe_names_pass(name: str) -> None:
    assert train(output_name=name, dataset=name).output_name == name


def test_exactly_one_dataset_source() -> None:
    with pytest.raises(ValidationError, match="exactly one of dataset or dataset_url"):
        train(dataset_url="https://example.com/d.zip")
    with pytest.raises(ValidationError, match="exactly one of dataset or dataset_url"):
        TrainLoraInput(action="train_lora", output_name="o")
    assert train(dataset=None, dataset_url="https://example.com/d.zip").dataset_url


@pytest.mark.parametrize(
    "value", ["builtin:tiny-sd", "builtin:tiny-sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "/models/sd15"]
)
def test_base_model_forms(value: str) -> None:
    assert generate(base_model=value).base_model == value


@pytest.mark.parametrize("value", ["builtin:huge", "not a repo", "org/name/extra", "/models/../etc", "../x"])
def test_bad_base_models(value: str) -> None:
    with pytest.raises(ValidationError, match="base_model"):
        generate(base_model=value)


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"steps": 0}, "steps"),
        ({"rank": 0}, "rank"),
        ({"resolution": 100}, "resolution"),  # not a multiple of 8
        ({"learning_rate": 0}, "learning_rate"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"export_formats": []}, "export_formats"),
        ({"export_formats": ["onnx"]}, "export_formats"),
        ({"sample_prompts": ["p"] * 9}, "sample_prompts"),
        ({"unknown": 1}, "unknown"),
        ({"dataset_url": "ftp://x"}, "dataset_url"),
        ({"trigger_word": "two\nlines"}, "trigger_word"),
    ],
)
def test_train_static_bounds(fields: dict[str, Any], where: str) -> None:
    if "dataset_url" in fields:
        fields = {**fields, "dataset": None}
    with pytest.raises(ValidationError, match=where):
        train(**fields)


@pytest.mark.parametrize(
    ("fields", "where"),
    [
        ({"num_images": 9}, "num_images"),
        ({"num_images": 0}, "num_images"),
        ({"width": 500}, "width"),
        ({"height": 4096}, "height"),
        ({"steps": 0}, "steps"),
        ({"quality": 101}, "quality"),
        ({"format": "gif"}, "format"),
        ({"scheduler": "magic"}, "scheduler"),
        ({"prompt": ""}, "prompt"),
        ({"lora": "../secret"}, "lora"),
        ({"lora": "/abs/key"}, "lora"),
        ({"lora_url": "file:///etc/passwd"}, "lora_url"),
        ({"extra": True}, "extra"),
    ],
)
def test_generate_static_bounds(fields: dict[str, Any], where: str) -> None:
    with pytest.raises(ValidationError, match=where):
        generate(**fields)


def test_lora_and_lora_url_are_exclusive() -> None:
    with pytest.raises(ValidationError, match="at most one of lora or lora_url"):
        generate(lora="loras/a/a.safetensors", lora_url="https://example.com/a.safetensors")
    assert generate(lora="loras/a/a.safetensors").lora == "loras/a/a.safetensors"


def test_export_formats_are_deduplicated() -> None:
    assert train(export_formats=["kohya", "diffusers", "kohya"]).export_formats == ["kohya", "diffusers"]


def test_train_limits_from_settings() -> None:
    settings = gpu_settings(max_train_steps=500, max_gen_steps=20, max_image_pixels=256 * 256)
    train(steps=500, resolution=256).check_limits(settings)
    with pytest.raises(InputError, match=r"^input\.steps: at most 500 \(MAX_TRAIN_STEPS\)$"):
        train(steps=501).check_limits(settings)
    with pytest.raises(InputError, match=r"input\.sample_steps: at most 20 \(MAX_GEN_STEPS\)"):
        train(steps=10, sample_prompts=["p"], sample_steps=21).check_limits(settings)
    with pytest.raises(InputError, match=r"input\.resolution: .*MAX_IMAGE_PIXELS"):
        train(steps=10, resolution=264).check_limits(settings)


def test_generate_limits_from_settings() -> None:
    settings = gpu_settings(max_gen_steps=30, max_images_per_request=2, max_image_pixels=512 * 512)
    generate(steps=30, num_images=2, width=512, height=512).check_limits(settings)
    with pytest.raises(InputError, match=r"^input\.steps: at most 30 \(MAX_GEN_STEPS\)$"):
        generate(steps=31).check_limits(settings)
    with pytest.raises(InputError, match=r"input\.num_images: at most 2 \(MAX_IMAGES_PER_REQUEST\)"):
        generate(num_images=3).check_limits(settings)
    with pytest.raises(InputError, match=r"input\.width: 520x512 .*MAX_IMAGE_PIXELS"):
        generate(width=520, height=512).check_limits(settings)


def test_json_schema_is_available() -> None:
    schema = Job.json_schema()
    assert {"TrainLoraInput", "GenerateInput"} <= set(schema["$defs"])


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"learning_rate": float("nan")}, "finite number"),
        ({"learning_rate": float("inf")}, "finite number"),
        ({"trigger_word": "sks\u202e"}, r"invisible characters \(found '\\u202e'\)"),
        ({"trigger_word": "s\u200bks"}, r"invisible characters \(found '\\u200b'\)"),
        ({"auto_caption": {"prefix": "a\u2028photo"}}, "on one line"),
    ],
)
def test_numbers_are_finite_and_caption_text_has_no_hidden_characters(fields: dict[str, Any], message: str) -> None:
    """Catches a NaN learning rate refused with a misleading bound, and a trigger word or caption
    prefix that writes a right-to-left override or a zero-width space into every caption."""
    with pytest.raises(ValidationError, match=message):
        train(**fields)
