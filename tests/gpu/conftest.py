"""Shared fixtures of the GPU runner tests: tiny models on the CPU, a synthetic dataset, and one
LoRA trained once per session (training is the slow part)."""

from __future__ import annotations

import io
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from config.settings import Settings, build_settings

TRAIN_STEPS = 60
TRAIN_RANK = 4
TRAIN_ALPHA = 8.0  # not the rank, so a lost alpha would show
SIZE = 32


def gpu_settings(**overrides: Any) -> Settings:
    """Settings for the runner tests: builtin tiny model, no compilation, both tiny models cached."""
    values: dict[str, Any] = {"model_id": "builtin:tiny-sd", "model_cache_size": 2, "compile": False}
    values.update(overrides)
    return build_settings(**values)


def decode(data: bytes) -> np.ndarray:
    """An encoded image as an int array (for exact comparisons)."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def write_dataset(folder: Path, count: int = 4) -> Path:
    """Simple coloured shapes (40 px, cropped to 32) with captions."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        pixels = np.zeros((40, 40, 3), np.uint8)
        pixels[..., i % 3] = 200
        pixels[10:30, 5 + 5 * i : 15 + 5 * i] = (255, 255, 0)
        Image.fromarray(pixels).save(folder / f"shape{i}.png")
        (folder / f"shape{i}.txt").write_text(f"yellow bar {i}", encoding="utf-8")
    return folder


@dataclass
class Trained:
    result: Any
    progress: list[dict[str, Any]] = field(default_factory=list)
    dataset: Path = Path()


@pytest.fixture(scope="session", autouse=True)
def _one_cpu_thread() -> Iterator[None]:
    """The tiny models are faster on one thread, and a shared 2-core runner stalls OpenMP teams."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def settings() -> Settings:
    return gpu_settings()


@pytest.fixture(scope="session")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("dataset"))


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory, dataset: Path, settings: Settings) -> Trained:
    """One LoRA trained on the tiny SD model, with a kohya copy and one sample."""
    from services.gpu.params import TrainLoraInput
    from services.gpu.train.job import train_lora

    params = TrainLoraInput(
        action="train_lora",
        dataset="shapes",
        output_name="shapes-lora",
        trigger_word="sks",
        steps=TRAIN_STEPS,
        rank=TRAIN_RANK,
        alpha=TRAIN_ALPHA,
        learning_rate=3e-3,
        batch_size=2,
        sample_prompts=["sks yellow bar"],
        sample_steps=4,
        export_formats=["diffusers", "kohya"],
    )
    progress: list[dict[str, Any]] = []

    def report(update: dict[str, Any], final: bool = False) -> None:
        progress.append({**update, "final": final})

    result = train_lora(params, dataset, tmp_path_factory.mktemp("work"), settings, progress=report)
    return Trained(result=result, progress=progress, dataset=dataset)
