"""The entrypoint as users run it: ``--test_input``, ``test_input.json``, ``--rp_serve_api``,
and the import path of storage-only jobs (no torch, no diffusers)."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import CONFIG_PREFIXES, THIRD_PARTY_ENV, setting_env_names
from tests.faultproxy import free_port
from tests.procwatch import OutputWatcher

ROOT = Path(__file__).resolve().parent.parent
SERVING = "Uvicorn running on"  # what the local API prints once it accepts requests


def worker_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(CONFIG_PREFIXES)}
    env.update({"STORAGE_DIR": str(tmp_path / "storage"), "PYTHONPATH": str(ROOT), **extra})
    return env


def run_worker(tmp_path: Path, job_input: dict[str, Any] | None, *args: str, **env: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / "rp_handler.py"), *args]
    if job_input is not None:
        command += ["--test_input", json.dumps({"input": job_input})]
    return subprocess.run(
        command, cwd=tmp_path, env=worker_env(tmp_path, **env), capture_output=True, text=True, timeout=300, check=False
    )


def result_of(completed: subprocess.CompletedProcess) -> str:
    return completed.stdout + completed.stderr


def printed_result(completed: subprocess.CompletedProcess) -> dict[str, Any]:
    """The JSON result a local run prints on stdout, which holds nothing else (the README's
    ``| jq``): fails when the SDK's banner or a log line lands on stdout."""
    return json.loads(completed.stdout)


STORAGE_JOBS = [
    {"action": "upload_training_files", "dataset": "smoke", "files": [{"name": "a.txt", "data": "aGk="}]},
    {"action": "list_files", "prefix": "datasets/"},
    {"action": "delete_files", "keys": ["datasets/smoke/nothing.txt"]},
    {"action": "health"},
]


@pytest.mark.parametrize("job_input", STORAGE_JOBS, ids=[j["action"] for j in STORAGE_JOBS])
def test_test_input_runs_storage_actions(tmp_path: Path, job_input: dict[str, Any]) -> None:
    completed = run_worker(tmp_path, job_input)
    output = result_of(completed)
    assert completed.returncode == 0, output
    assert "error" not in printed_result(completed)
    assert "Traceback" not in output
    assert " ERROR " not in output and "ERROR |" not in output


def test_test_input_get_file_and_error_exit(tmp_path: Path) -> None:
    upload = {"action": "upload_training_files", "dataset": "g", "files": [{"name": "a.txt", "data": "aGk="}]}
    assert run_worker(tmp_path, upload).returncode == 0
    completed = run_worker(tmp_path, {"action": "get_file", "key": "datasets/g/a.txt"})
    assert completed.returncode == 0, result_of(completed)
    printed = printed_result(completed)
    saved = Path(printed["file"]["file"])
    assert saved.parent.parent == Path("outputs") and saved.name == "a.txt"
    assert (tmp_path / saved).read_bytes() == b"hi"
    assert f"saved {saved}" in completed.stderr
    failed = run_worker(tmp_path, {"action": "get_file", "key": "datasets/g/missing.txt"})
    assert failed.returncode == 1
    assert "does not exist" in printed_result(failed)["error"]
    assert "Traceback" not in result_of(failed)


def test_local_runs_without_an_id_keep_their_own_outputs(tmp_path: Path) -> None:
    """Two runs of the same job without an ``id``: each saves into a folder of its own (catches
    every run writing ``outputs/local_test/`` over the last); a given ``id`` names its folder."""
    upload = {"action": "upload_training_files", "dataset": "g", "files": [{"name": "a.txt", "data": "aGk="}]}
    assert run_worker(tmp_path, upload).returncode == 0
    get = {"action": "get_file", "key": "datasets/g/a.txt"}
    first, second = (printed_result(run_worker(tmp_path, get))["file"]["file"] for _ in range(2))
    assert first != second
    assert (tmp_path / first).read_bytes() == (tmp_path / second).read_bytes() == b"hi"
    named = subprocess.run(
        [sys.executable, str(ROOT / "rp_handler.py"), "--test_input", json.dumps({"id": "mine", "input": get})],
        cwd=tmp_path,
        env=worker_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert printed_result(named)["file"]["file"] == "outputs/mine/a.txt"


def test_malformed_test_input_is_one_line_and_a_failure(tmp_path: Path) -> None:
    """A ``--test_input`` that is not JSON: one line naming the problem, exit 2, nothing on stdout
    (catches the SDK's raw JSONDecodeError traceback)."""
    for bad in ('{"input":', "[1, 2]"):
        completed = subprocess.run(
            [sys.executable, str(ROOT / "rp_handler.py"), "--test_input", bad],
            cwd=tmp_path,
            env=worker_env(tmp_path),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert completed.returncode == 2, result_of(completed)
        assert completed.stdout == ""
        [line] = completed.stderr.strip().splitlines()
        assert line.startswith("error: --test_input ")
        assert "Traceback" not in completed.stderr


def test_no_setting_reaches_a_test_from_the_machine() -> None:
    """Every variable Settings reads (names and aliases, JOB_TIMEOUT, CHECKPOINT_*, HF_HOME,
    TORCHINDUCTOR_CACHE_DIR included) is cleared for tests and the workers they start: catches
    a hand-written list that misses a setting added later."""
    names = setting_env_names()
    assert {"JOB_TIMEOUT", "CHECKPOINT_EVERY", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR", "BUCKET_ENDPOINT_URL"} <= names
    assert all(name.startswith(CONFIG_PREFIXES) for name in names)
    assert "RUNPOD_" in THIRD_PARTY_ENV
    assert not [name for name in os.environ if name.upper().startswith(CONFIG_PREFIXES)]


@pytest.mark.parametrize(
    ("resolution", "error"),
    [
        (100, "invalid input: input.resolution: Input should be a multiple of 8"),
        ("big", "invalid input: input.resolution: must be an integer or a list of integers"),
        ([512, 100], "invalid input: input.resolution[1]: Input should be a multiple of 8"),
    ],
)
def test_a_value_of_a_union_field_gets_one_readable_error(tmp_path: Path, resolution: Any, error: str) -> None:
    """``resolution`` is an integer or a list of them: catches pydantic's per-member lines
    (``input.resolution.constrained-int: ...; input.resolution.list[constrained-int]: ...``)."""
    job = {"action": "train_lora", "dataset": "d", "output_name": "x", "resolution": resolution}
    completed = run_worker(tmp_path, job)
    assert completed.returncode == 1
    assert printed_result(completed) == {"error": error}


def test_bad_setting_stops_start_up_naming_the_variable(tmp_path: Path) -> None:
    completed = run_worker(tmp_path, {"action": "health"}, S3_ADDRESSING_STYLE="sideways")
    assert completed.returncode != 0
    assert "S3_ADDRESSING_STYLE" in completed.stderr
    assert "'auto', 'path' or 'virtual'" in completed.stderr
    assert "Traceback" not in completed.stderr


def test_test_input_json_beside_the_script_is_the_default_job() -> None:
    job = json.loads((ROOT / "test_input.json").read_text())
    assert job["input"]["action"] == "generate"


def test_storage_jobs_never_import_torch_or_diffusers(tmp_path: Path) -> None:
    """A fresh interpreter runs every storage action; torch and diffusers stay unloaded, also on a
    worker set for several training ranks (TRAIN_CPU_RANKS)."""
    script = f"""
import asyncio, json, sys
sys.path.insert(0, {str(ROOT)!r})
from rp_handler import handler
from services.storage import close_storages
jobs = {json.dumps([*STORAGE_JOBS, {"action": "get_file", "key": "datasets/smoke/a.txt"}])}
async def main():
    try:
        return [await handler({{"id": str(i), "input": j}}) for i, j in enumerate(jobs)]
    finally:
        await close_storages()
results = asyncio.run(main())
assert all("error" not in r for r in results), results
heavy = sorted(m for m in ("torch", "diffusers", "transformers", "peft") if m in sys.modules)
print(json.dumps(heavy))
"""
    completed = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=worker_env(tmp_path, TRAIN_CPU_RANKS="2"),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1]) == []


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    request = urllib.request.Request(  # noqa: S310 - loopback
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310
        return json.loads(response.read())


def test_rp_serve_api_runsync(tmp_path: Path) -> None:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "rp_handler.py"), "--rp_serve_api", "--rp_api_port", str(port)],
        cwd=tmp_path,
        env=worker_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        OutputWatcher(process).wait_for(SERVING)
        data = base64.b64encode(b"over http").decode()
        upload = {"action": "upload_training_files", "dataset": "api", "files": [{"name": "h.txt", "data": data}]}
        response = _post(f"{base}/runsync", {"input": upload})
        assert response["status"] == "COMPLETED", response
        assert response["output"]["uploaded"][0]["key"] == "datasets/api/h.txt"
        bad = _post(f"{base}/runsync", {"input": {"action": "get_file"}})
        assert bad["status"] == "FAILED"
        assert bad["error"] == "invalid input: input.key: Field required"
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_readme_quick_start_commands_are_the_ones_ci_runs() -> None:
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = "python3 -m venv .venv && . .venv/bin/activate && pip install -q -r requirements-dev.txt"
    assert test_command.replace(" -q", "") in readme
    assert test_command in ci
    assert shutil.which("python3") is not None


@pytest.mark.gpu
def test_test_input_trains_then_generates_on_the_tiny_model(tmp_path: Path) -> None:
    """The GPU actions as a user runs them locally: train a LoRA, then generate with it by name."""
    import io

    from PIL import Image

    files = []
    for i, colour in enumerate([(220, 40, 40), (40, 220, 40)]):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), colour).save(buffer, format="PNG")
        files.append({"name": f"{i}.png", "data": base64.b64encode(buffer.getvalue()).decode()})
    upload = {"action": "upload_training_files", "dataset": "tiny", "files": files}
    assert run_worker(tmp_path, upload).returncode == 0
    train = {"action": "train_lora", "dataset": "tiny", "output_name": "tiny-lora", "steps": 3, "rank": 2}
    trained = run_worker(tmp_path, train)
    assert trained.returncode == 0, result_of(trained)
    assert printed_result(trained)["lora"]["key"] == "loras/tiny-lora/tiny-lora.safetensors"
    assert (tmp_path / "storage" / "loras" / "tiny-lora" / "tiny-lora.safetensors").is_file()
    generate = {"action": "generate", "prompt": "a red square", "lora": "tiny-lora", "steps": 2, "seed": 1}
    generated = run_worker(tmp_path, generate)
    assert generated.returncode == 0, result_of(generated)
    for noise in ("requires torchvision", "No LoRA keys associated", "kernels-community"):  # services.job.logs
        assert noise not in generated.stderr + trained.stderr
    printed = printed_result(generated)
    assert printed["seed"] == 1
    saved = Path(printed["images"][0]["file"])
    assert saved.parent.parent == Path("outputs") and saved.name == "image-0.png"
    assert (tmp_path / saved).read_bytes().startswith(b"\x89PNG")


@pytest.mark.gpu
def test_generate_on_the_cpu_refuses_a_size_it_cannot_finish(tmp_path: Path) -> None:
    """2048x2048 on the CPU once ran 13 minutes inside its first step, past every stop check:
    refused up front with a message that says why (catches the budget going missing)."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("the CPU budget applies to workers without a GPU")
    job = {"action": "generate", "prompt": "x", "steps": 1, "width": 2048, "height": 2048}
    completed = run_worker(tmp_path, job, OMP_NUM_THREADS="1")
    assert completed.returncode == 1, result_of(completed)
    error = printed_result(completed)["error"]
    assert error.startswith("input.width: 2048x2048 is too large to generate on the CPU"), error


def test_hub_handler_shim_runs_the_worker(tmp_path: Path) -> None:
    completed = subprocess.run(
        [
            sys.executable,
            str(ROOT / ".runpod" / "handler.py"),
            "--test_input",
            json.dumps({"input": {"action": "health"}}),
        ],
        cwd=tmp_path,
        env=worker_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert printed_result(completed)["status"] == "ok"
