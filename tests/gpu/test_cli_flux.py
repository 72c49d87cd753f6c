"""The README's quick-start commands for ``builtin:tiny-flux``, run as a user runs them:
``python rp_handler.py --test_input '...'`` in a subprocess."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from tests.test_entrypoint import result_of, run_worker

pytestmark = pytest.mark.gpu


def test_tiny_flux_trains_then_generates_through_test_input(tmp_path: Path) -> None:
    files = []
    for i, size in enumerate([(32, 32), (64, 24)]):  # one square, one wide
        buffer = io.BytesIO()
        Image.new("RGB", size, (200, 40 * i, 40)).save(buffer, format="PNG")
        files.append({"name": f"{i}.png", "data": base64.b64encode(buffer.getvalue()).decode()})
    upload = {"action": "upload_training_files", "dataset": "fluxset", "files": files}
    assert run_worker(tmp_path, upload).returncode == 0
    train = {
        "action": "train_lora",
        "dataset": "fluxset",
        "output_name": "flux-lora",
        "base_model": "builtin:tiny-flux",
        "steps": 4,
        "rank": 2,
        "lora_targets": "attention+mlp",
    }
    trained = run_worker(tmp_path, train)
    assert trained.returncode == 0, result_of(trained)
    output = result_of(trained)
    assert "loras/flux-lora/flux-lora.safetensors" in output
    assert "56x16" in output  # the 8:3 image's bucket (nearest ratio at 32x32 pixels), in the metrics
    assert (tmp_path / "storage" / "loras" / "flux-lora" / "flux-lora.safetensors").is_file()
    generate = {
        "action": "generate",
        "prompt": "a red square",
        "base_model": "builtin:tiny-flux",
        "lora": "flux-lora",
        "steps": 3,
        "seed": 1,
        "width": 48,
        "height": 32,
    }
    generated = run_worker(tmp_path, generate)
    assert generated.returncode == 0, result_of(generated)
    assert "image-0.png" in result_of(generated)
