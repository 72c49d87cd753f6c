"""The installed client: ``pip install`` of the repository gives a ``lora-worker`` command that
runs from any folder. Tested through that command in a subprocess (a temporary folder as its
working directory) against a fake of RunPod's endpoint API (``/run``, ``/status/<id>`` with
IN_PROGRESS progress outputs, ``/cancel/<id>``), a fake of the SDK's local API (its status
call blocks, it has no cancel), and the real worker's ``--rp_serve_api``.

The fakes serve no ``/runsync``: the client never calls it (every job goes through ``/run``).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import sysconfig
import threading
import zipfile
from collections.abc import Iterator
from email.parser import Parser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from client.cli import build_parser
from tests.conftest import CONFIG_PREFIXES
from tests.test_client import make_dataset, png_bytes, serve_local_api

ROOT = Path(__file__).resolve().parent.parent
ENDPOINT = "ep-test"
RESUMABLE = (
    "[resumable] train_lora stopped at step 2 of 4 (deadline); checkpoint saved at step 2: "
    "send the same input again to resume"
)
LORA_BYTES = b"not really safetensors, but bytes to save"


# --- the installed package -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel ``pip install .`` builds, from a copy of the files packaging reads (the tree stays clean)."""
    home = tmp_path_factory.mktemp("wheel")
    source = home / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        (source / name).write_bytes((ROOT / name).read_bytes())
    subprocess.run(
        ["cp", "-r", str(ROOT / "client"), str(source / "client")], check=True, capture_output=True, timeout=60
    )
    offline = ("--no-deps", "--no-build-isolation", "--no-index")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", *offline, "-w", str(home / "dist"), str(source)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    [path] = (home / "dist").glob("*.whl")
    return path


@pytest.fixture(scope="module")
def lora_worker(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``lora-worker`` command of a fresh virtual environment the wheel is installed into.

    The environment sees this one's packages only through a ``.pth`` line appended after its
    own site-packages (requests and tqdm; installing them would need the network), never the
    repository: ``client`` comes from the wheel.
    """
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    Path(site, "shared.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    installed = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert installed.returncode == 0, installed.stderr
    origin = subprocess.run(
        [str(python), "-c", "import client; print(client.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        cwd=venv,
    ).stdout.strip()
    assert origin.startswith(site), origin  # the wheel's copy, not the repository's
    return venv / "bin" / "lora-worker"


def test_the_wheel_holds_the_client_only_with_light_dependencies(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        [metadata_name] = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
        [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        scripts = archive.read(entry_points).decode()
    packages = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert packages == {"client"}  # the worker (config, services, rp_handler) is never installed
    assert "lora-worker = client.cli:main" in scripts
    required = {line.split("<")[0].split(">")[0].split("=")[0].strip() for line in metadata.get_all("Requires-Dist")}
    assert required == {"requests", "tqdm"}


def test_the_command_runs_from_any_folder_without_torch_or_the_sdk(lora_worker: Path, tmp_path: Path) -> None:
    helped = subprocess.run(
        [str(lora_worker), "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: lora-worker")
    python = lora_worker.parent / "python"
    probe = "import sys, client.cli; print(sorted(m for m in ('torch', 'runpod', 'services') if m in sys.modules))"
    loaded = subprocess.run(
        [str(python), "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
    )
    assert loaded.stdout.strip() == "[]", loaded.stderr


def test_every_option_has_help() -> None:
    parser = build_parser()
    parsers = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parsers += list(action.choices.values())
    assert len(parsers) == 10
    for each in parsers:
        for action in each._actions:
            if action.dest != "command":
                assert action.help, f"{each.prog} {action.option_strings or action.dest} has no help"


# --- a fake RunPod endpoint ---------------------------------------------------------------------


class FakeEndpoint:
    """RunPod's serverless API (``/v2/<endpoint>/...``), or with ``local=True`` the SDK's local
    API (``/run``, ``POST /status/<id>`` that blocks until ``release`` is set, no ``/cancel``).

    Each ``/run`` takes the next script from ``scripts``: the states its status polls return in
    order (the last one repeats); ``"{job}"`` in a state is replaced by the job's input, so a
    script can answer from what was sent.
    """

    def __init__(self, scripts: list[Any], *, local: bool = False) -> None:
        self.scripts = list(scripts)
        self.local = local
        self.jobs: dict[str, dict[str, Any]] = {}
        self.runs: list[dict[str, Any]] = []
        self.cancels: list[str] = []
        self.polls: list[str] = []
        self.waiting: list[str] = []  # local status calls blocked in the job
        self.release = threading.Event()
        self.lock = threading.Lock()
        self.changed = threading.Condition(self.lock)  # notified on each poll and each blocked status call
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeEndpoint:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _next_state(self, job_id: str) -> dict[str, Any]:
        with self.lock:
            self.polls.append(job_id)
            self.changed.notify_all()
            job = self.jobs[job_id]
            if job_id in self.cancels:
                return {"id": job_id, "status": "CANCELLED"}
            states = job["states"]
            state = states.pop(0) if len(states) > 1 else states[0]
        return {"id": job_id, **(state(job["input"]) if callable(state) else state)}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self
        prefix = "" if self.local else f"/v2/{ENDPOINT}"

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                del format, args

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _authorized(self) -> bool:
                if fake.local or self.headers.get("Authorization") == "Bearer test-key":
                    return True
                self._send(401, {"error": "Unauthorized"})
                return False

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                if not self._authorized():
                    return
                if self.path == f"{prefix}/run":
                    with fake.lock:
                        job_id = f"job-{len(fake.runs) + 1}"
                        fake.runs.append(body["input"])
                        fake.jobs[job_id] = {"input": body["input"], "states": list(fake.scripts.pop(0))}
                    self._send(200, {"id": job_id, "status": "IN_QUEUE"})
                elif fake.local and self.path.startswith("/status/"):
                    job_id = self.path.rsplit("/", 1)[-1]
                    with fake.lock:
                        fake.waiting.append(job_id)
                        fake.changed.notify_all()
                    fake.release.wait(60)  # the local API runs the job inside this call
                    self._send(200, fake._next_state(job_id))
                elif not fake.local and self.path.startswith(f"{prefix}/cancel/"):
                    job_id = self.path.rsplit("/", 1)[-1]
                    with fake.lock:
                        fake.cancels.append(job_id)
                    self._send(200, {"id": job_id, "status": "CANCELLED"})
                else:
                    self._send(404, {"detail": "Not Found"})

            def do_GET(self) -> None:
                if fake.local or not self.path.startswith(f"{prefix}/status/"):
                    self._send(405 if fake.local else 404, {"detail": "Not Found"})
                elif self._authorized():
                    self._send(200, fake._next_state(self.path.rsplit("/", 1)[-1]))

        return Handler


def command_env(fake: FakeEndpoint) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(CONFIG_PREFIXES)}
    env.pop("PYTHONPATH", None)
    env["RUNPOD_API_KEY"] = "test-key"  # pragma: allowlist secret (a test fake)
    env["RUNPOD_ENDPOINT_BASE_URL"] = f"{fake.url}/v2"
    return env


def run_command(
    lora_worker: Path, fake: FakeEndpoint, cwd: Path, *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    where = ["--local", fake.url] if fake.local else ["--endpoint", ENDPOINT]
    return subprocess.run(
        [str(lora_worker), *where, "--poll-interval", "0.05", *args],
        cwd=cwd,
        env=command_env(fake),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def progress(step: int, total: int, **extra: Any) -> dict[str, Any]:
    return {"status": "IN_PROGRESS", "output": {"step": step, "total_steps": total, **extra}}


def trained(resumed_from_step: int) -> dict[str, Any]:
    lora = {
        "type": "base64",
        "name": "cat-lora.safetensors",
        "key": "loras/cat-lora/cat-lora.safetensors",
        "size": len(LORA_BYTES),
        "data": base64.b64encode(LORA_BYTES).decode(),
    }
    return {
        "status": "COMPLETED",
        "output": {"lora": lora, "metrics": {"steps": 4}, "resumed_from_step": resumed_from_step},
    }


TRAIN = ("train", "--dataset", "cats", "--output-name", "cat-lora", "--steps", "4")


# --- progress ------------------------------------------------------------------------------------


def test_train_and_generate_show_the_jobs_progress(lora_worker: Path, tmp_path: Path) -> None:
    image = base64.b64encode(b"\x89PNG fake").decode()
    generated = {
        "status": "COMPLETED",
        "output": {"seed": 7, "images": [{"type": "base64", "name": "image-0.png", "size": 9, "data": image}]},
    }
    scripts = [
        [{"status": "IN_QUEUE"}, progress(1, 4, loss=0.5, eta_seconds=9.0), progress(3, 4, loss=0.25), trained(0)],
        [progress(1, 2), progress(2, 2), generated],
    ]
    with FakeEndpoint(scripts) as fake:
        training = run_command(lora_worker, fake, tmp_path, *TRAIN)
        generating = run_command(lora_worker, fake, tmp_path, "generate", "--prompt", "a cat", "--seed", "7")

    assert training.returncode == 0, training.stderr
    assert "train cat-lora:  25%" in training.stderr and "1/4 steps" in training.stderr
    assert "loss=0.5000, eta=9s" in training.stderr
    assert "3/4 steps" in training.stderr and "loss=0.2500" in training.stderr
    assert (tmp_path / "cat-lora.safetensors").read_bytes() == LORA_BYTES  # saved in the working folder
    assert "resumed from step" not in training.stdout  # a fresh start says nothing about resuming
    assert fake.runs[0] == {"action": "train_lora", "dataset": "cats", "output_name": "cat-lora", "steps": 4}

    assert generating.returncode == 0, generating.stderr
    assert "generate: 100%" in generating.stderr and "2/2 steps" in generating.stderr
    assert (tmp_path / "7-image-0.png").read_bytes() == b"\x89PNG fake"
    assert "Traceback" not in training.stderr + generating.stderr


def test_upload_shows_files_sent_and_a_partial_batch_fails_with_its_names(lora_worker: Path, tmp_path: Path) -> None:
    make_dataset(tmp_path / "photos", ("red", "blue"))

    def partial(job: dict[str, Any]) -> dict[str, Any]:
        names = [f["name"] for f in job["files"]]
        failed = [{"name": "blue.png", "error": "input.files[0]: not a decodable PNG image"}]
        return {
            "status": "COMPLETED",
            "output": {
                "uploaded": [{"name": n, "key": f"datasets/cats/{n}"} for n in names if n != "blue.png"],
                "skipped": [],
                "failed": failed,
                "partial": True,
                "summary": f"{len(names) - 1} of {len(names)} files stored; 1 failed",
            },
        }

    with FakeEndpoint([[partial]]) as fake:
        result = run_command(lora_worker, fake, tmp_path, "upload", "photos", "--dataset", "cats")

    assert result.returncode == 1, result.stderr
    assert "upload cats: 100%" in result.stderr and "4/4" in result.stderr
    assert "FAILED blue.png: input.files[0]: not a decodable PNG image" in result.stdout
    assert "worker: 3 of 4 files stored; 1 failed" in result.stdout
    assert "error: upload to dataset cats: 1 files failed: blue.png" in result.stderr
    assert "Traceback" not in result.stderr


# --- Ctrl-C --------------------------------------------------------------------------------------


# Ctrl-C at a terminal reaches a process whose SIGINT is at its default. A process launched with
# SIGINT ignored (pytest run as a background job of a script, as some CI runners do) passes the
# ignore on to its children, and the client then keeps ignoring it, as every program does: the
# command under test is exec'd with SIGINT back at its default, as a terminal would start it.
WITH_DEFAULT_SIGINT = [
    sys.executable,
    "-c",
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); os.execv(sys.argv[1], sys.argv[1:])",
]


def interrupt_when(
    process: subprocess.Popen[str], fake: FakeEndpoint, ready: Any, signum: int = signal.SIGINT
) -> tuple[str, str]:
    """Send SIGINT to ``process`` once ``ready()`` holds; its ``(stdout, stderr)`` after it ends.

    Waits on the fake's condition (notified on each poll) and on the process's exit, never sleeps.
    """

    def notify_on_exit() -> None:
        process.wait()
        with fake.changed:
            fake.changed.notify_all()

    threading.Thread(target=notify_on_exit, daemon=True).start()
    with fake.changed:
        fake.changed.wait_for(lambda: ready() or process.poll() is not None, timeout=60)
        started = ready()
    assert process.poll() is None, process.communicate()
    assert started, "the job never started"
    process.send_signal(signum)
    return process.communicate(timeout=60)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_cancels_the_remote_job_and_exits_130(lora_worker: Path, tmp_path: Path, signum: int) -> None:
    """Catches a client that leaves the job running on the endpoint when it is stopped: Ctrl-C or
    a SIGTERM (a CI timeout, a supervisor's kill) cancels it there and exits 130."""
    with FakeEndpoint([[progress(1, 1000, loss=0.9)]]) as fake:
        process = subprocess.Popen(
            [*WITH_DEFAULT_SIGINT, str(lora_worker), "--endpoint", ENDPOINT, "--poll-interval", "0.05", *TRAIN],
            cwd=tmp_path,
            env=command_env(fake),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, stderr = interrupt_when(process, fake, lambda: len(fake.polls) >= 3, signum)

    assert process.returncode == 130, stderr
    assert fake.cancels == ["job-1"]
    assert "interrupted: train_lora: cancelled job job-1 on the endpoint" in stderr
    assert "Traceback" not in stderr and len(fake.runs) == 1


def test_ctrl_c_on_the_local_api_says_it_cannot_cancel(lora_worker: Path, tmp_path: Path) -> None:
    with FakeEndpoint([[trained(0)]], local=True) as fake:
        process = subprocess.Popen(
            [*WITH_DEFAULT_SIGINT, str(lora_worker), "--local", fake.url, *TRAIN],
            cwd=tmp_path,
            env=command_env(fake),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _, stderr = interrupt_when(process, fake, lambda: fake.waiting == ["job-1"])

    assert process.returncode == 130, stderr
    assert "no step progress until it ends" in stderr  # a spinner with the elapsed time, not a bar
    assert "interrupted: train_lora: could not cancel job job-1" in stderr
    assert "the local test server cannot cancel a running job" in stderr
    assert "train cat-lora interrupted [" in stderr and "finished" not in stderr  # not "finished"
    assert "Traceback" not in stderr


# --- resume --------------------------------------------------------------------------------------


def test_train_resubmits_the_same_input_until_it_completes(lora_worker: Path, tmp_path: Path) -> None:
    stopped = {"status": "FAILED", "error": RESUMABLE}
    scripts = [[progress(2, 4), stopped], [progress(3, 4), stopped], [progress(4, 4), trained(3)]]
    with FakeEndpoint(scripts) as fake:
        result = run_command(lora_worker, fake, tmp_path, *TRAIN, "--param", "learning_rate=1e-4")

    assert result.returncode == 0, result.stderr
    assert len(fake.runs) == 3 and fake.runs[0] == fake.runs[1] == fake.runs[2]
    assert fake.runs[0]["learning_rate"] == 1e-4
    assert result.stderr.count("checkpoint saved at step 2") == 2
    assert "resubmitting the same input to resume (1 of at most 10)" in result.stderr
    assert "resubmitting the same input to resume (2 of at most 10)" in result.stderr
    assert "resumed from step 3 (after 2 resubmissions)" in result.stdout
    assert (tmp_path / "cat-lora.safetensors").read_bytes() == LORA_BYTES


def test_no_resume_stops_at_the_first_resumable_error(lora_worker: Path, tmp_path: Path) -> None:
    with FakeEndpoint([[progress(2, 4), {"status": "FAILED", "error": RESUMABLE}], [trained(2)]]) as fake:
        result = run_command(lora_worker, fake, tmp_path, *TRAIN, "--no-resume")

    assert result.returncode == 1
    assert len(fake.runs) == 1
    assert f"error: train_lora: {RESUMABLE} (--no-resume: run the same command again to resume)" in result.stderr
    assert "Traceback" not in result.stderr


def test_resubmissions_are_bounded_and_other_errors_are_not_retried(lora_worker: Path, tmp_path: Path) -> None:
    stopped = [{"status": "FAILED", "error": RESUMABLE}]
    broken = [{"status": "FAILED", "error": "input.dataset: dataset 'cats' has no images"}]
    with FakeEndpoint([stopped, stopped, stopped, broken]) as fake:
        bounded = run_command(lora_worker, fake, tmp_path, *TRAIN, "--max-resumes", "2")
        assert len(fake.runs) == 3
        plain = run_command(lora_worker, fake, tmp_path, *TRAIN)
        assert len(fake.runs) == 4

    assert bounded.returncode == 1
    assert "(gave up after 2 resubmissions; raise the limit or run again)" in bounded.stderr
    assert plain.returncode == 1
    assert "error: train_lora: input.dataset: dataset 'cats' has no images" in plain.stderr


# --- usage and configuration ---------------------------------------------------------------------


def test_usage_and_bad_results_exit_without_a_traceback(lora_worker: Path, tmp_path: Path) -> None:
    with FakeEndpoint([[{"status": "COMPLETED", "output": {"metrics": {}}}]]) as fake:
        no_folder = run_command(lora_worker, fake, tmp_path, "upload", "missing", "--dataset", "cats")
        no_lora = run_command(lora_worker, fake, tmp_path, *TRAIN)
        env = command_env(fake)
        env["RUNPOD_API_KEY"] = "wrong"  # pragma: allowlist secret (a test fake)
        refused = subprocess.run(
            [str(lora_worker), "--endpoint", ENDPOINT, "health"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    no_endpoint = subprocess.run(
        [str(lora_worker), "health"],
        cwd=tmp_path,
        env=command_env(fake),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert no_folder.returncode == 2 and "missing is not a folder" in no_folder.stderr
    assert no_lora.returncode == 1 and "the worker's result has no 'lora' file" in no_lora.stderr
    assert refused.returncode == 1 and "HTTP 401 (the API key was refused" in refused.stderr
    assert "wrong" not in refused.stderr
    assert no_endpoint.returncode == 2 and "RUNPOD_ENDPOINT_ID" in no_endpoint.stderr
    for run in (no_folder, no_lora, refused, no_endpoint):
        assert "Traceback" not in run.stderr


# --- end to end, against the real worker's local API --------------------------------------------


@pytest.fixture(scope="module")
def local_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """The real worker's local API (``--rp_serve_api``) on the tiny models (the tiny Florence-2
    captions)."""
    with serve_local_api(tmp_path_factory.mktemp("local-api"), {"CAPTION_MODEL": "builtin:tiny-florence2"}) as served:
        yield served


def run_local(lora_worker: Path, base: str, cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``lora-worker --local BASE ARGS`` from ``cwd``, without this environment's worker settings."""
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(CONFIG_PREFIXES)}
    env.pop("PYTHONPATH", None)
    return subprocess.run(
        [str(lora_worker), "--local", base, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_the_command_against_the_workers_local_api(
    lora_worker: Path, local_api: tuple[str, Path], tmp_path: Path
) -> None:
    base, storage = local_api
    make_dataset(tmp_path / "photos")

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return run_local(lora_worker, base, tmp_path, *args)

    upload = command("upload", "photos", "--dataset", "e2e")
    listing = command("ls", "--dataset", "e2e")
    generate = command(
        "generate", "--prompt", "a red square", "--steps", "2", "--width", "32", "--height", "32", "--seed", "5"
    )

    assert upload.returncode == 0, upload.stderr
    assert "upload e2e: 100%" in upload.stderr and "4/4" in upload.stderr
    assert {p.name for p in (storage / "datasets" / "e2e").iterdir()} == {"red.png", "red.txt", "blue.png", "blue.txt"}
    assert listing.returncode == 0, listing.stderr
    assert "datasets/e2e/red.png" in listing.stdout
    assert generate.returncode == 0, generate.stderr
    assert "generate finished [" in generate.stderr  # the spinner: the local API shows no steps
    assert (tmp_path / "5-image-0.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Traceback" not in upload.stderr + listing.stderr + generate.stderr


def test_plan_asks_the_worker_whether_a_job_fits_a_card(
    lora_worker: Path, local_api: tuple[str, Path], tmp_path: Path
) -> None:
    """The README's "will it fit?" from the command line, against the real worker (a CPU one:
    the plan comes from the model's configs): FLUX.1-dev LoRA training fits 24 GB in NF4; bf16
    asked explicitly does not (exit status 3, the message names what would fit); generation
    plans too; a bad input exits 1 and a non-finite size is a usage error. Nothing is stored."""
    base, storage = local_api
    flux = ("--base-model", "black-forest-labs/FLUX.1-dev", "--gpu-memory-gb", "24")

    def command(*args: str) -> subprocess.CompletedProcess[str]:
        return run_local(lora_worker, base, tmp_path, "plan", *flux, *args)

    fits, refused, generate = command(), command("--param", "quantize_base=none"), command("--generate", "--json")
    bad, nan = command("--param", "batch_size=0"), command("--gpu-memory-gb", "nan")
    assert fits.returncode == 0, fits.stderr
    assert fits.stdout.startswith("train_lora on 24 GiB: fits with quantize_base nf4, gradient_checkpointing on")
    assert "  48 GB: quantize_base none, gradient_checkpointing on, cpu_offload off" in fits.stdout
    assert refused.returncode == 3, refused.stderr
    assert "does not fit" in refused.stdout and "fits this card with gradient_checkpointing True" in refused.stdout
    assert "With your settings, the smallest card that fits it: 32 GB" in refused.stdout
    assert generate.returncode == 0 and json.loads(generate.stdout)["plan"]["quantize_base"] == "nf4"
    assert bad.returncode == 1 and "input.batch_size" in bad.stderr
    assert nan.returncode == 2 and "expected a number of GiB above 0" in nan.stderr
    assert "Traceback" not in "".join(c.stderr for c in (fits, refused, generate, bad, nan))
    assert not (storage / "loras" / "plan").exists()


def test_caption_writes_the_missing_captions_and_prints_them(
    lora_worker: Path, local_api: tuple[str, Path], tmp_path: Path
) -> None:
    """Catches a caption command that does not reach caption_dataset or drops its options: the
    images without a caption get one (with the trigger word) stored beside them and printed;
    the captioned image is left alone."""
    base, storage = local_api
    folder = storage / "datasets" / "capset"
    folder.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        (folder / name).write_bytes(png_bytes("red"))
    (folder / "b.txt").write_text("my own caption", encoding="utf-8")
    done = run_local(lora_worker, base, tmp_path, "caption", "--dataset", "capset", "--trigger-word", "sks")
    assert done.returncode == 0, done.stderr
    stored = (folder / "a.txt").read_text(encoding="utf-8")
    assert stored.startswith("sks, ") and f"a.png: {stored}" in done.stdout
    assert "1 captioned, 1 had a caption, 0 failed" in done.stdout
    assert (folder / "b.txt").read_text(encoding="utf-8") == "my own caption"
    assert "Traceback" not in done.stderr


def test_rm_deletes_a_lora_and_exits_1_when_a_key_failed(lora_worker: Path, tmp_path: Path) -> None:
    deleted = {"deleted": ["loras/cat-lora/cat-lora.safetensors"], "missing": [], "failed": [], "partial": False}
    partial = {
        "deleted": ["datasets/cats/a.png"],
        "missing": [],
        "failed": [{"key": "datasets/cats/b.png", "error": "storage unavailable"}],
        "partial": True,
    }
    scripts = [[{"status": "COMPLETED", "output": deleted}], [{"status": "COMPLETED", "output": partial}]]
    with FakeEndpoint(scripts) as fake:
        lora = run_command(lora_worker, fake, tmp_path, "rm", "--lora", "cat-lora")
        some_failed = run_command(lora_worker, fake, tmp_path, "rm", "datasets/cats/a.png", "datasets/cats/b.png")
        both = run_command(lora_worker, fake, tmp_path, "rm", "--lora", "cat-lora", "--dataset", "cats")
    assert fake.runs[0] == {"action": "delete_files", "lora": "cat-lora"}
    assert lora.returncode == 0, lora.stderr
    assert "deleted loras/cat-lora/cat-lora.safetensors" in lora.stdout
    assert some_failed.returncode == 1
    assert "FAILED datasets/cats/b.png: storage unavailable" in some_failed.stdout
    assert both.returncode == 2 and len(fake.runs) == 2
