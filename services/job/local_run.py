"""Local test runs (``--test_input`` and ``test_input.json``): the result as JSON, outputs as files.

The SDK logs a local result as a Python repr through its logger, whose lines the redaction
filter rewrites (presigned URLs lose their signatures). Here stdout carries the result alone,
as JSON (``python rp_handler.py --test_input ... | jq`` works): the SDK's banner and log lines
go to stderr. Every base64 output is saved under ``./outputs/<job id>/`` (its ``data``
replaced by the ``file`` path in what is printed); a job without an ``id`` gets a fresh one
(``local-<time>-<random>``, printed on stderr), so runs never overwrite each other's files.
The storage client is closed, and the process exits 0, or 1 when the job failed. A
``--test_input`` that is not JSON stops with one line on stderr and exit status 2.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TextIO

from services.job.context import safe_job_id
from services.storage.keys import file_name_problem

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
LOCAL_OUTPUTS = Path("outputs")
SDK_DEFAULT_ID = "local_test"  # the id the SDK gives a local job that has none
BAD_TEST_INPUT_EXIT = 2


def is_local_test_run(argv: list[str]) -> bool:
    """Whether the SDK will run one local job and exit (its own rule in ``runpod.serverless``)."""
    if "--rp_serve_api" in argv or os.environ.get("RUNPOD_REALTIME_PORT"):
        return False
    return any(a == "--test_input" or a.startswith("--test_input=") for a in argv) or (
        os.environ.get("RUNPOD_WEBHOOK_GET_JOB") is None
    )


def test_input_problem(argv: list[str]) -> str | None:
    """Why ``--test_input``'s value is not a JSON object, in one line; ``None`` when it is (or absent)."""
    for index, arg in enumerate(argv):
        if arg == "--test_input" and index + 1 < len(argv):
            text = argv[index + 1]
        elif arg.startswith("--test_input="):
            text = arg.removeprefix("--test_input=")
        else:
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            return f"--test_input is not valid JSON: {exc}"
        if not isinstance(value, dict):
            return '--test_input must be a JSON object such as \'{"input": {"action": "health"}}\''
    return None


def result_stream() -> TextIO:
    """Send everything else printed on stdout (the SDK's banner and log lines) to stderr;
    return the real stdout, which then carries the result JSON alone."""
    stdout = sys.stdout
    sys.stdout = sys.stderr
    return stdout


def local_job_id(job: dict[str, Any]) -> str:
    """The job's own id, or a fresh ``local-<time>-<random>`` for a job without one."""
    given = str(job.get("id") or SDK_DEFAULT_ID)
    if given != SDK_DEFAULT_ID:
        return safe_job_id(given)
    return f"local-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


def save_outputs(value: Any, folder: Path) -> tuple[Any, list[Path]]:
    """``value`` with each base64 output's ``data`` saved under ``folder`` and replaced by its ``file`` path."""
    saved: list[Path] = []

    def walk(item: Any) -> Any:
        if isinstance(item, dict):
            if item.get("type") == "base64" and isinstance(item.get("data"), str) and isinstance(item.get("name"), str):
                name = item["name"] if file_name_problem(item["name"]) is None else f"output-{len(saved)}"
                folder.mkdir(parents=True, exist_ok=True)
                path = folder / name
                path.write_bytes(base64.b64decode(item["data"]))
                saved.append(path)
                return {k: v for k, v in item.items() if k != "data"} | {"file": str(path)}
            return {k: walk(v) for k, v in item.items()}
        if isinstance(item, list):
            return [walk(v) for v in item]
        return item

    return walk(value), saved


def local_handler(handler: Handler, out: TextIO | None = None) -> Handler:
    """``handler`` for a local test run: prints the JSON result on ``out`` (default stdout) and
    nothing else there, saves outputs, closes storage, exits."""

    async def run(job: dict[str, Any]) -> dict[str, Any]:
        from services.storage import close_storages

        job_id = local_job_id(job)
        try:
            result = await handler({**job, "id": job_id})
        finally:
            await close_storages()
        printable, saved = save_outputs(result, LOCAL_OUTPUTS / job_id)
        print(json.dumps(printable, indent=2, ensure_ascii=False), file=out or sys.stdout, flush=True)
        for path in saved:
            print(f"job {job_id}: saved {path}", file=sys.stderr, flush=True)
        raise SystemExit(1 if "error" in result else 0)

    return run
