"""The GPU paths that CPU runs emulate: bf16 training under autocast (CPU autocast stands in for
CUDA's), samples mid-run, and a stop; after each the cached pipeline is at rest, every
component on its device in its dtype, as the next ``generate`` job expects it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.errors import JobStopped
from services.gpu import models
from services.gpu.adapters import tuner_layers
from services.gpu.families import FAMILIES
from services.gpu.params import TrainLoraInput
from services.gpu.quantize import quantize_linear_layers
from services.gpu.train.job import train_lora
from services.gpu.train.loop import run_steps
from services.gpu.train.trainer import LoraTrainer, TrainConfig
from services.job.stop import StopSignal
from tests.gpu.conftest import write_dataset

pytestmark = pytest.mark.gpu

CPU = torch.device("cpu")


def at_rest(entry: models.LoadedPipeline) -> dict[str, Any]:
    """Each module's parameter devices and dtypes, trainable count, and training switches."""
    state: dict[str, Any] = {"scheduler": entry.pipe.scheduler is entry.default_scheduler}
    for name, module in entry.pipe.components.items():
        if isinstance(module, torch.nn.Module):
            params = list(module.parameters())
            state[name] = (
                sorted({str(p.device) for p in params}),
                sorted({str(p.dtype) for p in params}),
                sum(p.requires_grad for p in params),
                module.training,
                getattr(module, "is_gradient_checkpointing", False),
            )
    return state


@pytest.mark.parametrize("model", [family.builtin for family in FAMILIES])
def test_bf16_training_stopped_mid_run_leaves_the_pipeline_at_rest(tmp_path: Path, settings, model) -> None:
    entry = models.load_pipeline(model, settings, torch.bfloat16, CPU)
    before = at_rest(entry)
    stop = StopSignal()

    def progress(update: dict[str, Any], final: bool = False) -> None:
        if update["step"] >= 1:  # the first update goes out unthrottled
            stop.set("cancelled")

    params = TrainLoraInput(
        action="train_lora",
        dataset="d",
        output_name="stopped",
        base_model=model,
        steps=6,
        rank=2,
        mixed_precision="bf16",
        gradient_checkpointing=True,
    )
    with pytest.raises(JobStopped):
        train_lora(params, write_dataset(tmp_path / "d", count=2), tmp_path / "w", settings, progress, stop)
    assert tuner_layers(entry.pipe) == []
    assert at_rest(entry) == before


def test_samples_mid_run_use_the_pipeline_dtype_not_autocast(settings) -> None:
    """Snapshot samples render as ``generate`` does: no autocast (an fp16 SDXL VAE upcast to
    fp32 to decode must stay fp32), the fp32 LoRA over the bf16 base through peft's casts."""
    from PIL import Image

    from services.gpu.generate.render import GenerationRequest, render

    entry = models.load_pipeline("builtin:tiny-sdxl", settings, torch.bfloat16, CPU)
    before = at_rest(entry)
    trainer = LoraTrainer(entry, TrainConfig(steps=1, rank=2, precision="bf16"))
    try:
        trainer.setup([Image.new("RGB", (32, 32), (200, 20, 20))], ["red"])
        run_steps(trainer)
        assert all(p.dtype == torch.float32 for p in trainer.params)
        with trainer.sampling():
            assert not torch.is_autocast_enabled("cpu")
            (image,) = render(
                entry, GenerationRequest(prompt="red", width=32, height=32, seed=0, steps=2), None, compile=False
            )
        assert image.size == (32, 32)
    finally:
        trainer.close()
    assert trainer.params == [] and trainer.optimizer is None  # nothing keeps device memory alive
    assert at_rest(entry) == before


def test_nf4_layers_are_packed_on_the_given_device() -> None:
    layer = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(3, 5))
    assert quantize_linear_layers(layer, torch.float32, CPU) == 1
    weight = layer[0].weight
    assert weight.bnb_quantized and weight.device == CPU and weight.dtype == torch.uint8
    assert type(layer[1]) is torch.nn.Linear  # too small for the 4-bit kernels: left as it was
