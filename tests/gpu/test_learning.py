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

    return json.loads(text, parse_constant=refuse)  # stdout holds the result JSON alone


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
    with_grid = {
        "action": "train_lora",
        "dataset": "d",
        "output_name": "g",
        "steps": 4,
        "rank": 2,
        "save_every": 2,
        "sample_prompts": ["a red square", "a blue square"],
        "sample_steps": 2,
    }
    trained = run_worker(tmp_path, with_grid)
    assert trained.returncode == 0, result_of(trained)
    result = _strict_json(trained.stdout)
    curve = result["loss_curve"]
    assert curve["steps"] == [1, 2, 3, 4] and (curve["every"], curve["start_step"]) == (1, 0)
    assert len(curve["loss"]) == len(curve["ema"]) == 4
    assert all(math.isfinite(v) and v > 0 for v in curve["loss"] + curve["ema"])
    assert result["sample_grid"]["key"] == "loras/g/g.samples.png"
    with Image.open(tmp_path / "storage" / "loras" / "g" / "g.samples.png") as grid:
        assert grid.size == (64 + 2 * 32, 2 * 32)  # label column + 2 prompts; rows: step 2, step 4
    # The LoRA a diverging run must not touch (no snapshots: a new run over another run's
    # snapshots is refused before training unless it sends overwrite, which deletes them).
    good = {"action": "train_lora", "dataset": "d", "output_name": "x", "steps": 4, "rank": 2}
    assert run_worker(tmp_path, good).returncode == 0
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
        "overwrite": True,  # x holds a finished LoRA: only a run that asks may replace it
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
HELD_OUT_SEEDS = range(100, 108)
EVAL_AT = (0.005, 0.02, 0.05, 0.1) * 2  # schedule fractions (each twice, new noise): where the image decides
MARGIN = 0.99  # the LoRA of A scores at most 99% of the control's loss on unseen A images (SDXL: ~0.986)
LEARN = {"steps": 300, "rank": 8, "alpha": 8.0, "batch_size": 1, "lora_targets": "attention+mlp"}
LEARNING_RATE = {"sd": 2e-2}  # the tiny SD UNet learns slowest; every other family: 5e-3


def disc_image(seed: int) -> Image.Image:
    """Dataset A: a red disc of random place and size on a dark blue ground (colours jittered)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32]
    cy, cx, radius = rng.uniform(13, 19), rng.uniform(13, 19), rng.uniform(7, 10)
    pixels = np.empty((32, 32, 3), np.float64)
    pixels[:] = np.array((20, 30, 120)) + rng.normal(0, 8, 3)
    pixels[(y - cy) ** 2 + (x - cx) ** 2 <= radius**2] = np.array((220, 40, 30)) + rng.normal(0, 8, 3)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def stripe_image(seed: int) -> Image.Image:
    """Dataset B: green horizontal stripes of random period and phase on a yellow ground."""
    rng = np.random.default_rng(seed)
    period, phase = int(rng.integers(7, 9)), int(rng.integers(0, 2))
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
def calibrated_vae(model: str, settings: Any) -> Iterator[None]:
    """The cached tiny VAE made to encode as a trained one does, restored after: a sharp posterior
    (std ~0.002) and latents centred with about unit RMS once the family scales them.

    The random tiny VAE's posterior std is ~1 against latent means of 0.04 (SD, scaled) to 0.75
    (FLUX.1): every training latent would be mostly sampling noise, the image a rounding error
    beside the diffusion noise, and no LoRA could learn one image set over another.
    """
    from services.gpu import models
    from services.gpu.train.trainer import encode_latent_dist, pixel_tensor

    vae = models.load_pipeline(model, settings, torch.float32, torch.device("cpu")).pipe.vae
    last = vae.quant_conv if vae.quant_conv is not None else vae.encoder.conv_out
    saved = last.weight.detach().clone(), last.bias.detach().clone()
    half = last.out_channels // 2  # the output is (mean, log variance)
    probe = pixel_tensor([draw(seed) for draw in (disc_image, stripe_image) for seed in range(4)])
    mean, _ = encode_latent_dist(vae, probe)
    centre = mean.mean(dim=(0, 2, 3))  # per channel
    scale, shift = vae.config.scaling_factor, vae.config.shift_factor or 0.0
    gain = 1.0 / (scale * float((mean - centre.view(1, -1, 1, 1)).pow(2).mean().sqrt()))
    with torch.no_grad():  # (mean - centre) * gain + shift: centred, unit RMS once the family scales it
        last.weight[:half] *= gain
        last.bias[:half] = (last.bias[:half] - centre) * gain + shift
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
    from services.gpu.families import family_of_builtin
    from services.gpu.params import TrainLoraInput
    from services.gpu.train.evaluation import evaluation_loss
    from services.gpu.train.job import train_lora

    entry = models.load_pipeline(model, settings, torch.float32, torch.device("cpu"))
    images = [disc_image(seed) for seed in HELD_OUT_SEEDS]
    captions = [CAPTION] * len(images)
    loras = {}
    with calibrated_vae(model, settings):
        for name, draw in (("a", disc_image), ("b", stripe_image)):
            dataset = write_images(tmp_path / name, draw, range(TRAIN_IMAGES))
            rate = LEARNING_RATE.get(family_of_builtin(model).name, 5e-3)
            params = TrainLoraInput(
                action="train_lora", dataset=name, output_name=name, base_model=model, learning_rate=rate, **LEARN
            )
            loras[name] = train_lora(params, dataset, tmp_path / f"work-{name}", settings).lora_path
        base = evaluation_loss(entry, images, captions, seed=7, fractions=EVAL_AT)
        scores = []
        for name in ("a", "b"):
            with fused_lora(entry, loras[name], 1.0):
                scores.append(evaluation_loss(entry, images, captions, seed=7, fractions=EVAL_AT))
        assert evaluation_loss(entry, images, captions, seed=7, fractions=EVAL_AT) == base  # base restored
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


# --- divergence, curve and grid, unit by unit -------------------------------------------------


def test_loss_log_names_the_first_non_finite_step_and_bounds_the_curve() -> None:
    """Catches: a NaN loss passing the check, the wrong step named, an unbounded or wrongly
    averaged curve for a long run."""
    from services.errors import TrainingDiverged
    from services.gpu.train.loop import MAX_CURVE_POINTS, LossLog
    from services.gpu.train.trainer import TrainConfig

    log = LossLog(TrainConfig(steps=1210, learning_rate=0.5), 10, torch.device("cpu"))
    for step in range(11, 1211):
        log.record(torch.tensor(float(step)), torch.tensor(float(step) - 0.5))
    log.check()
    curve = log.curve()
    assert (curve["every"], curve["start_step"]) == (3, 10) and len(curve["steps"]) == 400 <= MAX_CURVE_POINTS
    assert (curve["steps"][0], curve["loss"][0], curve["ema"][0]) == (13, 12.0, 12.5)
    assert curve["steps"][-1] == 1210

    log = LossLog(TrainConfig(steps=20), 10, torch.device("cpu"))
    for value in (1.0, 2.0, math.inf, math.nan):
        log.record(torch.tensor(value), torch.tensor(value))
    with pytest.raises(TrainingDiverged, match=r"diverged at step 13 of 20: the loss is inf.*Lower learning_rate"):
        log.check()


def test_sample_grid_has_a_row_per_kept_step_and_a_column_per_prompt() -> None:
    """Catches: rows and columns swapped, an unbounded grid for a long run, the final row lost."""
    from services.gpu.encode import encode_image
    from services.gpu.train.grid import LABEL_WIDTH, SampleGrid

    samples = [encode_image(Image.new("RGB", (32, 32), (i * 80, 0, 0)), f"s{i}") for i in range(3)]
    grid = SampleGrid(prompts=3, resolution=32, max_rows=4)
    for step in range(1, 11):
        grid.add(step * 10, samples)
    assert [step for step, _ in grid.rows] == [10, 50, 90]  # thinned to every 4th snapshot
    rendered = grid.render(100, samples)
    with Image.open(io.BytesIO(rendered.data)) as image:
        assert image.size == (LABEL_WIDTH + 3 * 32, 4 * 32)
        assert image.getpixel((LABEL_WIDTH + 2 * 32 + 5, 3 * 32 + 5)) == (160, 0, 0)  # last row, third prompt


def test_a_result_with_a_non_finite_number_is_refused() -> None:
    """Catches: NaN or infinity reaching the response (invalid strict JSON)."""
    import asyncio

    from pydantic import BaseModel

    from services.errors import ResultNotJson
    from services.output.files import OutputPolicy
    from tests.gpu.conftest import gpu_settings

    class Result(BaseModel):
        metrics: dict[str, Any]

    policy = OutputPolicy(None, gpu_settings(), "job")  # type: ignore[arg-type]
    assert asyncio.run(policy.render(Result(metrics={"loss": [1.0, 2.0]}))) == {"metrics": {"loss": [1.0, 2.0]}}
    with pytest.raises(ResultNotJson, match=r"non-finite number at output\.metrics\.curve\[1\]"):
        asyncio.run(policy.render(Result(metrics={"curve": [0.5, math.nan]})))


def test_no_snapshot_or_checkpoint_of_a_non_finite_lora(settings: Any, tmp_path: Path) -> None:
    """Catches: a snapshot or checkpoint written from LoRA weights that are NaN."""
    from services.errors import TrainingDiverged
    from services.gpu import models
    from services.gpu.train.durable import Durability
    from services.gpu.train.trainer import LoraTrainer, TrainConfig

    entry = models.load_pipeline("builtin:tiny-sd", settings, torch.float32, torch.device("cpu"))
    trainer = LoraTrainer(entry, TrainConfig(steps=4, rank=2, alpha=2.0))
    snapshots: list[int] = []
    try:
        trainer.setup([disc_image(0)], [CAPTION])
        hook = Durability(trainer, None, "h", tmp_path, every=1, minutes=10, save_every=1, snapshot=snapshots.append)
        hook(1, None)
        with torch.no_grad():
            trainer.params[0][0, 0] = math.nan
        with pytest.raises(TrainingDiverged, match=r"diverged at step 2 of 4: a LoRA weight is not finite"):
            hook(2, None)
    finally:
        trainer.close()
    assert snapshots == [1]
