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


def test_partial_upload_failure_keeps_the_report_next_to_the_error(backend: Settings) -> None:
    files = [
        {"name": "good.png", "data": b64(PNG_1X1)},
        {"name": "bad/name.png", "data": b64(b"x")},
        {"name": "worse.png", "data": "%%%"},
    ]
    [result] = run_jobs(job({"action": "upload_training_files", "dataset": "part", "files": files}))
    assert result["error"].startswith("2 of 3 files failed: input.files[1].name: path separators are not allowed")
    assert "input.files[2]: data is not valid base64" in result["error"]
    assert [u["name"] for u in result["uploaded"]] == ["good.png"]
    assert sorted(f["name"] for f in result["failed"]) == ["bad/name.png", "worse.png"]


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


def test_presign_refuses_bad_names(local_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    use_settings_env(monkeypatch, local_settings)
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
    from services.outputs import OutputFile, OutputPolicy, response_size
    from services.results import GenerateResult
    from services.storage import Storage

    settings = s3_env.model_copy(update={"response_max_bytes": budget})
    payloads = [os.urandom(3_000_000 + i) for i in range(3)]

    async def render(storage: Storage) -> dict[str, Any]:
        result = GenerateResult(
            images=[OutputFile.from_bytes(f"img{i}.png", p) for i, p in enumerate(payloads)], seed=0
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
    from services.outputs import response_size

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
    from services import context

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
    from services.logs import setup_logging

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
    from services.logs import Redactor

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
    from services.logs import Redactor

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

    import services.gpu.generate as gpu_generate
    from services.gpu.types import GenerateResult, ImageFile

    use_settings_env(monkeypatch, local_settings)
    events: list[str] = []
    running = 0
    overlap = []
    guard = threading.Lock()

    def fake_generate(params: Any, lora_path: Any, settings: Any) -> GenerateResult:
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
