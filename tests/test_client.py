"""The client (``client.WorkerClient`` and ``python -m client``) against the handler served
locally with ``--rp_serve_api``; its RunPod transport against a fake RunPod API; the upload
planner; and the RunPod Hub files (``.runpod/hub.json``, ``.runpod/tests.json``)."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from PIL import Image
from pydantic import AliasChoices

from client import JobFailed, JobTimeout, WorkerClient
from client.cli import main
from client.errors import DownloadError
from client.files import save_output_file
from client.uploads import LocalFile, base64_length, encode_batch, entry_length, envelope_length, plan_upload
from config.settings import Settings, build_settings
from services.actions import parse_job_input
from tests.conftest import CONFIG_PREFIXES, TEST_KEY_ID, TEST_SECRET, s3_client
from tests.faultproxy import free_port

ROOT = Path(__file__).resolve().parent.parent
HUB = json.loads((ROOT / ".runpod" / "hub.json").read_text())
HUB_TESTS = json.loads((ROOT / ".runpod" / "tests.json").read_text())
SERVER_INLINE_MAX = 4096  # small, so stored files and LoRAs come back as file:// redirects
SMALL_BUDGET = 200_000  # inline JSON bytes per batch in the tests (the default is 9.5 MB)


# --- the local server ----------------------------------------------------------------------------


def server_env(storage: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(CONFIG_PREFIXES)}
    env.update(
        {
            "STORAGE_DIR": str(storage),
            "INLINE_MAX_BYTES": str(SERVER_INLINE_MAX),
            "MODEL_ID": "builtin:tiny-sd",
            "LOG_LEVEL": "WARNING",
            "PYTHONPATH": str(ROOT),
            **(extra or {}),
        }
    )
    return env


READY_LINE = b"Uvicorn running on"  # uvicorn logs it at info once the socket listens


@contextlib.contextmanager
def serve_local_api(home: Path, extra_env: dict[str, str] | None = None) -> Iterator[tuple[str, Path]]:
    """``python rp_handler.py --rp_serve_api`` on a free port: ``(base URL, STORAGE_DIR)``.

    ``extra_env`` adds settings (an S3 bucket on the moto server, for presigned uploads). Ready
    when the server logs that it listens (its output is copied to ``server.log``): no polling.
    """
    storage = home / "storage"
    port = free_port()
    log_path = home / "server.log"
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "rp_handler.py"), "--rp_serve_api", "--rp_api_port", str(port)],
        cwd=home,
        env=server_env(storage, {"UVICORN_LOG_LEVEL": "info", **(extra_env or {})}),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    listening = threading.Event()
    ended = threading.Event()

    def copy_output() -> None:
        assert process.stdout is not None
        with log_path.open("wb") as log_file:
            for line in process.stdout:
                log_file.write(line)
                log_file.flush()
                if READY_LINE in line:
                    listening.set()
        ended.set()
        listening.set()  # wake the waiter: the server's output ended

    copier = threading.Thread(target=copy_output, name="server-log", daemon=True)
    copier.start()
    try:
        if not listening.wait(60) or ended.is_set():
            pytest.fail("the local API did not start:\n" + log_path.read_text(errors="replace")[-3000:])
        yield f"http://127.0.0.1:{port}", storage
    finally:
        process.terminate()
        process.wait(timeout=30)
        copier.join(timeout=30)


@pytest.fixture(scope="module")
def local_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    with serve_local_api(tmp_path_factory.mktemp("client-server")) as served:
        yield served


@pytest.fixture
def worker(local_server: tuple[str, Path]) -> Iterator[WorkerClient]:
    with WorkerClient.for_local(local_server[0], timeout=120, request_timeout=30, inline_budget=SMALL_BUDGET) as client:
        yield client


def png_bytes(color: str, size: int = 32) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, "PNG")
    return buffer.getvalue()


def noise_png(approx_bytes: int) -> bytes:
    """A real PNG of random pixels, about ``approx_bytes`` long (noise does not compress)."""
    side = int((approx_bytes / 3) ** 0.5) + 1
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, "PNG")
    return buffer.getvalue()


def make_dataset(folder: Path, colors: tuple[str, ...] = ("red", "blue")) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for color in colors:
        (folder / f"{color}.png").write_bytes(png_bytes(color))
        (folder / f"{color}.txt").write_text(f"a {color} square")
    return folder


# --- the upload planner (pure) -------------------------------------------------------------------


def test_plan_packs_batches_by_their_exact_json_size() -> None:
    sizes = [10, 60_000, 70_000, 1, 149_000, 150_000, 300_000, 5_000, 80_000]
    files = [LocalFile(name=f"f{i}-é.png", path=Path(f"/nowhere/{i}"), size=s) for i, s in enumerate(sizes)]
    plan = plan_upload(files, "set", budget=SMALL_BUDGET, max_files_per_batch=3)
    planned = [f for batch in plan.batches for f in batch]
    assert sorted([*planned, *plan.presigned], key=files.index) == files  # every file exactly once
    assert planned == [f for f in files if f not in plan.presigned]  # order kept
    for batch in plan.batches:
        assert 1 <= len(batch) <= 3
        body = {
            "input": {
                "action": "upload_training_files",
                "dataset": "set",
                "files": [{"name": f.name, "data": "A" * base64_length(f.size)} for f in batch],
            }
        }
        assert len(json.dumps(body).encode()) <= SMALL_BUDGET
    # Exactly the files that alone would not fit go through presigned URLs.
    alone = envelope_length("set")
    assert plan.presigned == [f for f in files if alone + entry_length(f.name, f.size) > SMALL_BUDGET]
    assert {f.size for f in plan.presigned} == {150_000, 300_000}


def test_a_batch_fills_the_budget_to_the_byte() -> None:
    files = [LocalFile(name=f"{i}.png", path=Path(f"/nowhere/{i}"), size=30_000 + i) for i in range(3)]
    exact = envelope_length("d") + sum(entry_length(f.name, f.size) for f in files) + 2 * 2  # ", " twice
    assert plan_upload(files, "d", budget=exact).batches == [files]
    assert plan_upload(files, "d", budget=exact - 1).batches == [files[:2], files[2:]]


def test_encoded_batch_is_the_size_the_plan_predicted(tmp_path: Path) -> None:
    files = []
    for index, size in enumerate([0, 1, 2, 3, 1000, 4097]):
        path = tmp_path / f"{index}.png"
        path.write_bytes(os.urandom(size))
        files.append(LocalFile(name=path.name, path=path, size=size))
    [batch] = plan_upload(files, "d", budget=SMALL_BUDGET).batches
    job_input, failures = encode_batch("d", batch, SMALL_BUDGET)
    assert failures == []
    predicted = envelope_length("d") + sum(entry_length(f.name, f.size) for f in batch) + 2 * (len(batch) - 1)
    assert len(json.dumps({"input": job_input}).encode()) == predicted
    assert [base64.b64decode(e["data"]) for e in job_input["files"]] == [f.path.read_bytes() for f in batch]


# --- against the local server --------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server(moto_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, str]]:
    """The worker's local API on the S3 backend (moto): presigned uploads need a bucket."""
    bucket = f"client-{uuid.uuid4().hex[:12]}"
    s3_client(moto_server).create_bucket(Bucket=bucket)
    env = {
        "S3_BUCKET": bucket,
        "S3_ENDPOINT_URL": moto_server,
        "S3_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": TEST_KEY_ID,
        "AWS_SECRET_ACCESS_KEY": TEST_SECRET,
    }
    with serve_local_api(tmp_path_factory.mktemp("client-s3-server"), env) as (base, _storage):
        yield base, bucket, moto_server


def test_upload_packs_small_files_inline_and_presigns_large_ones(s3_server: tuple[str, str], tmp_path: Path) -> None:
    base, bucket, _endpoint = s3_server
    worker = WorkerClient.for_local(base, timeout=120, request_timeout=30, inline_budget=SMALL_BUDGET)
    folder = make_dataset(tmp_path / "photos", ("red", "green", "blue"))
    for index in range(3):  # about 60 KB each: 80 KB of base64, so two per 200 KB batch
        (folder / f"mid-{index}.png").write_bytes(noise_png(60_000))
    (folder / "huge.png").write_bytes(noise_png(300_000))  # about 300 KB, alone over the budget: presigned PUT
    (folder / "notes.md").write_text("not part of the dataset")
    (folder / "nested").mkdir()
    sent = sorted(p.name for p in folder.iterdir() if p.suffix in (".png", ".txt"))

    report = worker.upload_dataset(folder, "up")

    assert report.ok, report.failed
    assert sorted(item["name"] for item in report.uploaded) == sent
    assert report.batches >= 2
    assert report.presigned == 1
    assert [item["name"] for item in report.uploaded if item["via"] == "presigned"] == ["huge.png"]
    assert {item["name"] for item in report.ignored} == {"notes.md", "nested"}
    listed = {f["name"]: f["size"] for f in worker.list_files(dataset="up")}
    assert listed == {name: (folder / name).stat().st_size for name in sent}
    s3 = s3_client(s3_server[2])
    for name in sent:
        stored = s3.get_object(Bucket=bucket, Key=f"datasets/up/{name}")["Body"].read()
        assert stored == (folder / name).read_bytes()

    again = worker.upload_dataset(folder, "up")  # the worker skips what it already holds
    assert again.ok
    assert sorted(item["name"] for item in again.skipped) == [n for n in sent if n != "huge.png"]
    assert [item["name"] for item in again.uploaded] == ["huge.png"]


def test_upload_reports_every_failed_file(worker: WorkerClient, tmp_path: Path) -> None:
    folder = make_dataset(tmp_path / "photos")
    (folder / "bad\x01name.png").write_bytes(png_bytes("white"))

    report = worker.upload_dataset(folder, "partly")
    assert not report.ok
    assert [item["name"] for item in report.failed] == ["bad\x01name.png"]
    assert "control characters" in report.failed[0]["error"]
    assert len(report.uploaded) == 4

    refused = worker.upload_dataset(make_dataset(tmp_path / "other"), "no/slashes")
    assert len(refused.failed) == 4 and not refused.uploaded
    assert all("input.dataset" in item["error"] for item in refused.failed)


def test_get_file_follows_redirects_and_decodes_base64(
    worker: WorkerClient, local_server: tuple[str, Path], tmp_path: Path
) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    (folder / "large.png").write_bytes(noise_png(SERVER_INLINE_MAX * 3))
    (folder / "small.txt").write_text("a tiny caption")
    assert worker.upload_dataset(folder, "get").ok

    raw = worker.run({"action": "get_file", "key": "datasets/get/large.png"})["file"]
    assert raw["type"] == "redirect"
    assert raw["url"].startswith("file://")
    saved = worker.get_file("datasets/get/large.png", tmp_path / "out.png")
    assert saved == tmp_path / "out.png"
    assert saved.read_bytes() == (folder / "large.png").read_bytes()

    assert worker.run({"action": "get_file", "key": "datasets/get/small.txt"})["file"]["type"] == "base64"
    into = tmp_path / "into"
    into.mkdir()
    assert worker.get_file("datasets/get/small.txt", into).read_text() == "a tiny caption"

    with pytest.raises(JobFailed, match=r"^get_file: input\.key: datasets/get/missing\.png does not exist$"):
        worker.get_file("datasets/get/missing.png", tmp_path)
    # A file:// redirect is followed only for a local server.
    with pytest.raises(DownloadError, match="only followed for a local server"):
        save_output_file(raw, tmp_path / "refused.png", allow_file_urls=False)
    assert not (tmp_path / "refused.png").exists()


def test_health_reports_the_local_backend(worker: WorkerClient, local_server: tuple[str, Path]) -> None:
    health = worker.health()
    assert health["status"] == "ok"
    assert health["storage"]["backend"] == "local"
    assert health["storage"]["storage_dir"] == str(local_server[1].resolve())
    assert health["limits"]["inline_max_bytes"] == SERVER_INLINE_MAX


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.upper().startswith(CONFIG_PREFIXES)}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [sys.executable, "-m", "client", *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_upload_ls_and_a_failed_get(local_server: tuple[str, Path], tmp_path: Path) -> None:
    base = local_server[0]
    folder = make_dataset(tmp_path / "photos")

    upload = run_cli("--local", base, "--json", "upload", str(folder), "--dataset", "cli")
    assert upload.returncode == 0, upload.stderr
    assert sorted(item["name"] for item in json.loads(upload.stdout)["uploaded"]) == sorted(
        p.name for p in folder.iterdir()
    )

    listing = run_cli("ls", "--dataset", "cli", "--local", base)  # options after the command too
    assert listing.returncode == 0, listing.stderr
    assert "datasets/cli/red.png" in listing.stdout
    assert listing.stdout.strip().endswith(f"4 files, {sum(p.stat().st_size for p in folder.iterdir())} bytes")

    missing = run_cli("--local", base, "get", "datasets/cli/missing.png", "--out", str(tmp_path))
    assert missing.returncode == 1
    assert "error: get_file: input.key: datasets/cli/missing.png does not exist" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_cli_without_an_endpoint_is_a_usage_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("RUNPOD_ENDPOINT_ID", raising=False)
    with pytest.raises(SystemExit) as stopped:
        main(["health"])
    assert stopped.value.code == 2
    assert "RUNPOD_ENDPOINT_ID" in capsys.readouterr().err
    monkeypatch.setenv("RUNPOD_ENDPOINT_ID", "ep")
    with pytest.raises(SystemExit):
        main(["health"])
    assert "RUNPOD_API_KEY is not set" in capsys.readouterr().err


def test_train_downloads_the_lora_and_generate_saves_images(
    worker: WorkerClient, local_server: tuple[str, Path], tmp_path: Path
) -> None:
    assert worker.upload_dataset(make_dataset(tmp_path / "photos"), "tiny").ok

    (tmp_path / "loras").mkdir()
    trained = worker.train(
        "tiny",
        "tiny-lora",
        dest=tmp_path / "loras",
        steps=2,
        rank=4,
        resolution=32,
        base_model="builtin:tiny-sd",
        export_formats=["diffusers", "kohya"],
    )
    assert trained.lora == tmp_path / "loras" / "tiny-lora.safetensors"
    assert trained.key == "loras/tiny-lora/tiny-lora.safetensors"
    assert trained.lora.read_bytes() == (local_server[1] / trained.key).read_bytes()  # came as a file:// redirect
    header_length = int.from_bytes(trained.lora.read_bytes()[:8], "little")
    tensors = json.loads(trained.lora.read_bytes()[8 : 8 + header_length])
    assert tensors and all("lora" in key for key in tensors if key != "__metadata__")
    assert trained.kohya_lora == tmp_path / "loras" / "tiny-lora.kohya.safetensors"
    assert trained.metrics["steps"] == 2

    result = worker.generate(
        "a red square",
        lora="tiny-lora",
        num_images=2,
        width=32,
        height=32,
        steps=2,
        seed=3,
        base_model="builtin:tiny-sd",
        out_dir=tmp_path / "images",
    )
    assert result.seed == 3
    assert [p.name for p in result.images] == ["3-image-0.png", "3-image-1.png"]
    for path in result.images:
        with Image.open(path) as image:
            assert image.size == (32, 32)


# --- the RunPod transport, against a fake RunPod API --------------------------------------------


class FakeRunPod(BaseHTTPRequestHandler):
    """``/v2/<endpoint>/run``, ``status/<id>`` and ``cancel/<id>`` as RunPod answers them."""

    scripts: ClassVar[dict[str, list[dict[str, Any]]]] = {}
    seen: ClassVar[list[tuple[str, str, str]]] = []

    def log_message(self, format: str, *args: Any) -> None:
        del format, args  # quiet

    def _send(self, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"null")
        self.seen.append(("POST", self.path, self.headers.get("Authorization", "")))
        if self.path == "/v2/ep-1/run":
            self._send({"id": body["input"]["script"], "status": "IN_QUEUE"})
        else:
            self._send({"id": self.path.rsplit("/", 1)[-1], "status": "CANCELLED"})

    def do_GET(self) -> None:
        self.seen.append(("GET", self.path, self.headers.get("Authorization", "")))
        script = self.scripts[self.path.rsplit("/", 1)[-1]]
        self._send(script.pop(0) if len(script) > 1 else script[0])


@pytest.fixture
def fake_runpod() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeRunPod)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    FakeRunPod.seen.clear()
    yield f"http://127.0.0.1:{server.server_address[1]}/v2"
    server.shutdown()
    server.server_close()


def test_runpod_transport_polls_shows_progress_and_raises_worker_errors(
    fake_runpod: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("DEBUG")
    FakeRunPod.scripts.update(
        {
            "ok": [
                {"status": "IN_QUEUE"},
                {"status": "IN_PROGRESS", "output": {"step": 1, "total_steps": 2}},
                {"status": "IN_PROGRESS", "output": {"step": 1, "total_steps": 2}},
                {"status": "IN_PROGRESS", "output": {"step": 2, "total_steps": 2}},
                {"status": "COMPLETED", "output": {"answer": 42}},
            ],
            "partial": [{"status": "FAILED", "error": "1 of 2 files failed", "output": {"uploaded": [{"name": "a"}]}}],
            "dropped": [{"status": "COMPLETED"}],
            "stuck": [{"status": "IN_PROGRESS"}],
        }
    )
    worker = WorkerClient.for_endpoint("ep-1", api_key="key-never-printed", base_url=fake_runpod, poll_interval=0.05)
    updates: list[Any] = []
    assert worker.run({"action": "health", "script": "ok"}, on_progress=updates.append) == {"answer": 42}
    assert updates == [{"step": 1, "total_steps": 2}, {"step": 2, "total_steps": 2}]

    with pytest.raises(JobFailed, match=r"^health: 1 of 2 files failed$") as failed:
        worker.run({"action": "health", "script": "partial"})
    assert failed.value.output == {"uploaded": [{"name": "a"}]}
    with pytest.raises(JobFailed, match="completed without output"):
        worker.run({"action": "health", "script": "dropped"})
    with pytest.raises(JobTimeout, match=r"did not finish within 0\.3 s"):
        worker.run({"action": "health", "script": "stuck"}, timeout=0.3)

    assert ("POST", "/v2/ep-1/cancel/stuck", "Bearer key-never-printed") in FakeRunPod.seen
    assert {auth for _, _, auth in FakeRunPod.seen} == {"Bearer key-never-printed"}
    assert "key-never-printed" not in repr(worker) + caplog.text


# --- RunPod Hub files ----------------------------------------------------------------------------


def setting_names() -> set[str]:
    names = set()
    for name, field in Settings.model_fields.items():
        names.add(name.upper())
        if isinstance(field.validation_alias, AliasChoices):
            names |= {c.upper() for c in field.validation_alias.choices if isinstance(c, str)}
    return names


def env_text(value: Any) -> str:
    return ("true" if value else "false") if isinstance(value, bool) else str(value)


def hub_env_values() -> list[dict[str, str]]:
    """Every environment the Hub form can produce from one field's default, bounds or options."""
    variants: list[dict[str, str]] = []
    for entry in HUB["config"]["env"]:
        if "value" in entry:
            variants.append({entry["key"]: env_text(entry["value"])})
            continue
        spec = entry["input"]
        values = [spec.get("default"), spec.get("min"), spec.get("max")]
        values += [option["value"] for option in spec.get("options", [])]
        if spec["type"] == "boolean":
            values = [spec["trueValue"], spec["falseValue"]]
        variants += [{entry["key"]: env_text(v)} for v in values if v is not None]
    variants += [{k: env_text(v) for k, v in preset["defaults"].items()} for preset in HUB["config"]["presets"]]
    return variants


def test_hub_json_lists_a_gpu_serverless_image_worker() -> None:
    assert {"title", "description", "type", "category", "config"} <= HUB.keys()
    assert HUB["type"] == "serverless"
    assert HUB["category"] in {"audio", "embedding", "language", "video", "image"}
    config = HUB["config"]
    assert config["runsOn"] == "GPU"
    assert isinstance(config["containerDiskInGb"], int) and config["containerDiskInGb"] >= 20
    assert isinstance(config["gpuCount"], int) and config["gpuCount"] >= 1
    assert re.fullmatch(r"-?[A-Za-z0-9_ ]+(,-?[A-Za-z0-9_ ]+)*", config["gpuIds"])
    keys = [entry["key"] for entry in config["env"]]
    assert len(keys) == len(set(keys))
    assert {"MODEL_ID", "S3_BUCKET", "S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(keys)
    assert set(keys) <= setting_names(), set(keys) - setting_names()
    for entry in config["env"]:
        assert ("value" in entry) != ("input" in entry), entry["key"]
        spec = entry.get("input", {})
        if spec:
            assert spec["type"] in {"string", "number", "boolean", "huggingface"}, entry["key"]
            assert spec["name"] and spec["description"], entry["key"]
            options = [option["value"] for option in spec.get("options", [])]
            assert not options or spec["default"] in options, entry["key"]
    model = next(entry for entry in config["env"] if entry["key"] == "MODEL_ID")
    assert model["input"]["default"] == "builtin:tiny-sd"
    for preset in config["presets"]:
        assert preset["name"] and set(preset["defaults"]) <= set(keys)


@pytest.mark.parametrize("env", hub_env_values(), ids=lambda env: ",".join(f"{k}={v}" for k, v in env.items()))
def test_every_value_the_hub_form_offers_is_a_valid_setting(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    build_settings()  # raises ConfigError naming the variable


def test_tests_json_inputs_are_valid_jobs_on_the_tiny_model(monkeypatch: pytest.MonkeyPatch) -> None:
    config = HUB_TESTS["config"]
    assert isinstance(config["gpuTypeId"], str) and config["gpuTypeId"]
    assert isinstance(config["gpuCount"], int) and config["gpuCount"] >= 1
    env = {entry["key"]: entry["value"] for entry in config["env"]}
    assert env["MODEL_ID"] == "builtin:tiny-sd"
    for key, value in env.items():
        assert key in setting_names()
        monkeypatch.setenv(key, value)
    settings = build_settings()
    names = [test["name"] for test in HUB_TESTS["tests"]]
    assert len(names) == len(set(names))
    actions = []
    for test in HUB_TESTS["tests"]:
        assert isinstance(test["timeout"], int) and test["timeout"] > 0
        request = parse_job_input(test["input"], settings)
        actions.append(request.action)
        if request.action in ("generate", "train_lora"):
            assert request.base_model == "builtin:tiny-sd"
    assert {"health", "upload_training_files", "generate"} <= set(actions)


def test_cuda_versions_match_the_dockerfile() -> None:
    allowed = HUB["config"]["allowedCudaVersions"]
    assert HUB_TESTS["config"]["allowedCudaVersions"] == allowed
    dockerfile = ROOT / "Dockerfile"
    found = re.search(r"^FROM nvidia/cuda:(\d+)\.(\d+)", dockerfile.read_text(), re.MULTILINE)
    assert found, "the Dockerfile does not start from an nvidia/cuda image"
    image = (int(found[1]), int(found[2]))
    # The host driver must support the image's CUDA: every allowed version is at least that.
    assert all(tuple(int(part) for part in version.split(".")) >= image for version in allowed)


def test_hub_smoke_tests_pass_on_the_local_server(worker: WorkerClient) -> None:
    for test in HUB_TESTS["tests"]:
        output = worker.run(test["input"])
        assert isinstance(output, dict), test["name"]
        if test["input"]["action"] == "upload_training_files":
            assert {f["name"] for f in output["uploaded"] + output["skipped"]} == {"red.bmp", "red.txt"}
        if test["input"]["action"] == "generate":
            assert len(output["images"]) == test["input"]["num_images"]
