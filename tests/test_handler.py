"""rp_handler.handler: validation, dispatch, errors, output policy, workspaces, logging."""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings
from services.errors import GpuOutOfMemory
from tests.conftest import TEST_SECRET, run_jobs, run_with_storage, use_settings_env

# A real 1x1 PNG: uploads of files named as images are decoded before they are stored.
PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def job(action_input: dict[str, Any], job_id: str = "job-1") -> dict[str, Any]:
    return {"id": job_id, "input": action_input}


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Settings:
    settings: Settings = request.getfixturevalue(f"{request.param}_settings")
    use_settings_env(monkeypatch, settings)
    return settings


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch, s3_settings: Settings) -> Settings:
    use_settings_env(monkeypatch, s3_settings)
    return s3_settings


# --- validation -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"action": "nope"}, "input: unknown action; choose one of upload_training_files"),
        ({}, "missing 'action'"),
        ("just a string", "input must be a JSON object"),
        ({"action": "get_file"}, "input.key: Field required"),
        ({"action": "get_file", "key": 5}, "input.key: Input should be a valid string"),
        ({"action": "health", "verbose": True}, "input.verbose: Extra inputs are not permitted"),
        ({"action": "get_file", "key": "../etc/passwd"}, "input.key: "),
        ({"action": "get_file", "key": "other/x"}, "must start with one of datasets/, loras/, outputs/"),
        ({"action": "list_files"}, "give exactly one of dataset or prefix"),
        ({"action": "upload_training_files", "files": []}, "input.files: List should have at least 1 item"),
        (
            {"action": "upload_training_files", "files": [{"name": "a", "data": "x", "size": 1}]},
            "input.files[0].size: Extra inputs are not permitted",
        ),
        ({"action": "upload_training_files", "dataset": "../x", "files": [{"name": "a"}]}, "input.dataset"),
        ({"action": "generate", "prompt": "x", "width": 33}, "input.width: Input should be a multiple of 8"),
        ({"action": "generate", "prompt": "x", "num_images": 9}, "input.num_images"),
    ],
)
def test_invalid_input_gives_one_clear_error_string(
    payload: Any, expected: str, local_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_settings_env(monkeypatch, local_settings)
    [result] = run_jobs({"id": "v", "input": payload})
    assert isinstance(result["error"], str)
    assert expected in result["error"]
    assert "Traceback" not in result["error"]
    assert set(result) == {"error"}


def test_every_problem_is_listed_at_once(local_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    use_settings_env(monkeypatch, local_settings)
    [result] = run_jobs(job({"action": "presign_uploads", "files": [{"nam": "x"}], "expires_in": 0, "extra": 1}))
    error = result["error"]
    for part in (
        "input.files[0].name: Field required",
        "input.files[0].nam: Extra inputs",
        "input.expires_in: Input should be greater than or equal to 1",
        "input.extra: Extra inputs",
    ):
        assert part in error


def test_limits_are_checked_before_any_work(local_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    use_settings_env(monkeypatch, local_settings)
    monkeypatch.setenv("MAX_FILES_PER_BATCH", "2")
    files = [{"name": f"{i}.txt", "data": b64(b"x")} for i in range(3)]
    [result] = run_jobs(job({"action": "upload_training_files", "dataset": "lim", "files": files}))
    assert result == {"error": "input.files: 3 files is over the limit of 2 (MAX_FILES_PER_BATCH)"}
    assert not (local_settings.storage_dir / "datasets" / "lim").exists()


# --- actions --------------------------------------------------------------------------


def test_upload_list_get_delete_round_trip(backend: Settings) -> None:
    files = [{"name": "a.png", "data": b64(PNG_1X1)}, {"name": "a.txt", "data": b64(b"a caption")}]
    [uploaded] = run_jobs(job({"action": "upload_training_files", "dataset": "rt", "files": files}))
    assert "error" not in uploaded
    assert [u["name"] for u in sorted(uploaded["uploaded"], key=lambda u: u["name"])] == ["a.png", "a.txt"]

    listed, fetched = run_jobs(
        job({"action": "list_files", "dataset": "rt"}, "j2"),
        job({"action": "get_file", "key": "datasets/rt/a.txt"}, "j3"),
    )
    assert [f["name"] for f in listed["files"]] == ["a.png", "a.txt"]
    assert listed["next_token"] is None
    assert fetched["file"]["type"] == "base64"
    assert base64.b64decode(fetched["file"]["data"]) == b"a caption"
    assert fetched["file"]["key"] == "datasets/rt/a.txt"

    [deleted] = run_jobs(job({"action": "delete_files", "dataset": "rt"}, "j4"))
    assert sorted(deleted["deleted"]) == ["datasets/rt/a.png", "datasets/rt/a.txt"]
    [empty] = run_jobs(job({"action": "list_files", "prefix": "datasets/rt/"}, "j5"))
    assert empty["files"] == []
    [missing] = run_jobs(job({"action": "get_file", "key": "datasets/rt/a.txt"}, "j6"))
    assert "does not exist" in missing["error"]


def test_partial_upload_completes_with_the_report_and_a_summary(backend: Settings) -> None:
    files = [
        {"name": "good.png", "data": b64(PNG_1X1)},
        {"name": "bad/name.png", "data": b64(b"x")},
        {"name": "worse.png", "data": "%%%"},
    ]
    [result] = run_jobs(job({"action": "upload_training_files", "dataset": "part", "files": files}))
    assert "error" not in result
    assert result["partial"] is True
    assert result["summary"].startswith("1 uploaded, 0 skipped, 2 failed: input.files[1].name: path separators")
    assert "input.files[2]: data is not valid base64" in result["summary"]
    assert [u["name"] for u in result["uploaded"]] == ["good.png"]
    assert sorted(f["name"] for f in result["failed"]) == ["bad/name.png", "worse.png"]


def test_upload_where_every_file_failed_is_an_error_naming_the_reasons(backend: Settings) -> None:
    files = [{"name": "bad/name.png", "data": b64(b"x")}, {"name": "worse.png", "data": "%%%"}]
    [result] = run_jobs(job({"action": "upload_training_files", "dataset": "none", "files": files}))
    assert set(result) == {"error"}
    assert result["error"].startswith("no file was stored: 0 uploaded, 0 skipped, 2 failed: input.files[0].name")
    assert "input.files[1]: data is not valid base64" in result["error"]


def test_delete_reports_missing_keys_apart_from_deleted(backend: Settings) -> None:
    run_jobs(job({"action": "upload_training_files", "dataset": "dm", "files": [{"name": "a.txt", "data": b64(b"a")}]}))
    keys = ["datasets/dm/a.txt", "datasets/dm/never.txt"]
    [result] = run_jobs(job({"action": "delete_files", "keys": keys}, "j2"))
    assert result["deleted"] == ["datasets/dm/a.txt"]
    assert result["missing"] == ["datasets/dm/never.txt"]
    assert result["failed"] == [] and result["partial"] is False
    assert result["summary"] == "1 deleted, 1 missing, 0 failed"


def test_presign_on_the_local_backend_is_a_clear_error(
    local_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    use_settings_env(monkeypatch, local_settings)
    [result] = run_jobs(job({"action": "presign_uploads", "dataset": "p", "files": [{"name": "a.png"}]}))
    assert result == {"error": "presigned uploads need an S3 bucket; send the file inline"}


def test_list_files_pages(backend: Settings) -> None:
    files = [{"name": f"{i:02d}.txt", "data": b64(b"x")} for i in range(5)]
    run_jobs(job({"action": "upload_training_files", "dataset": "pages", "files": files}))
    [first] = run_jobs(job({"action": "list_files", "dataset": "pages", "limit": 2}))
    assert [f["name"] for f in first["files"]] == ["00.txt", "01.txt"]
    [second] = run_jobs(job({"action": "list_files", "dataset": "pages", "limit": 2, "token": first["next_token"]}))
    assert [f["name"] for f in second["files"]] == ["02.txt", "03.txt"]


def test_presign_uploads_then_put_over_http(s3_env: Settings) -> None:
    [result] = run_jobs(
        job({"action": "presign_uploads", "dataset": "big", "files": [{"name": "huge.png"}], "expires_in": 600})
    )
    [upload] = result["uploads"]
    assert upload["key"] == "datasets/big/huge.png"
    assert upload["method"] == "PUT"
    assert upload["expires_in"] == 600
    assert upload["headers"] == {"Content-Type": "image/png"}
    assert "X-Amz-Expires=600" in upload["url"]
    payload = os.urandom(2048)
    request = urllib.request.Request(upload["url"], data=payload, method="PUT", headers=upload["headers"])  # noqa: S310
    with urllib.request.urlopen(request) as response:  # noqa: S310 - loopback moto
        assert response.status == 200
    [listed] = run_jobs(job({"action": "list_files", "dataset": "big"}))
    assert listed["files"][0]["size"] == 2048


def test_presign_refuses_bad_names(s3_env: Settings) -> None:
    [result] = run_jobs(job({"action": "presign_uploads", "files": [{"name": "a/b"}, {"name": "x"}, {"name": "x"}]}))
    assert result["error"] == (
        "invalid input: input.files[0].name: path separators are not allowed; input.files[2].name: duplicate"
    )


def test_health_reports_without_secrets(s3_env: Settings) -> None:
    [result] = run_jobs(job({"action": "health"}))
    assert result["status"] == "ok"
    assert result["storage"]["backend"] == "s3"
    assert result["storage"]["reachable"] is True
    assert result["storage"]["circuit_breaker"]["state"] == "closed"
    assert "gpu_present" in result["gpu"]
    assert result["packages"]["runpod"] == "1.12.0"
    assert TEST_SECRET not in json.dumps(result)


def test_health_is_degraded_when_storage_is_down(s3_env: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.faultproxy import free_port

    monkeypatch.setenv("S3_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("S3_MAX_ATTEMPTS", "1")
    [result] = run_jobs(job({"action": "health"}))
    assert result["status"] == "degraded"
    assert result["storage"]["reachable"] is False
    assert "storage unavailable" in result["storage"]["error"]


# --- output policy --------------------------------------------------------------------


def _store(settings: Settings, objects: dict[str, bytes]) -> None:
    async def put(storage: Any) -> None:
        for key, data in objects.items():
            await storage.put_bytes(key, data, content_type="application/octet-stream")

    run_with_storage(settings, put)


def _fetch(url: str) -> bytes:
    if url.startswith("file://"):
        return Path(urllib.request.url2pathname(url.removeprefix("file://"))).read_bytes()
    with urllib.request.urlopen(url) as response:  # noqa: S310 - loopback moto
        return response.read()


def test_get_file_inline_under_5mb_redirect_over(backend: Settings) -> None:
    small, large = os.urandom(4 * 1024 * 1024), os.urandom(6 * 1024 * 1024)
    _store(backend, {"outputs/x/small.bin": small, "outputs/x/large.bin": large})
    inline, redirect = run_jobs(
        job({"action": "get_file", "key": "outputs/x/small.bin"}, "a"),
        job({"action": "get_file", "key": "outputs/x/large.bin"}, "b"),
    )
    assert inline["file"]["type"] == "base64"
    assert base64.b64decode(inline["file"]["data"]) == small
    assert redirect["file"]["type"] == "redirect"
    assert redirect["file"]["size"] == len(large)
    assert redirect["file"]["expires_in"] == 3600
    assert _fetch(redirect["file"]["url"]) == large
    if backend.backend == "local":
        assert redirect["file"]["url"].startswith("file://")


@pytest.mark.parametrize("budget", [9 * 1024 * 1024, 10_000_000])
def test_response_budget_sends_the_largest_files_to_storage(s3_env: Settings, budget: int) -> None:
    """Three 3 MB files are 12 MB of base64: the largest go to outputs/<job id>/ until it fits."""
    from services.actions.results import GenerateResult
    from services.output.files import OutputFile, OutputPolicy, response_size
    from services.storage import Storage

    settings = s3_env.model_copy(update={"response_max_bytes": budget})
    payloads = [os.urandom(3_000_000 + i) for i in range(3)]

    async def render(storage: Storage) -> dict[str, Any]:
        result = GenerateResult(
            images=[OutputFile.from_bytes(f"img{i}.png", p) for i, p in enumerate(payloads)],
            seed=0,
            steps=25,
            guidance_scale=None,
        )
        return await OutputPolicy(storage, settings, "job-77").render(result)

    rendered = run_with_storage(settings, render)
    assert response_size(rendered) <= budget
    kinds = [i["type"] for i in rendered["images"]]
    assert kinds == ["base64", "base64", "redirect"]  # the largest (img2) moved
    redirect = rendered["images"][2]
    assert redirect["key"] == "outputs/job-77/img2.png"
    assert _fetch(redirect["url"]) == payloads[2]
    for item, payload in zip(rendered["images"][:2], payloads[:2], strict=True):
        assert base64.b64decode(item["data"]) == payload


def test_response_size_is_the_json_actually_sent() -> None:
    from services.output.files import response_size

    body = {"data": "x" * 1000}
    assert response_size(body) >= len(json.dumps(body))


# --- errors, workspaces, logging ------------------------------------------------------


def test_gpu_out_of_memory_asks_runpod_to_refresh_the_worker(
    local_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from services import actions

    async def oom(request: Any, ctx: Any) -> dict[str, Any]:
        raise GpuOutOfMemory("CUDA out of memory while generating 8 images at 2048x2048; lower num_images")

    use_settings_env(monkeypatch, local_settings)
    monkeypatch.setitem(actions.ACTIONS, "health", oom)
    [result] = run_jobs(job({"action": "health"}))
    assert result == {
        "error": "CUDA out of memory while generating 8 images at 2048x2048; lower num_images",
        "refresh_worker": True,
    }


def test_unexpected_bug_is_an_error_string_not_a_traceback(
    local_settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from services import actions

    async def bug(request: Any, ctx: Any) -> dict[str, Any]:
        raise KeyError("surprise")

    use_settings_env(monkeypatch, local_settings)
    monkeypatch.setitem(actions.ACTIONS, "health", bug)
    [result] = run_jobs(job({"action": "health"}))
    assert result == {"error": "internal error while running health: KeyError: 'surprise'"}
    assert any(r.levelno == logging.ERROR and r.exc_info for r in caplog.records)


def test_workspace_is_removed_and_failed_cleanup_is_logged(
    local_settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from services.job import context

    work = tmp_path / "work"
    use_settings_env(monkeypatch, local_settings)
    monkeypatch.setenv("WORK_DIR", str(work))
    run_jobs(job({"action": "health"}))
    assert list(work.iterdir()) == []

    def refuse(path: Path) -> None:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(context.shutil, "rmtree", refuse)
    with caplog.at_level(logging.WARNING):
        run_jobs(job({"action": "health"}, "job-cleanup"))
    [leftover] = list(work.iterdir())
    assert leftover.name.startswith("job-job-cleanup-")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(str(leftover) in m and "Permission denied" in m for m in warnings)


def test_logs_never_show_secrets_signatures_or_blobs(s3_env: Settings, caplog: pytest.LogCaptureFixture) -> None:
    from services.job.logs import setup_logging

    setup_logging("DEBUG", s3_env.secret_values())
    big = os.urandom(6 * 1024 * 1024)
    _store(s3_env, {"outputs/l/big.bin": big})
    with caplog.at_level(logging.DEBUG):
        [result] = run_jobs(job({"action": "get_file", "key": "outputs/l/big.bin"}))
        logging.getLogger("test").info("result %s, input %s", result, b64(os.urandom(600)))
        logging.getLogger("test").warning("secret is %s", TEST_SECRET)
    url = result["file"]["url"]
    signature = url.split("X-Amz-Signature=")[1].split("&")[0]
    text = caplog.text
    assert signature not in text
    assert TEST_SECRET not in text
    assert "X-Amz-Signature=REDACTED" in text
    assert "base64 characters>" in text
    assert "secret is REDACTED" in text


def test_redactor_rules() -> None:
    from services.job.logs import Redactor

    redact = Redactor(["my-secret-value"])
    line = (
        "GET https://b.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIA%2F20261128"
        "&X-Amz-Security-Token=tok&X-Amz-Signature=abc123 with my-secret-value and " + "A" * 300
    )
    out = redact(line)
    assert "AKIA" not in out
    assert "tok&" not in out
    assert "abc123" not in out
    assert "my-secret-value" not in out
    assert "A" * 257 not in out
    assert "X-Amz-Algorithm=AWS4-HMAC-SHA256" in out
    assert redact("short base64 aGVsbG8= stays") == "short base64 aGVsbG8= stays"


def test_short_configured_values_are_not_treated_as_secrets() -> None:
    from services.job.logs import Redactor

    redact = Redactor(["testing", "minio-secret-1"])
    assert redact("Local testing complete") == "Local testing complete"
    assert redact("key minio-secret-1 leaked") == "key REDACTED leaked"


def test_sha256_in_report_matches_stored_bytes(s3_env: Settings) -> None:
    data = os.urandom(1000)
    [result] = run_jobs(
        job({"action": "upload_training_files", "dataset": "h", "files": [{"name": "f", "data": b64(data)}]})
    )
    assert result["uploaded"][0]["sha256"] == hashlib.sha256(data).hexdigest()


def test_gpu_jobs_are_serialized_while_storage_jobs_keep_running(
    local_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two generate jobs never overlap on the GPU; a storage job finishes while they wait."""
    import threading
    import time as clock

    import services.gpu.generate.render as gpu_generate
    from services.gpu.types import GenerateResult, ImageFile

    use_settings_env(monkeypatch, local_settings)
    events: list[str] = []
    running = 0
    overlap = []
    guard = threading.Lock()

    def fake_generate(
        params: Any, lora_path: Any, settings: Any, progress: Any = None, stop: Any = None
    ) -> GenerateResult:
        nonlocal running
        with guard:
            running += 1
            overlap.append(running)
            events.append(f"start {params.seed}")
        clock.sleep(0.3)  # blocking, like a real GPU call in its worker thread
        with guard:
            running -= 1
            events.append(f"end {params.seed}")
        return GenerateResult(images=[ImageFile(name="image-0.png", mime="image/png", data=b"png")], seed=params.seed)

    monkeypatch.setattr(gpu_generate, "generate_images", fake_generate)

    async def main() -> list[dict[str, Any]]:
        from rp_handler import handler
        from services.storage import close_storages

        async def storage_job() -> dict[str, Any]:
            result = await handler(job({"action": "list_files", "prefix": "datasets/"}, "storage"))
            events.append("storage done")
            return result

        try:
            return list(
                await asyncio.gather(
                    handler(job({"action": "generate", "prompt": "a", "seed": 1}, "g1")),
                    handler(job({"action": "generate", "prompt": "b", "seed": 2}, "g2")),
                    storage_job(),
                )
            )
        finally:
            await close_storages()

    import asyncio

    first, second, listed = asyncio.run(main())
    assert first["seed"] == 1 and second["seed"] == 2
    assert "error" not in listed
    assert max(overlap) == 1  # one GPU job at a time
    assert events.index("storage done") < events.index("end 1")  # the loop was never blocked


# --- job control: setup failures, deadline, stop signal, progress, result size ---------------


def test_setup_failures_are_error_strings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for name in ("STORAGE_DIR", "WORK_DIR"):
        monkeypatch.setenv("STORAGE_DIR", str(tmp_path / "storage"))
        monkeypatch.delenv("WORK_DIR", raising=False)
        monkeypatch.setenv(name, str(blocker / "below"))
        from config.settings import load_settings

        load_settings.cache_clear()
        [result] = run_jobs(job({"action": "list_files", "prefix": "datasets/"}))
        assert set(result) == {"error"}, result
        assert result["error"].startswith("job setup failed: "), result
        assert "Not a directory" in result["error"]
        assert "Traceback" not in result["error"]


def test_deadline_names_the_step_that_ran_out_of_time(
    local_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    use_settings_env(monkeypatch, local_settings)
    monkeypatch.setenv("JOB_TIMEOUT", "0.5")
    monkeypatch.setenv("ALLOW_PRIVATE_URLS", "true")
    from config.settings import load_settings

    load_settings.cache_clear()
    with socket.socket() as silent:  # accepts connections (kernel backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = f"http://127.0.0.1:{silent.getsockname()[1]}/a.png"
        files = [{"name": "a.png", "url": url}]
        [result] = run_jobs(job({"action": "upload_training_files", "dataset": "slow", "files": files}))
    assert result == {"error": "job timed out after 0.5 s while running upload_training_files"}


def _stoppable_runner(stop: Any, total: int, started: Any) -> str:
    import threading

    from services.job.stop import StopSignal

    assert isinstance(stop, StopSignal)
    pause = threading.Event()
    for step in range(total):
        started.set()
        stop.check(f"generate at step {step} of {total}")
        pause.wait(0.01)
    return "finished"


def _context(settings: Settings, tmp_path: Path) -> Any:
    from services.job.context import JobContext
    from services.storage import LocalStorageService

    return JobContext(
        job={"id": "t"}, job_id="t", settings=settings, storage=LocalStorageService(settings), workspace=tmp_path
    )


def test_cancel_stops_the_worker_thread_before_the_lock_is_released(local_settings: Settings, tmp_path: Path) -> None:
    import threading

    from services.job.context import gpu_lock

    started = threading.Event()
    ctx = _context(local_settings, tmp_path)

    async def scenario() -> tuple[bool, bool]:
        async def gpu_job() -> str:
            async with gpu_lock():
                return await ctx.in_thread("generating", _stoppable_runner, ctx.stop, 100_000, started)

        task = asyncio.ensure_future(gpu_job())
        await asyncio.to_thread(started.wait, 30)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return gpu_lock().locked(), task.cancelled()

    import asyncio

    locked, cancelled = asyncio.run(scenario())
    assert cancelled and not locked
    assert ctx.stop.reason == "cancelled"
    assert ctx.stopped is not None and str(ctx.stopped).startswith("generate at step ")
    assert threading.active_count() >= 1


def test_deadline_in_the_gpu_thread_names_the_step(local_settings: Settings, tmp_path: Path) -> None:
    import asyncio
    import threading

    from rp_handler import _run

    started = threading.Event()
    ctx = _context(local_settings.model_copy(update={"job_timeout": 0.3}), tmp_path)

    async def slow(request: Any, context: Any) -> Any:
        return await context.in_thread("generating", _stoppable_runner, context.stop, 100_000, started)

    class Request:
        action = "generate"

    from services import actions

    original = actions.ACTIONS["generate"]
    actions.ACTIONS["generate"] = slow
    try:
        result = asyncio.run(_run(Request(), ctx))
    finally:
        actions.ACTIONS["generate"] = original
    assert result["error"].startswith("job timed out after 0.3 s in generate at step ")
    assert result["error"].endswith(" of 100000")


def test_resumable_stop_is_prefixed_for_the_client() -> None:
    from rp_handler import _stopped_message
    from services.errors import JobStopped

    assert _stopped_message(JobStopped("train_lora at step 3 of 9: stopped (shutdown)", reason="shutdown")) == (
        "train_lora at step 3 of 9: stopped (shutdown)"
    )
    resumable = JobStopped("train_lora at step 3 of 9: stopped (shutdown)", reason="shutdown", resumable=True)
    assert _stopped_message(resumable).startswith("[resumable] train_lora at step 3")


def test_signal_sets_the_stop_of_every_running_job(local_settings: Settings) -> None:
    import asyncio

    from services.job.context import job_context, stop_running_jobs

    async def scenario() -> list[str]:
        async with job_context({"id": "a"}, local_settings) as a, job_context({"id": "b"}, local_settings) as b:
            assert stop_running_jobs("shutdown") == 2
            return [a.stop.reason, b.stop.reason]

    assert asyncio.run(scenario()) == ["shutdown", "shutdown"]


def test_progress_is_throttled_but_the_final_update_always_goes_out(
    local_settings: Settings, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ctx = _context(local_settings, tmp_path)
    with caplog.at_level(logging.INFO, logger="services.job.context"):
        for step in range(50):
            ctx.progress({"step": step, "total_steps": 50}, final=step == 49)
    lines = [r.getMessage() for r in caplog.records if "progress" in r.getMessage()]
    assert lines[0].endswith("{'step': 0, 'total_steps': 50}")
    assert lines[-1].endswith("{'step': 49, 'total_steps': 50}")
    assert len(lines) < 50


def test_delete_of_a_40k_object_dataset_stays_under_the_response_limit(
    local_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = local_settings.model_copy(update={"response_max_bytes": 1024 * 1024})  # 40k keys: 2.4 MB
    monkeypatch.setenv("RESPONSE_MAX_BYTES", str(settings.response_max_bytes))
    use_settings_env(monkeypatch, settings)
    root = local_settings.storage_dir / "datasets" / "big"
    root.mkdir(parents=True)
    for i in range(40_000):
        (root / f"image-with-a-long-descriptive-name-{i:06d}.png").write_bytes(b"x")
    [result] = run_jobs(job({"action": "delete_files", "dataset": "big"}))
    assert "error" not in result
    assert result["truncated"] is True
    assert result["counts"] == {"deleted": 40_000, "missing": 0, "failed": 0}
    assert 0 < len(result["deleted"]) < 40_000
    assert len(json.dumps(result)) < settings.response_max_bytes
    stored = local_settings.storage_dir / result["result_file"]["key"]
    assert len(json.loads(stored.read_bytes())["deleted"]) == 40_000
    assert not root.exists()  # the emptied folder went too (local backend, like S3)
