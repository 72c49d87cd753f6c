"""The model-family seam: the only package that names a family.

Adding a family is one module here (a :class:`~services.gpu.families.base.ModelFamily`
subclass with its tiny built-in model; copy ``example.py`` and follow ``README.md`` beside it)
plus its line in :data:`FAMILIES`. Everything else derives from that list: the builtin model
names (:data:`services.gpu.catalog.BUILTIN_MODELS`), the job input schema and every family
test. Lookups do not depend on the order of the list. Nothing here imports torch at import time.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.errors import InputError
from services.gpu.families.base import ModelFamily
from services.gpu.families.flux import FAMILY as FLUX
from services.gpu.families.sd import FAMILY as SD
from services.gpu.families.sdxl import FAMILY as SDXL
from services.gpu.families.zimage import FAMILY as ZIMAGE

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

__all__ = [
    "FAMILIES",
    "FLUX",
    "SD",
    "SDXL",
    "ZIMAGE",
    "ModelFamily",
    "build_tiny_pipeline",
    "family_of",
    "family_of_builtin",
    "family_of_index",
    "trainable",
]

FAMILIES: tuple[ModelFamily, ...] = (SD, SDXL, FLUX, ZIMAGE)


def family_of(pipe: Any) -> ModelFamily | None:
    """The family of a loaded pipeline; None for a pipeline the runner only generates with.

    The most specific class wins (the pipeline's MRO is walked first), so the order of
    :data:`FAMILIES` does not matter: a subclass of ``StableDiffusionXLPipeline`` is SDXL even
    when a family of one of its base classes is registered before it.
    """
    for cls in type(pipe).__mro__:
        for family in FAMILIES:
            if cls.__name__ in family.pipeline_classes:
                return family
    return None


def family_of_index(index: dict[str, Any]) -> ModelFamily | None:
    """The family named by a model directory's ``model_index.json`` (None when not known)."""
    return next((family for family in FAMILIES if family.matches_index(index)), None)


def family_of_builtin(name: str) -> ModelFamily:
    """The family whose tiny built-in model is ``name``."""
    for family in FAMILIES:
        if name == family.builtin or name in family.builtin_variants:
            return family
    raise InputError(f"input.base_model: unknown builtin model {name}")


def trainable(family: ModelFamily | None, pipe: Any) -> ModelFamily:
    """``family``, or an :class:`InputError` listing the families that train."""
    if family is None:
        names = ", ".join(f.label for f in FAMILIES)
        raise InputError(f"input.base_model: training supports {names}, not {type(pipe).__name__}")
    return family


def build_tiny_pipeline(name: str) -> DiffusionPipeline:
    """Build the builtin model ``name`` (fp32, CPU, eval mode, frozen)."""
    import torch

    from services.gpu.families.tiny import TINY_SEED

    family = family_of_builtin(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        pipe = family.build_tiny_named(name)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    return pipe
