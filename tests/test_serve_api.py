"""The local HTTP API (``--rp_serve_api``) in a subprocess: partial failure as the caller sees it
through the real SDK, and a long ``generate`` stopped by SIGTERM between steps."""

from __future__ import annotations

import base64
import contextlib
import json
import signal
import subprocess
import sys
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import TEST_KEY_ID, TEST_SECRET
from tests.faultproxy import free_port
from tests.procwatch import OutputWatcher
from tests.test_entrypoint import ROOT, SERVING, worker_env


def _post(url: str, body: dict[str, Any], timeout: float = 120) -> dict[str, Any]:
    request = urllib.request.Request(  # noqa: S310 - loopback
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.loads(response.read())


class Server:
    def __init__(self, process: subprocess.Popen[str], base: str, output: OutputWatcher) -> None:
        self.process = process
        self.base = base
        self.output = output

    def log(self) -> str:
        """Everything the server printed, up to its exit when it has exited."""
        return self.output.wait_closed() if self.process.poll() is not None else self.output.text


@contextlib.contextmanager
def _serving(tmp_path: Path, prelude: list[str], **env: str) -> Iterator[Server]:
    """``rp_handler.py --rp_serve_api`` (run by ``prelude``: the interpreter and its options) until the block ends."""
    port = free_port()
    log = tmp_path / "server.log"
    (tmp_path / "work").mkdir()
    process = subprocess.Popen(
        [*prelude, str(ROOT / "rp_handler.py"), "--rp_serve_api", "--rp_api_port", str(port)],
        cwd=tmp_path,
        env=worker_env(tmp_path, WORK_DIR=str(tmp_path / "work"), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    watcher = OutputWatcher(process, copy_to=log)
    try:
        watcher.wait_for(SERVING)
        yield Server(process, base, watcher)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    with _serving(tmp_path, [sys.executable]) as running:
        yield running


PARTIAL = {
    "action": "upload_training_files",
    "dataset": "api",
    "files": [
        {"name": "ok.txt", "data": base64.b64encode(b"kept").decode()},
        {"name": "bad/name.txt", "data": base64.b64encode(b"x").decode()},
    ],
}


def _check_partial(output: dict[str, Any], dataset: str) -> None:
    assert output["partial"] is True
    assert [u["key"] for u in output["uploaded"]] == [f"datasets/{dataset}/ok.txt"]
    assert [f["name"] for f in output["failed"]] == ["bad/name.txt"]
    assert output["summary"].startswith("1 uploaded, 0 skipped, 1 failed: input.files[1].name: path separators")


def test_partial_failure_reaches_the_caller_through_runsync_and_run_status(server: Server) -> None:
    response = _post(f"{server.base}/runsync", {"input": PARTIAL})
    assert response["status"] == "COMPLETED", response
    _check_partial(response["output"], "api")

    submitted = _post(f"{server.base}/run", {"input": {**PARTIAL, "dataset": "api2"}})
    assert submitted["status"] == "IN_PROGRESS"
    status = _post(f"{server.base}/status/{submitted['id']}", {})
    assert status["status"] == "COMPLETED", status
    _check_partial(status["output"], "api2")
    again = _post(f"{server.base}/status/{submitted['id']}", {})  # the SDK answers once
    assert again == {"id": submitted["id"], "status": "FAILED", "error": "Job ID not found"}

    everything_failed = {**PARTIAL, "files": PARTIAL["files"][1:]}
    failed = _post(f"{server.base}/runsync", {"input": everything_failed})
    assert failed["status"] == "FAILED"
    assert failed["error"].startswith("no file was stored: 0 uploaded, 0 skipped, 1 failed: input.files[0].name")


@pytest.mark.gpu
def test_sigterm_stops_a_long_generate_between_steps(server: Server, tmp_path: Path) -> None:
    # Many short steps (128 px: a fraction of a second each on the tiny model, even on a loaded
    # 2-core machine), so the job is long but the next stop check comes within seconds.
    steps = 150
    long_job = {"action": "generate", "prompt": "noise", "steps": steps, "width": 128, "height": 128, "seed": 1}
    answer: dict[str, Any] = {}

    def submit() -> None:
        answer.update(_post(f"{server.base}/runsync", {"input": long_job}, timeout=600))

    caller = threading.Thread(target=submit)
    caller.start()
    server.output.wait_for("progress: {'step'")  # the runner has reported a step
    assert caller.is_alive(), answer
    server.process.send_signal(signal.SIGTERM)
    caller.join(timeout=60)
    assert not caller.is_alive(), "the job did not stop"
    assert answer["status"] == "FAILED", answer
    assert "stopped (shutdown)" in answer["error"]
    stopped_at = int(answer["error"].split(" at step ")[1].split(" of ")[0])
    assert stopped_at < steps
    assert server.process.wait(timeout=60) is not None
    assert list((tmp_path / "work").iterdir()) == []  # workspace removed
    assert "Traceback" not in server.log()


# Runs the worker with aiohttp's ClientSession instrumented: prints when a session opens and closes.
SESSION_PROBE = """
import runpy, sys, aiohttp
opened, closing = aiohttp.ClientSession.__init__, aiohttp.ClientSession.close
def init(self, *args, **kwargs):
    opened(self, *args, **kwargs)
    print("probe: session opened", flush=True)
async def close(self):
    await closing(self)
    print("probe: session closed", flush=True)
aiohttp.ClientSession.__init__, aiohttp.ClientSession.close = init, close
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_shutdown_closes_the_s3_client(tmp_path: Path, moto_server: str, bucket: str, signum: int) -> None:
    s3_env = {"S3_BUCKET": bucket, "S3_ENDPOINT_URL": moto_server, "S3_REGION": "us-east-1"}
    s3_env |= {"AWS_ACCESS_KEY_ID": TEST_KEY_ID, "AWS_SECRET_ACCESS_KEY": TEST_SECRET}
    with _serving(tmp_path, [sys.executable, "-c", SESSION_PROBE], **s3_env) as server:
        assert _post(f"{server.base}/runsync", {"input": PARTIAL})["status"] == "COMPLETED"
        server.process.send_signal(signum)
        server.process.wait(timeout=60)
    log = server.log()
    assert "probe: session opened" in log
    assert log.count("probe: session closed") == log.count("probe: session opened"), log
    assert "Unclosed" not in log
    assert "Traceback" not in log
    assert " ERROR " not in log
