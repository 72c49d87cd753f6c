"""The family registry: one list that everything else derives from (no torch imported)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from services.gpu import families
from services.gpu.catalog import BUILTIN_MODELS
from services.gpu.params import TrainLoraInput

ROOT = Path(__file__).resolve().parent.parent


def _pipeline_class(name: str, *bases: type) -> type:
    return type(name, bases or (object,), {})


@pytest.mark.parametrize("order", ["registered", "reversed"])
def test_the_most_specific_family_wins_whatever_the_order(monkeypatch: pytest.MonkeyPatch, order: str) -> None:
    """Catches a lookup that depends on the order of FAMILIES (the first family whose class
    appears anywhere in the MRO used to win): a pipeline subclassing SDXL's class, whose base
    class is also SD's class name, is SDXL in either order."""
    sd_like = _pipeline_class("StableDiffusionPipeline")
    sdxl_like = _pipeline_class("StableDiffusionXLPipeline", sd_like)
    custom = _pipeline_class("MySDXLPipeline", sdxl_like)
    listed = families.FAMILIES if order == "registered" else tuple(reversed(families.FAMILIES))
    monkeypatch.setattr(families, "FAMILIES", listed)
    assert families.family_of(custom()) is families.SDXL
    assert families.family_of(sd_like()) is families.SD
    assert families.family_of(object()) is None


def test_builtin_models_come_from_the_families() -> None:
    """Catches a second, hand-kept list of builtin models drifting from the registered families."""
    assert tuple(n for f in families.FAMILIES for n in (f.builtin, *f.builtin_variants)) == BUILTIN_MODELS
    assert len(set(BUILTIN_MODELS)) == len(BUILTIN_MODELS)
    for name in BUILTIN_MODELS:
        family = families.family_of_builtin(name)
        assert name in (family.builtin, *family.builtin_variants)
        TrainLoraInput(action="train_lora", dataset="d", output_name="o", base_model=name)


def test_the_registry_imports_no_torch() -> None:
    """Catches a family module importing torch or diffusers at import time (storage jobs load it)."""
    code = "import sys, services.gpu.catalog; print('torch' in sys.modules, 'diffusers' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.split() == ["False", "False"]


def test_the_example_family_keeps_up_with_the_protocol() -> None:
    """Catches a protocol method added without updating the template a new family is copied
    from: the example must implement every abstract method (instantiating it checks that) and
    set every class attribute the protocol declares without a default; it is never registered."""
    from services.gpu.families import example
    from services.gpu.families.base import ModelFamily

    family = example.ExampleFamily()
    declared = {name for klass in ModelFamily.__mro__ for name in getattr(klass, "__annotations__", {})}
    missing = [name for name in sorted(declared) if not hasattr(family, name)]
    assert missing == []
    assert all(f.name != family.name for f in families.FAMILIES)
    assert example.FAMILY.builtin not in BUILTIN_MODELS
