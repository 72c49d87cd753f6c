"""The kill test: ``python rp_handler.py --test_input`` training on the tiny model is killed with
SIGKILL once its first checkpoint pointer is in storage; the same input run again resumes and
ends on the LoRA of an uninterrupted run, bit for bit. Both backends (local, moto's S3).

The killed run is told of its first checkpoint, not raced: it runs ``rp_handler.py`` with
``CheckpointStore.save`` wrapped to print a line once the pointer is written and then block,
so the SIGKILL always lands on a run that holds a checkpoint and has not finished."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_KEY_ID, TEST_SECRET, s3_client
from tests.gpu.conftest import write_dataset
from tests.procwatch import OutputWatcher
from tests.test_entrypoint import ROOT, printed_result, worker_env

pytestmark = pytest.mark.gpu

POINTER = "loras/{name}/checkpoints/latest.json"
LORA = "loras/{name}/{name}.safetensors"


def job(name: str) -> dict[str, Any]:
    # One job id per output_name: RunPod retries a job whose worker died under the same id, and
    # that retry takes over the dead worker's lease on the name (a new job would wait for it).
    return {
        "id": f"kill-test-{name}",
        "input": {
            "action": "train_lora",
            "dataset": "d",
            "output_name": name,
            "steps": 40,
            "rank": 2,
            "checkpoint_every": 2,
            "learning_rate": 3e-3,
            "seed": 1,
        },
    }


def command(name: str) -> list[str]:
    return [sys.executable, str(ROOT / "rp_handler.py"), "--test_input", json.dumps(job(name))]


SAVED = "kill-test: checkpoint pointer written"
# rp_handler.py as users run it, with the checkpoint save wrapped: once the first pointer is
# written it prints SAVED and blocks the worker (the event loop included) until it is killed.
HOLD_AFTER_FIRST_CHECKPOINT = f"""
import runpy, sys, threading
from services.durable.checkpoints import CheckpointStore
save = CheckpointStore.save
async def save_then_hold(self, *args, **kwargs):
    result = await save(self, *args, **kwargs)
    print({SAVED!r}, file=sys.stderr, flush=True)
    threading.Event().wait()
    return result
CheckpointStore.save = save_then_hold
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def run(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300, check=False)


def tensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.fixture(params=["local", "s3"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> tuple[dict[str, str], Callable[[str], bool], Callable[[str, Path], None]]:
    """Worker env, ``exists(key)`` and ``fetch(key, path)`` for one backend, with dataset ``d`` stored."""
    dataset = write_dataset(tmp_path / "dataset", count=2)
    env = worker_env(tmp_path, MODEL_ID="builtin:tiny-sd", COMPILE="false", OMP_NUM_THREADS="1", LOG_LEVEL="WARNING")
    if request.param == "local":
        storage = tmp_path / "storage" / "datasets" / "d"
        storage.mkdir(parents=True)
        for path in dataset.iterdir():
            (storage / path.name).write_bytes(path.read_bytes())
        root = tmp_path / "storage"
        return env, lambda key: (root / key).is_file(), lambda key, path: path.write_bytes((root / key).read_bytes())
    endpoint = request.getfixturevalue("moto_server")
    bucket = f"kill-{uuid.uuid4().hex[:12]}"
    client = s3_client(endpoint)
    client.create_bucket(Bucket=bucket)
    for path in dataset.iterdir():
        client.put_object(Bucket=bucket, Key=f"datasets/d/{path.name}", Body=path.read_bytes())
    env.update(
        S3_BUCKET=bucket,
        S3_ENDPOINT_URL=endpoint,
        S3_REGION="us-east-1",
        AWS_ACCESS_KEY_ID=TEST_KEY_ID,
        AWS_SECRET_ACCESS_KEY=TEST_SECRET,
    )

    def exists(key: str) -> bool:
        return client.list_objects_v2(Bucket=bucket, Prefix=key).get("KeyCount", 0) > 0

    return env, exists, lambda key, path: client.download_file(bucket, key, str(path))


def test_killed_worker_resumes_bit_for_bit(backend: Any, tmp_path: Path) -> None:
    env, exists, fetch = backend
    reference = run(command("ref"), tmp_path, env)
    assert reference.returncode == 0, reference.stdout + reference.stderr
    assert printed_result(reference)["resumed_from_step"] == 0
    assert not exists(POINTER.format(name="ref"))  # removed on completion

    worker = subprocess.Popen(
        [sys.executable, "-c", HOLD_AFTER_FIRST_CHECKPOINT, *command("k")[1:]],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        OutputWatcher(worker).wait_for(SAVED, timeout=300)
    finally:
        worker.kill()
        worker.wait(timeout=60)
    assert worker.returncode == -9  # killed while held after its checkpoint, never finished
    assert exists(POINTER.format(name="k"))
    assert not exists(LORA.format(name="k"))

    again = run(command("k"), tmp_path, env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert printed_result(again)["resumed_from_step"] > 0
    fetch(LORA.format(name="ref"), tmp_path / "ref.safetensors")
    fetch(LORA.format(name="k"), tmp_path / "k.safetensors")
    import torch

    expected, got = tensors(tmp_path / "ref.safetensors"), tensors(tmp_path / "k.safetensors")
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
