"""What a failed or refused train_lora leaves in storage (local backend, tiny models): every
check runs before the first delete, a new run never prunes or reports an old run's snapshots,
one job writes an output_name at a time, and a tampered checkpoint is one clear error."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import run_jobs
from tests.gpu.test_durable import storage_dir, train_job  # noqa: F401 - the fixture

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[2]


def snapshot_of(root: Path) -> dict[str, str]:
    """sha256 of every stored file (objects and their metadata sidecars; not the temp folder)."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.relative_to(root).as_posix().startswith(".tmp/")
    }


def resend_as_user(root: Path, job: dict[str, Any], tmp_path: Path, **env: str) -> str:
    """Run one job as a user does (``python rp_handler.py --test_input``); its output."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_", "RUNPOD_"))}
    environ.update({"STORAGE_DIR": str(root), "PYTHONPATH": str(ROOT), "COMPILE": "false", **env})
    done = subprocess.run(
        [sys.executable, str(ROOT / "rp_handler.py"), "--test_input", json.dumps({"input": job["input"]})],
        cwd=tmp_path,
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return done.stdout + done.stderr


def test_failed_resends_leave_storage_byte_identical(
    storage_dir: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Catches a resend that deletes the kept checkpoints or snapshots before a later check fails
    (fp16 on a CPU worker, an undecodable image, too little time): storage must not change."""
    kept = train_job("safe", checkpoint_every=2, keep_checkpoints=True, save_every=2)
    (first,) = run_jobs(kept)
    assert "error" not in first, first
    before = snapshot_of(storage_dir)
    assert any("/checkpoints/" in k for k in before) and any("/steps/" in k for k in before)

    for extra in ({"overwrite": True, "mixed_precision": "fp16"}, {"resume": False, "mixed_precision": "fp16"}):
        output = resend_as_user(storage_dir, train_job("safe", **extra), tmp_path)
        assert "fp16 needs a CUDA GPU" in output, output
        assert snapshot_of(storage_dir) == before, extra

    (storage_dir / "datasets" / "d" / "broken.png").write_bytes(b"not a png")
    before = snapshot_of(storage_dir)
    (undecodable,) = run_jobs(train_job("safe", overwrite=True))
    assert "not decodable" in undecodable["error"], undecodable
    assert snapshot_of(storage_dir) == before
    (storage_dir / "datasets" / "d" / "broken.png").unlink()
    before = snapshot_of(storage_dir)

    from config.settings import load_settings

    monkeypatch.setenv("JOB_TIMEOUT", "30")
    load_settings.cache_clear()
    (short,) = run_jobs(train_job("safe", overwrite=True))
    assert "CHECKPOINT_DEADLINE_MARGIN (60 s)" in short["error"] and "JOB_TIMEOUT" in short["error"], short
    assert snapshot_of(storage_dir) == before


def test_a_second_run_keeps_its_own_snapshots(storage_dir: Path) -> None:  # noqa: F811
    """Catches keep_last pruning the new run's snapshots for an old run's (6, 8) and the result
    reporting the old run's: refused without overwrite (naming them), its own with overwrite."""
    (first,) = run_jobs(train_job("k", steps=10, save_every=2, keep_last=2))
    assert [s["step"] for s in first["snapshots"]] == [6, 8], first
    before = snapshot_of(storage_dir)
    second = train_job("k", steps=4, save_every=1, keep_last=2)
    (refused,) = run_jobs(second)
    assert "steps 6, 8" in refused["error"] and "overwrite: true" in refused["error"], refused
    assert snapshot_of(storage_dir) == before
    second["input"]["overwrite"] = True
    (fresh,) = run_jobs(second)
    assert [s["step"] for s in fresh["snapshots"]] == [2, 3], fresh
    steps = sorted(p.name for p in (storage_dir / "loras" / "k" / "steps").iterdir())
    assert steps == ["2.safetensors", "3.safetensors"]


def test_two_jobs_on_one_name_one_is_refused_naming_the_holder(storage_dir: Path) -> None:  # noqa: F811
    """Catches two workers training one output_name at once (each deleting or overwriting the other's files)."""
    one, two = train_job("busy"), train_job("busy")
    one["id"], two["id"] = "job-one", "job-two"
    first, second = run_jobs(one, two)
    assert "error" not in first, first
    assert "is being written by job job-one" in second["error"] and "lease expires at" in second["error"], second
    assert not (storage_dir / "leases" / "loras" / "busy.json").exists()  # released at the job's end


def _rewrite(root: Path, name: str, file: str, data: bytes) -> None:
    """Replace a checkpoint file and recompute its size and sha256 in the manifest and the pointer."""
    folder = root / "loras" / name / "checkpoints"
    step = json.loads((folder / "latest.json").read_bytes())["step"]
    (folder / f"step-{step:08d}" / file).write_bytes(data)
    for path in (folder / f"step-{step:08d}" / "state.json", folder / "latest.json"):
        record = json.loads(path.read_bytes())
        for item in record["files"]:
            if item["name"] == file:
                item.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
        path.write_text(json.dumps(record))


def _state(root: Path, name: str) -> tuple[dict[str, Any], bytes]:
    folder = root / "loras" / name / "checkpoints"
    step = json.loads((folder / "latest.json").read_bytes())["step"]
    stored = folder / f"step-{step:08d}"
    return json.loads((stored / "trainer.json").read_bytes()), (stored / "trainer.safetensors").read_bytes()


def _edit(form: str, tree: dict[str, Any], tensors: bytes) -> tuple[str, bytes]:
    if form == "truncated-tensors":
        return "trainer.safetensors", tensors[: len(tensors) // 2]
    if form == "no-torch-version":
        del tree["torch_version"]
    elif form == "numpy-short":
        tree["rng"]["numpy"] = ["MT19937"]
    elif form == "python-rng-list":
        tree["rng"]["python"] = [3, [1, 2], None]
    elif form == "step-beyond":
        tree["step"] = 1000
    return "trainer.json", json.dumps(tree).encode()


TAMPERED_STATE = ["no-torch-version", "numpy-short", "python-rng-list", "truncated-tensors", "step-beyond"]


@pytest.mark.parametrize("form", TAMPERED_STATE)
def test_a_tampered_trainer_state_is_the_corrupt_checkpoint_error(storage_dir: Path, form: str) -> None:  # noqa: F811
    """Catches edited trainer state (hashes recomputed) giving KeyError / TypeError / IndexError, a
    worker path in the message, or a resume past the job's steps: one corrupt-checkpoint error."""
    job = train_job("t", checkpoint_every=2, keep_checkpoints=True)
    (first,) = run_jobs(job)
    assert "error" not in first, first
    (storage_dir / "loras" / "t" / "checkpoints" / "finished.json").unlink()  # as if killed after step 4,
    (storage_dir / "loras" / "t" / "t.safetensors").unlink()  # before the LoRA was stored
    tree, tensors = _state(storage_dir, "t")
    _rewrite(storage_dir, "t", *_edit(form, tree, tensors))
    (resent,) = run_jobs(job)
    error = resent.get("error", "")
    assert "the stored checkpoint of t at step 4 is corrupt" in error, resent
    assert "overwrite: true" in error and "/tmp" not in error and "Traceback" not in error, error


def test_a_stored_lora_is_replaced_only_by_a_run_that_asks(storage_dir: Path) -> None:  # noqa: F811
    """Catches a new run (another base model, another config) silently replacing a finished LoRA
    of the same name: refused without ``overwrite`` and storage unchanged; with it, replaced."""
    (first,) = run_jobs(train_job("kept"))
    assert "error" not in first, first
    before = snapshot_of(storage_dir)
    (refused,) = run_jobs(train_job("kept", base_model="builtin:tiny-flux"))
    assert "loras/kept/kept.safetensors already holds a trained LoRA" in refused.get("error", ""), refused
    assert "overwrite: true" in refused["error"]
    assert snapshot_of(storage_dir) == before
    (replaced,) = run_jobs(train_job("kept", base_model="builtin:tiny-flux", overwrite=True))
    assert "error" not in replaced, replaced
    after = snapshot_of(storage_dir)
    assert after["loras/kept/kept.safetensors"] != before["loras/kept/kept.safetensors"]
