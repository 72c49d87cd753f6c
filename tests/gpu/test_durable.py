"""Durable training through the ``train_lora`` action (in-process handler, local storage):
resume is bit for bit (buckets and snapshots included), a changed config is refused, overwrite
and cleanup, snapshots, the deadline stop and the cancel."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_jobs
from tests.gpu.conftest import write_dataset

pytestmark = pytest.mark.gpu

STEPS = 6


@pytest.fixture
def storage_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """Local storage holding a dataset with two aspect ratios (so two buckets)."""
    from config.settings import load_settings

    root = tmp_path / "storage"
    data = write_dataset(root / "datasets" / "d", count=3)
    Image.fromarray(np.full((24, 48, 3), 90, np.uint8)).save(data / "wide.png")
    monkeypatch.setenv("STORAGE_DIR", str(root))
    monkeypatch.setenv("WORK_DIR", str(tmp_path / "work"))
    monkeypatch.setenv("MODEL_ID", "builtin:tiny-sd")
    monkeypatch.setenv("COMPILE", "false")
    load_settings.cache_clear()
    yield root
    load_settings.cache_clear()


def train_job(name: str, **extra: Any) -> dict[str, Any]:
    values = {"action": "train_lora", "dataset": "d", "output_name": name, "steps": STEPS, "rank": 2}
    values.update({"resolution": [32, 48], "batch_size": 2, "learning_rate": 3e-3, "seed": 3, "sample_steps": 2})
    values.update(extra)
    return {"id": f"job-{name}", "input": values}


def lora_tensors(root: Path, name: str) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(root / "loras" / name / f"{name}.safetensors"))


def same_tensors(a: dict[str, Any], b: dict[str, Any]) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def stored(folder: Path) -> list[Path]:
    """Files under ``folder`` (the local backend may leave empty directories)."""
    return [p for p in folder.rglob("*") if p.is_file()]


def pointer(root: Path, name: str) -> Path:
    return root / "loras" / name / "checkpoints" / "latest.json"


def test_resume_snapshots_mismatch_and_overwrite(storage_dir: Path) -> None:
    (plain,) = run_jobs(train_job("plain"))
    assert plain["resumed_from_step"] == 0 and plain["snapshots"] == [], plain
    assert stored(storage_dir / "loras" / "plain" / "checkpoints") == []  # removed on completion
    expected = lora_tensors(storage_dir, "plain")

    # Checkpoints every 2 steps (kept), snapshots with samples: the same LoRA as without them.
    durable = train_job(
        "dur", checkpoint_every=2, keep_checkpoints=True, save_every=2, keep_last=1, sample_prompts=["x"]
    )
    (first,) = run_jobs(durable)
    assert first["resumed_from_step"] == 0, first
    assert same_tensors(lora_tensors(storage_dir, "dur"), expected)
    assert first["snapshots"] == [
        {"step": 4, "lora": "loras/dur/steps/4.safetensors", "samples": ["loras/dur/steps/4-sample-0.png"]}
    ]
    assert json.loads(pointer(storage_dir, "dur").read_bytes())["step"] == 4

    # The same input again would retrain the last steps of a completed run: refused, saying what to send.
    (again,) = run_jobs(durable)
    assert "already completed this training" in again["error"] and "resume: false" in again["error"], again
    # A run killed after its last checkpoint (no finished mark) resumes from it, ending on the same tensors.
    (storage_dir / "loras" / "dur" / "checkpoints" / "finished.json").unlink()
    (storage_dir / "loras" / "dur" / "dur.safetensors").unlink()  # killed before the LoRA was stored
    (again,) = run_jobs(durable)
    assert again["resumed_from_step"] == 4 and again["metrics"]["steps"] == STEPS, again
    assert same_tensors(lora_tensors(storage_dir, "dur"), expected)

    # Another config is refused, naming overwrite; overwrite starts over and cleans up.
    # (The stored LoRA alone refuses a new run too: test_data_safety.py.)
    (refused,) = run_jobs(train_job("dur", learning_rate=1e-2))
    assert "another training config" in refused["error"] and "overwrite: true" in refused["error"], refused
    (fresh,) = run_jobs(train_job("dur", overwrite=True))
    assert fresh["resumed_from_step"] == 0, fresh
    assert same_tensors(lora_tensors(storage_dir, "dur"), expected)
    assert stored(storage_dir / "loras" / "dur" / "checkpoints") == []
    assert stored(storage_dir / "loras" / "dur" / "steps") == []

    # delete_files of the LoRA file takes its checkpoints along.
    run_jobs(train_job("dur", checkpoint_every=2, keep_checkpoints=True, overwrite=True))
    assert pointer(storage_dir, "dur").exists()
    (deleted,) = run_jobs({"input": {"action": "delete_files", "keys": ["loras/dur/dur.safetensors"]}})
    assert "loras/dur/checkpoints/latest.json" in deleted["deleted"], deleted
    assert not pointer(storage_dir, "dur").exists()


def test_deadline_stops_with_a_checkpoint_then_resumes(storage_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Once the first checkpoint is in storage the clock jumps to 5 minutes before the job's
    deadline, inside the margin: the runner saves where it is and stops, resumable."""
    import time

    from services.gpu.train import durable

    monkeypatch.setenv("JOB_TIMEOUT", "3300")
    monkeypatch.setenv("CHECKPOINT_DEADLINE_MARGIN", "600")
    first = pointer(storage_dir, "late")
    monkeypatch.setattr(durable, "monotonic", lambda: time.monotonic() + (3000 if first.exists() else 0))
    job = train_job("late", checkpoint_every=2, steps=8)
    (stopped,) = run_jobs(job)
    assert stopped["error"].startswith("[resumable] train_lora at step "), stopped
    assert "stopped (deadline)" in stopped["error"] and "send the same input again" in stopped["error"]
    at = json.loads(first.read_bytes())["step"]
    assert at >= 2 and f"a checkpoint of step {at} is in storage" in stopped["error"]
    monkeypatch.setattr(durable, "monotonic", time.monotonic)
    (resumed,) = run_jobs(job)
    assert resumed["resumed_from_step"] == at, resumed
    (plain,) = run_jobs(train_job("plain", steps=8))
    assert plain["resumed_from_step"] == 0, plain
    assert same_tensors(lora_tensors(storage_dir, "late"), lora_tensors(storage_dir, "plain"))


def test_cancel_leaves_a_resumable_checkpoint_and_no_workspace(storage_dir: Path, tmp_path: Path) -> None:
    from rp_handler import handler
    from services.storage import close_storages

    first = pointer(storage_dir, "cancelled")

    async def main() -> None:
        task = asyncio.ensure_future(handler(train_job("cancelled", checkpoint_every=1, steps=400)))
        try:
            while not first.exists():
                assert not task.done(), task.result()
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        finally:
            await close_storages()

    asyncio.run(main())
    step = json.loads(first.read_bytes())["step"]
    assert 1 <= step < 400
    assert list((tmp_path / "work").iterdir()) == []


def test_checkpoint_upload_faults_do_not_stop_training_nor_break_the_pointer(
    s3_settings: Any, moto_server: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """503s on some of the checkpoint uploads (no retries): training completes, and the pointer
    left in storage names only whole files. (Resets are not targeted by the proxy, so they would
    hit the dataset and lease requests too; the store-level fault test covers them.)"""
    from tests.conftest import s3_client, use_settings_env
    from tests.faultproxy import FaultProxy, Faults
    from tests.test_checkpoints_store import sha

    client = s3_client(moto_server)
    for path in write_dataset(tmp_path / "d", count=2).iterdir():
        client.put_object(Bucket=bucket, Key=f"datasets/d/{path.name}", Body=path.read_bytes())
    faults = Faults(error_rate=0.3, error_when=lambda method, path: method == "PUT" and "/checkpoints/" in path)
    with FaultProxy(moto_server, faults, seed=7) as proxy:
        use_settings_env(monkeypatch, s3_settings.model_copy(update={"s3_endpoint_url": proxy.url}))
        monkeypatch.setenv("S3_MAX_ATTEMPTS", "1")
        monkeypatch.setenv("S3_BREAKER_FAIL_MAX", "1000")
        monkeypatch.setenv("MODEL_ID", "builtin:tiny-sd")
        monkeypatch.setenv("COMPILE", "false")
        (result,) = run_jobs(train_job("flaky", resolution=32, steps=16, checkpoint_every=1, keep_checkpoints=True))
        injected = proxy.injected_errors + proxy.injected_resets
    assert "error" not in result, result
    assert injected >= 3
    pointer = json.loads(client.get_object(Bucket=bucket, Key="loras/flaky/checkpoints/latest.json")["Body"].read())
    folder = f"loras/flaky/checkpoints/step-{pointer['step']:08d}/"
    for item in pointer["files"]:
        body = client.get_object(Bucket=bucket, Key=folder + item["name"])["Body"].read()
        assert (len(body), sha(body)) == (item["size"], item["sha256"])
