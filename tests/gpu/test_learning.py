"""Training quality as a user sees it, and proof that training learns.

* A diverged run fails with a clear error, prints strict JSON and leaves the stored LoRA of that
  name byte for byte (through ``python rp_handler.py --test_input``).
* The result carries a finite loss curve and, with ``save_every`` and ``sample_prompts``, a grid
  of the samples by step.
* For every model family, a LoRA trained on one image distribution scores a lower denoising loss
  on unseen images of that distribution than a control LoRA trained the same way on another.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from services.gpu.families import FAMILIES
from tests.test_entrypoint import result_of, run_worker

pytestmark = pytest.mark.gpu


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"non-finite number {constant} in the printed result")

    start = text.index("\n{") + 1
    return json.loads(text[start : text.rindex("}") + 1], parse_constant=refuse)


def _png(colour: tuple[int, int, int], seed: int) -> str:
    rng = np.random.default_rng(seed)
    pixels = np.full((32, 32, 3), colour, np.uint8)
    top, left = rng.integers(0, 16, size=2)
    pixels[top : top + 12, left : left + 12] = (255, 255, 0)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _stored(folder: Path) -> dict[str, bytes]:
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_a_diverged_run_fails_prints_strict_json_and_keeps_the_stored_lora(tmp_path: Path) -> None:
    """Catches: a NaN loss completing the job (``"final_loss": NaN``, invalid JSON), a diverged
    LoRA or checkpoint replacing or joining the stored ones, a missing loss curve or sample grid."""
    files = [{"name": f"{i}.png", "data": _png((40 * i, 60, 200), i)} for i in range(2)]
    upload = {"action": "upload_training_files", "dataset": "d", "files": files}
    assert run_worker(tmp_path, upload).returncode == 0
    good = {
        "action": "train_lora",
        "dataset": "d",
        "output_name": "x",
        "steps": 4,
        "rank": 2,
        "save_every": 2,
        "sample_prompts": ["a red square", "a blue square"],
        "sample_steps": 2,
    }
    trained = run_worker(tmp_path, good)
    assert trained.returncode == 0, result_of(trained)
    result = _strict_json(trained.stdout)
    curve = result["loss_curve"]
    assert curve["steps"] == [1, 2, 3, 4] and (curve["every"], curve["start_step"]) == (1, 0)
    assert len(curve["loss"]) == len(curve["ema"]) == 4
    assert all(math.isfinite(v) and v > 0 for v in curve["loss"] + curve["ema"])
    assert result["sample_grid"]["key"] == "loras/x/x.samples.png"
    with Image.open(tmp_path / "storage" / "loras" / "x" / "x.samples.png") as grid:
        assert grid.size == (64 + 2 * 32, 2 * 32)  # label column + 2 prompts; rows: step 2, step 4
    lora_dir = tmp_path / "storage" / "loras" / "x"
    before = _stored(lora_dir)

    diverging = {
        "action": "train_lora",
        "dataset": "d",
        "output_name": "x",
        "steps": 12,
        "rank": 1,
        "alpha": 1024,
        "learning_rate": 1.0,
        "checkpoint_every": 1,
    }
    failed = run_worker(tmp_path, diverging)
    assert failed.returncode == 1, result_of(failed)
    error = _strict_json(failed.stdout)["error"]
    assert "train_lora diverged at step " in error and "Lower learning_rate (now 1)" in error, error
    after = _stored(lora_dir)
    assert {name: after.get(name) for name in before} == before  # byte for byte
    for name in after:
        if name.endswith(".safetensors"):
            assert all(bool(t.isfinite().all()) for t in load_file(str(lora_dir / name)).values()), name


# --- learning ---------------------------------------------------------------------------------

CAPTION = "a picture"  # one caption for both datasets: only the images tell them apart
TRAIN_IMAGES = 4
HELD_OUT_SEEDS = range(100, 103)
MARGIN = 0.97  # the LoRA of A scores at most 97% of the control's loss on unseen A images
LEARN = {"steps": 30, "rank": 4, "alpha": 8.0, "learning_rate": 3e-3, "batch_size": 2, "lora_targets": "attention+mlp"}


def disc_image(seed: int) -> Image.Image:
    """Dataset A: a red disc of random place and size on a dark blue ground (colours jittered)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32]
    cy, cx, radius = rng.uniform(10, 22), rng.uniform(10, 22), rng.uniform(5, 10)
    pixels = np.empty((32, 32, 3), np.float64)
    pixels[:] = np.array((20, 30, 120)) + rng.normal(0, 8, 3)
    pixels[(y - cy) ** 2 + (x - cx) ** 2 <= radius**2] = np.array((220, 40, 30)) + rng.normal(0, 8, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def stripe_image(seed: int) -> Image.Image:
    """Dataset B: green horizontal stripes of random period and phase on a yellow ground."""
    rng = np.random.default_rng(seed)
    period, phase = int(rng.integers(6, 12)), int(rng.integers(0, 6))
    pixels = np.empty((32, 32, 3), np.float64)
    pixels[:] = np.array((230, 210, 40)) + rng.normal(0, 8, 3)
    rows = (np.arange(32) + phase) % period < period // 2
    pixels[rows] = np.array((30, 160, 60)) + rng.normal(0, 8, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def write_images(folder: Path, draw: Any, seeds: range) -> Path:
    folder.mkdir(parents=True)
    for seed in seeds:
        draw(seed).save(folder / f"{seed}.png")
        (folder / f"{seed}.txt").write_text(CAPTION, encoding="utf-8")
    return folder


@contextmanager
def sharp_posterior(model: str, settings: Any) -> Iterator[None]:
    """The cached tiny VAE with a posterior as sharp as a trained VAE's (std ~0.002), restored after.

    The random tiny VAE's posterior std is ~1 against latent means of ~0.3, so every training
    latent is mostly sampling noise and no LoRA could learn one image set over another.
    """
    from services.gpu import models

    vae = models.load_pipeline(model, settings, torch.float32, torch.device("cpu")).pipe.vae
    last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    saved = last.weight.detach().clone(), last.bias.detach().clone()
    half = last.out_channels // 2  # the output is (mean, log variance)
    with torch.no_grad():
        last.weight[half:] = 0.0
        last.bias[half:] = -12.0
    try:
        yield
    finally:
        with torch.no_grad():
            last.weight.copy_(saved[0])
            last.bias.copy_(saved[1])


def held_out_losses(model: str, tmp_path: Path, settings: Any) -> tuple[float, float, float]:
    """(base, LoRA of A, LoRA of B): the evaluation loss on unseen A images, fixed noise and timesteps."""
    from services.gpu import models
    from services.gpu.adapters import fused_lora
    from services.gpu.params import TrainLoraInput
    from services.gpu.train.job import train_lora
    from services.gpu.train.trainer import evaluation_loss

    loras = {}
    with sharp_posterior(model, settings):
        for name, draw in (("a", disc_image), ("b", stripe_image)):
            dataset = write_images(tmp_path / name, draw, range(TRAIN_IMAGES))
            params = TrainLoraInput(action="train_lora", dataset=name, output_name=name, base_model=model, **LEARN)
            loras[name] = train_lora(params, dataset, tmp_path / f"work-{name}", settings).lora_path
    entry = models.load_pipeline(model, settings, torch.float32, torch.device("cpu"))
    images = [disc_image(seed) for seed in HELD_OUT_SEEDS]
    captions = [CAPTION] * len(images)
    base = evaluation_loss(entry, images, captions, seed=7)
    scores = []
    for name in ("a", "b"):
        with fused_lora(entry, loras[name], 1.0):
            scores.append(evaluation_loss(entry, images, captions, seed=7))
    assert evaluation_loss(entry, images, captions, seed=7) == base  # deterministic, base restored
    return base, scores[0], scores[1]


@pytest.mark.parametrize("family", FAMILIES, ids=[family.name for family in FAMILIES])
def test_a_lora_learns_its_distribution_not_just_any_images(family: Any, tmp_path: Path, settings: Any) -> None:
    """A LoRA of red discs denoises unseen red discs better than a control LoRA of green
    stripes trained the same way (and better than the base).

    Catches: a zero learning rate or a LoRA that is not applied (in training or when loaded:
    both LoRAs score the base's loss), a wrong target sign (the LoRA of A moves away from A and
    scores worse than the control), training on the wrong images or ignoring them."""
    base, own, control = held_out_losses(family.builtin, tmp_path, settings)
    print(f"{family.name}: held-out A loss base {base:.4f}, LoRA of A {own:.4f}, LoRA of B {control:.4f}")
    assert own < control * MARGIN, (base, own, control)
    assert own < base, (base, own, control)
