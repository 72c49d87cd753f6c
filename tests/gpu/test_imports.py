"""The storage path and the health action never import torch or diffusers."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.gpu

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers", "peft", "safetensors")

PROBE = f"""
import json, sys
import services.gpu, services.gpu.params, services.gpu.info, services.gpu.types, services.gpu.state
import services.actions, services.gpu.caption.options, services.gpu.caption.text, services.gpu.train.caption_variants
from services.gpu.info import gpu_info
info = gpu_info()
print(json.dumps({{"loaded": sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}), "info": info}}))
"""


def test_params_and_info_import_no_torch() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    info = report["info"]
    assert info["torch_loaded"] is False
    assert {"gpu_present", "gpus", "pipelines", "compile_warmup_seconds"} <= set(info)
    assert info["pipelines"] == []


def test_gpu_info_reports_torch_facts_once_loaded(settings) -> None:
    import torch

    from services.gpu import models
    from services.gpu.info import gpu_info

    models.load_pipeline("builtin:tiny-sd", settings, torch.float32, torch.device("cpu"))
    info = gpu_info()
    assert info["torch_loaded"] is True
    assert info["cuda_available"] is torch.cuda.is_available()
    assert "builtin:tiny-sd (float32, cpu)" in info["pipelines"]


def test_driver_gpus_read_from_proc(tmp_path: Path) -> None:
    from services.gpu.info import _driver_gpus

    card = tmp_path / "0000:01:00.0"
    card.mkdir()
    (card / "information").write_text("Model: \t\t NVIDIA H200\nIRQ: 42\n", encoding="utf-8")
    assert _driver_gpus(tmp_path) == ["NVIDIA H200"]
    assert _driver_gpus(tmp_path / "missing") == []
