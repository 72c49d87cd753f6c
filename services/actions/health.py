"""``health``: backend, its breaker state (S3), storage reachability, GPU presence, versions. No secrets."""

from __future__ import annotations

import asyncio
import sys
import time
from importlib import metadata
from typing import Any

from services.actions.results import HealthResult
from services.actions.schemas import HealthInput
from services.errors import StorageError
from services.job.context import JobContext
from services.storage.keys import DATASET_ROOT

PACKAGES = ("runpod", "aiobotocore", "botocore", "pybreaker", "pydantic", "torch", "diffusers", "peft", "transformers")
PROBE_TIMEOUT = 5.0


def package_versions() -> dict[str, str | None]:
    """Installed versions, read from metadata (nothing heavy is imported)."""
    versions: dict[str, str | None] = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


async def _probe_storage(ctx: JobContext) -> dict[str, Any]:
    started = time.perf_counter()
    try:
        await asyncio.wait_for(ctx.storage.list_page(DATASET_ROOT + "/", page_size=1), PROBE_TIMEOUT)
    except (StorageError, TimeoutError) as exc:
        return {"reachable": False, "error": str(exc) or type(exc).__name__}
    return {"reachable": True, "latency_ms": round((time.perf_counter() - started) * 1000, 1)}


async def health(request: HealthInput, ctx: JobContext) -> HealthResult:
    from services.gpu.info import gpu_info

    storage: dict[str, Any] = {**ctx.storage.describe(), **await _probe_storage(ctx)}
    return HealthResult(
        status="ok" if storage["reachable"] else "degraded",
        storage=storage,
        gpu=gpu_info(),
        python=sys.version.split()[0],
        packages=package_versions(),
        limits={
            "inline_max_bytes": ctx.settings.inline_max_bytes,
            "response_max_bytes": ctx.settings.response_max_bytes,
            "max_concurrency": ctx.settings.max_concurrency,
            "upload_concurrency": ctx.settings.upload_concurrency,
        },
        model_id=ctx.settings.model_id,
    )
