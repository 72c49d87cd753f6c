"""What ``train_lora`` writes and reports (that it learns: tests/gpu/test_learning.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from services.errors import InputError
from services.gpu import compiled, models
from services.gpu.adapters import tuner_layers
from services.gpu.lora_files import read_metadata
from services.gpu.params import TrainLoraInput
from services.gpu.train.job import train_lora
from services.gpu.train.loop import ProgressReporter
from tests.gpu.conftest import SIZE, TRAIN_RANK, TRAIN_STEPS, Trained, decode, gpu_settings, write_dataset

pytestmark = pytest.mark.gpu

CPU = torch.device("cpu")


def test_lora_file_layout_and_metadata(trained: Trained) -> None:
    path = trained.result.lora_path
    assert path.name == "shapes-lora.safetensors"
    tensors = load_file(str(path))
    assert tensors and all(key.startswith("unet.") and "lora" in key for key in tensors)
    metadata = read_metadata(path)
    assert metadata["base_model"] == "builtin:tiny-sd"
    assert (metadata["rank"], metadata["alpha"], metadata["steps"]) == (str(TRAIN_RANK), "8", str(TRAIN_STEPS))
    assert metadata["trigger_word"] == "sks"
    assert metadata["software"].startswith("runpod-lora-worker ")
    assert metadata["software_version"]
    assert metadata["alpha_folded_into_weights"] == "true"
    # alpha is folded into the up weights, so the file says alpha = rank to every loader
    assert f'"unet.lora_alpha": {TRAIN_RANK}' in metadata["lora_adapter_metadata"]


def test_kohya_copy_layout(trained: Trained) -> None:
    kohya = trained.result.kohya_path
    assert kohya is not None and kohya.name == "shapes-lora_kohya.safetensors"
    tensors = load_file(str(kohya))
    assert all(key.startswith("lora_unet_") for key in tensors)
    alphas = [value for key, value in tensors.items() if key.endswith(".alpha")]
    assert alphas and all(float(value) == TRAIN_RANK for value in alphas)  # alpha folded in
    assert read_metadata(kohya)["ss_network_dim"] == str(TRAIN_RANK)


def test_metrics_progress_and_samples(trained: Trained) -> None:
    metrics = trained.result.metrics
    assert metrics["steps"] == TRAIN_STEPS
    assert math.isfinite(metrics["final_loss"]) and metrics["final_loss"] > 0
    curve = trained.result.loss_curve
    assert curve["steps"] == list(range(1, TRAIN_STEPS + 1)) and (curve["every"], curve["start_step"]) == (1, 0)
    assert all(math.isfinite(v) and v > 0 for v in curve["loss"] + curve["ema"])
    assert curve["ema"][-1] == metrics["final_loss"]
    assert metrics["seconds"] >= metrics["train_seconds"] > 0
    assert metrics["steps_per_second"] > 0
    assert (metrics["device"], metrics["precision"], metrics["compiled"]) == ("cpu", "fp32", False)
    calls = trained.progress
    assert 1 <= len(calls) <= TRAIN_STEPS
    keys = {"step", "total_steps", "loss", "steps_per_second", "eta_seconds", "last_checkpoint_step", "final"}
    assert all(set(call) == keys for call in calls)
    assert [call["final"] for call in calls] == [False] * (len(calls) - 1) + [True]
    assert [call["step"] for call in calls] == sorted({call["step"] for call in calls})
    assert calls[-1]["step"] == calls[-1]["total_steps"] == TRAIN_STEPS
    assert calls[-1]["eta_seconds"] == 0
    (sample,) = trained.result.samples
    assert (sample.name, sample.mime) == ("sample-0.png", "image/png")
    assert decode(sample.data).shape == (SIZE, SIZE, 3)


def test_training_leaves_the_cached_pipeline_at_rest(trained: Trained, settings) -> None:
    entry = models.load_pipeline("builtin:tiny-sd", settings, torch.float32, CPU)
    assert tuner_layers(entry.pipe) == []
    assert not getattr(entry.pipe.unet, "peft_config", None)
    assert not any(p.requires_grad for p in entry.pipe.unet.parameters())
    assert not entry.pipe.unet.is_gradient_checkpointing


def test_progress_reporter_throttles() -> None:
    now = [0.0]
    calls: list[dict] = []
    reads: list[int] = []
    finals: list[bool] = []

    def report(update: dict, final: bool = False) -> None:
        calls.append(update)
        finals.append(final)

    reporter = ProgressReporter(report, total_steps=10, interval=1.0, clock=lambda: now[0])
    for step in range(1, 11):
        now[0] += 0.3
        reporter.update(step, lambda step=step: reads.append(step) or 0.5)
    assert [call["step"] for call in calls] == [1, 5, 9, 10]  # 0.3 s apart: once a second, plus the last
    assert reads == [1, 5, 9, 10]
    assert finals == [False, False, False, True]  # the loss (a device sync on a GPU) is read only when reported
    assert calls[1]["eta_seconds"] == pytest.approx(1.5 / 5 * 5)
    assert calls[1]["steps_per_second"] == pytest.approx(5 / 1.5, abs=1e-3)

    resumed: list[dict] = []
    now[0] = 0.0
    reporter = ProgressReporter(
        lambda u, final=False: resumed.append(u), 10, interval=0.0, clock=lambda: now[0], start_step=6
    )
    reporter.last_checkpoint_step = 6
    now[0] = 2.0
    reporter.update(8, lambda: 0.5)  # speed and ETA count this run's steps only
    assert resumed == [
        {
            "step": 8,
            "total_steps": 10,
            "loss": 0.5,
            "steps_per_second": 1.0,
            "eta_seconds": 2.0,
            "last_checkpoint_step": 6,
        }
    ]


def test_sdxl_slow_path_trains_and_loads(tmp_path: Path, settings) -> None:
    """SDXL, bf16 autocast, gradient checkpointing, VAE and text encoders every step."""
    params = TrainLoraInput(
        action="train_lora",
        dataset="d",
        output_name="xl",
        base_model="builtin:tiny-sdxl",
        steps=3,
        rank=2,
        learning_rate=1e-2,
        mixed_precision="bf16",
        gradient_checkpointing=True,
        cache_latents=False,
        cache_text_embeddings=False,
        gradient_accumulation=2,
        export_formats=["kohya"],
    )
    result = train_lora(params, write_dataset(tmp_path / "d", count=2), tmp_path / "work", settings)
    assert result.metrics["precision"] == "bf16" and result.samples == []
    assert result.lora_path.is_file() and result.kohya_path is None  # kohya is the main file
    assert read_metadata(result.lora_path)["lora_format"] == "kohya"
    assert read_metadata(result.lora_path)["base_model_family"] == "sdxl"
    entry = models.load_pipeline("builtin:tiny-sdxl", settings, torch.bfloat16, CPU)
    assert tuner_layers(entry.pipe) == [] and not entry.pipe.unet.is_gradient_checkpointing


def test_fp16_needs_cuda(tmp_path: Path, settings, dataset: Path) -> None:
    params = TrainLoraInput(action="train_lora", dataset="d", output_name="o", steps=1, mixed_precision="fp16")
    with pytest.raises(InputError, match=r"input\.mixed_precision: fp16 needs a CUDA GPU"):
        train_lora(params, dataset, tmp_path, settings)


def test_training_compile_policy(tmp_path: Path) -> None:
    from services.gpu.train.compile_policy import (
        TRAIN_COMPILE_MIN_STEPS,
        TRAIN_COMPILE_MIN_STEPS_WARM,
        remember_warm,
        should_compile,
    )

    cuda = torch.device("cuda")
    cache = compiled.compile_cache_dir(gpu_settings(torchinductor_cache_dir=tmp_path))
    assert cache == tmp_path
    assert not should_compile(None, CPU, 100_000, "k", cache)  # off on the CPU unless asked
    assert should_compile(True, CPU, 1, "k", cache) and not should_compile(False, cuda, 100_000, "k", cache)
    assert not should_compile(None, cuda, TRAIN_COMPILE_MIN_STEPS - 1, "k", cache)  # cold: not worth the warm-up
    assert should_compile(None, cuda, TRAIN_COMPILE_MIN_STEPS, "k", cache)
    assert not should_compile(None, cuda, TRAIN_COMPILE_MIN_STEPS_WARM, "k", cache)
    remember_warm("k", 150.0, cache)  # an earlier worker compiled this configuration
    assert should_compile(None, cuda, TRAIN_COMPILE_MIN_STEPS_WARM, "k", cache)
    assert not should_compile(None, cuda, TRAIN_COMPILE_MIN_STEPS_WARM, "other", cache)


def test_default_steps_follow_the_model_and_the_limit() -> None:
    from services.gpu.families import FLUX
    from services.gpu.train.setup import default_steps

    assert default_steps("builtin:tiny-flux", FLUX, 10_000) == 100
    assert default_steps("org/model", FLUX, 10_000) == FLUX.defaults.steps == 1000
    assert default_steps("org/model", FLUX, 300) == 300
