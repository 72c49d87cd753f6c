"""A deterministic denoising loss (fixed noise and timesteps): it falls when the model, with
whatever LoRA is fused in, has learned the images; the learning tests and the benchmark use it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.gpu.families import trainable
from services.gpu.train.trainer import encode_latent_dist, pixel_tensor

if TYPE_CHECKING:
    from PIL import Image

    from services.gpu.models import LoadedPipeline

EVAL_FRACTIONS = (0.05, 0.2, 0.4, 0.6, 0.8, 0.95)


def evaluation_loss(
    entry: LoadedPipeline,
    images: Sequence[Image.Image],
    captions: Sequence[str],
    seed: int = 0,
    fractions: Sequence[float] = EVAL_FRACTIONS,
) -> float:
    """Denoising loss with fixed noise and timesteps over the posterior means of same-size
    images: it falls when the model (with whatever LoRA is fused in) has learned them."""
    import torch
    import torch.nn.functional as F

    family = trainable(entry.family, entry.pipe)
    denoiser = family.denoiser(entry.pipe)
    device = denoiser.device
    mean, _ = encode_latent_dist(entry.pipe.vae, pixel_tensor(images))
    latents = family.to_model_latents(entry.pipe, mean)
    text = family.collate_text(family.encode_text(entry.pipe, captions))
    schedule = family.schedule(entry.pipe, device)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    with torch.no_grad():
        for fraction in fractions:
            noise = torch.randn(latents.shape, generator=generator).to(device)
            steps = schedule.at(fraction, len(images), device)
            noisy, target = schedule.noisy_and_target(latents, noise, steps)
            prediction = family.predict(entry.pipe, denoiser, noisy.to(denoiser.dtype), steps, text)
            losses.append(F.mse_loss(prediction.float(), target.float()).item())
    return sum(losses) / len(losses)
