"""Model sources (builtin, local directory, HF cache), the LRU pipeline cache, error mapping."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from services.errors import GpuError, GpuOutOfMemory, InputError, ModelStateError
from services.gpu import models
from services.gpu.families import build_tiny_pipeline
from services.gpu.guard import gpu_errors
from services.gpu.models import LoadedPipeline, PipelineCache, PipelineKey
from services.gpu.state import RUNNER_STATE
from tests.gpu.conftest import decode, gpu_settings

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")
COMMIT = "0123456789abcdef0123456789abcdef01234567"  # pragma: allowlist secret (a test fake)


def _fake(key: PipelineKey) -> LoadedPipeline:
    return LoadedPipeline(key=key, pipe=object(), family=None, native_size=8, default_scheduler=None, placement=None)  # type: ignore[arg-type]


def test_cache_evicts_least_recently_used() -> None:
    cache = PipelineCache()
    loads: list[str] = []

    def loader(key: PipelineKey) -> LoadedPipeline:
        loads.append(key.model)
        return _fake(key)

    a, b, c = (PipelineKey(name, "float32", "cpu") for name in "abc")
    cache.get(a, 2, loader)
    cache.get(b, 2, loader)
    assert cache.get(a, 2, loader).key == a  # hit: a becomes most recent
    cache.get(c, 2, loader)  # evicts b
    assert cache.loaded() == [a, c]
    cache.get(b, 2, loader)  # evicts a
    assert cache.loaded() == [c, b]
    assert loads == ["a", "b", "c", "b"]
    cache.get(c, 1, loader)  # a smaller capacity drops down to it, on a hit too
    assert cache.loaded() == [c]
    cache.get(a, 1, loader)
    assert cache.loaded() == [a]
    assert loads == ["a", "b", "c", "b", "a"]
    cache.clear()
    assert cache.loaded() == []


def test_load_pipeline_evicts_and_reports(settings) -> None:
    small = gpu_settings(model_cache_size=1)
    models.load_pipeline("builtin:tiny-sd", small, torch.float32, CPU)
    models.load_pipeline("builtin:tiny-sdxl", small, torch.float32, CPU)
    assert [key.model for key in models.PIPELINES.loaded()] == ["builtin:tiny-sdxl"]
    assert RUNNER_STATE.snapshot()["pipelines"] == ["builtin:tiny-sdxl (float32, cpu)"]
    sd = models.load_pipeline("builtin:tiny-sd", settings, torch.float32, CPU)
    assert sd.family is not None and sd.family.builtin == "builtin:tiny-sd" and sd.native_size == 32
    assert [key.model for key in models.PIPELINES.loaded()] == ["builtin:tiny-sdxl", "builtin:tiny-sd"]


def _weights_digest(name: str) -> str:
    pipe = build_tiny_pipeline(name)
    digest = hashlib.sha256()
    for component in ("unet", "vae", "text_encoder"):
        for key, value in sorted(getattr(pipe, component).state_dict().items()):
            digest.update(key.encode())
            digest.update(value.numpy().tobytes())
    return digest.hexdigest()


def test_builtin_weights_are_the_same_in_every_process() -> None:
    code = "from tests.gpu.test_models import _weights_digest; print(_weights_digest('builtin:tiny-sd'))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == _weights_digest("builtin:tiny-sd")


def _tiny_image(model: str, settings) -> bytes:
    from services.gpu.generate.render import generate_images
    from services.gpu.params import GenerateInput

    params = GenerateInput(action="generate", prompt="a cat", base_model=model, steps=3, seed=5)
    return generate_images(params, None, settings).images[0].data


def test_local_directory_and_hf_cache_load_the_same_model(tmp_path: Path, settings) -> None:
    hub = tmp_path / "hf" / "hub"
    snapshot = hub / "models--acme--tiny-sd" / "snapshots" / COMMIT
    build_tiny_pipeline("builtin:tiny-sd").save_pretrained(snapshot)
    (hub / "models--acme--tiny-sd" / "refs").mkdir(parents=True)
    (hub / "models--acme--tiny-sd" / "refs" / "main").write_text(COMMIT, encoding="utf-8")
    local = gpu_settings(hf_home=tmp_path / "hf", model_cache_size=1)

    expected = decode(_tiny_image("builtin:tiny-sd", local))
    assert (decode(_tiny_image(str(snapshot), local)) == expected).all()
    assert (decode(_tiny_image("acme/tiny-sd", local)) == expected).all()
    assert [key.model for key in models.PIPELINES.loaded()] == ["acme/tiny-sd"]


def test_missing_models_say_where_they_looked(tmp_path: Path) -> None:
    local = gpu_settings(hf_home=tmp_path / "hf")
    with pytest.raises(InputError, match=r"acme/absent is not in the local Hugging Face cache \(looked in .*hf/hub"):
        models.load_pipeline("acme/absent", local, torch.float32, CPU)
    with pytest.raises(InputError, match=r"no model_index\.json"):
        models.load_pipeline(str(tmp_path), local, torch.float32, CPU)


@pytest.mark.parametrize(
    ("raised", "expected"),
    [
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"), GpuOutOfMemory),
        (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), ModelStateError),
        (RuntimeError("shape mismatch"), GpuError),
        (ValueError("bad value"), GpuError),
        (InputError("input.x: bad"), InputError),
    ],
)
def test_gpu_errors_translate(raised: Exception, expected: type[Exception]) -> None:
    with pytest.raises(expected) as caught, gpu_errors("generate"):
        raise raised
    assert caught.value.__cause__ is (None if expected is InputError else raised)
    assert type(caught.value) is expected
    if expected is GpuOutOfMemory:
        assert caught.value.refresh_worker is True
    if expected is GpuError:
        assert str(caught.value).startswith("generate failed:")
