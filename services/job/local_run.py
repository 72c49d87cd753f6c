"""Local test runs (``--test_input`` and ``test_input.json``): the result as JSON, outputs as files.

The SDK logs a local result as a Python repr through its logger, whose lines the redaction
filter rewrites (presigned URLs lose their signatures). Here the result is printed whole as
JSON on stdout, every base64 output is saved under ``./outputs/<job id>/`` (its ``data``
replaced by the ``file`` path in what is printed), the storage client is closed, and the
process exits 0, or 1 when the job failed.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from services.job.context import safe_job_id
from services.storage.keys import file_name_problem

Handler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]
LOCAL_OUTPUTS = Path("outputs")


def is_local_test_run(argv: list[str]) -> bool:
    """Whether the SDK will run one local job and exit (its own rule in ``runpod.serverless``)."""
    if "--rp_serve_api" in argv or os.environ.get("RUNPOD_REALTIME_PORT"):
        return False
    return any(a == "--test_input" or a.startswith("--test_input=") for a in argv) or (
        os.environ.get("RUNPOD_WEBHOOK_GET_JOB") is None
    )


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


def local_handler(handler: Handler) -> Handler:
    """``handler`` for a local test run: prints the JSON result, saves outputs, closes storage, exits."""

    async def run(job: dict[str, Any]) -> dict[str, Any]:
        from services.storage import close_storages

        try:
            result = await handler(job)
        finally:
            await close_storages()
        job_id = safe_job_id(str(job.get("id") or "local_test"))
        printable, saved = save_outputs(result, LOCAL_OUTPUTS / job_id)
        print(json.dumps(printable, indent=2, ensure_ascii=False), flush=True)
        for path in saved:
            print(f"saved {path}", flush=True)
        raise SystemExit(1 if "error" in result else 0)

    return run
