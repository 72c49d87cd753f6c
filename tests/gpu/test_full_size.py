"""Full-size pipelines built through the families (what ``bench/gpu.py`` measures), on the meta
device: the real module trees, no weights, no memory."""

from __future__ import annotations

import pytest
import torch

from services.gpu.families import FAMILIES, family_of
from services.gpu.families.full_size import MODELS, count_parameters

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("family", FAMILIES, ids=[f.name for f in FAMILIES])
def test_every_family_builds_its_full_size_pipeline(family) -> None:
    """Catches a family whose benchmark model drifts from the runner's pipeline: ``build_full``
    goes through the same ``assemble`` as the tiny model, yields a pipeline of that family, and
    its denoiser is the real config's (FLUX.1-dev 11.9 B parameters, SDXL's UNet 2.6 B, ...)."""
    pipe = family.build_full(torch.device("meta"))
    assert family_of(pipe) is family
    denoiser = family.denoiser(pipe)
    _, cls_name, config = MODELS[family.full_model][family.denoiser_name]
    assert type(denoiser).__name__ == cls_name
    assert all(getattr(denoiser.config, key) == value for key, value in config.items() if not isinstance(value, list))
    assert count_parameters(denoiser) > 500_000_000  # full size, not the tiny model
