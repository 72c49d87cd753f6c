"""RunPod serverless entrypoint: validate the job, dispatch it, shape the response.

    python rp_handler.py --test_input '{"input": {"action": "health"}}'
    python rp_handler.py                      # runs test_input.json beside this file
    python rp_handler.py --rp_serve_api       # local HTTP API on localhost:8000

Every job returns a dict; a failure is RunPod's ``{"error": "<string>"}`` plus any partial
result, never a traceback. Nothing heavy is imported here: torch and diffusers load only
when a GPU action runs.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from config.settings import ConfigError, Settings, load_settings
from services.errors import PartialFailure, WorkerError
from services.logs import redact, setup_logging

log = logging.getLogger("rp_handler")


def _error(message: str, **extra: Any) -> dict[str, Any]:
    return {"error": redact(message), **extra}


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job ``{"id": ..., "input": {"action": ..., ...}}`` and return its output."""
    from services.actions import dispatch, parse_job_input
    from services.context import job_context
    from services.outputs import OutputPolicy

    try:
        settings = load_settings()
    except ConfigError as exc:
        return _error(str(exc.code))
    if not isinstance(job, dict):
        return _error("invalid job: expected an object with an 'input' field")
    try:
        request = parse_job_input(job.get("input"), settings)
    except WorkerError as exc:
        return _error(str(exc))
    action = request.action

    async with job_context(job, settings) as ctx:
        policy = OutputPolicy(ctx.storage, settings, ctx.key_id)
        try:
            result = await dispatch(request, ctx)
            return await policy.render(result)
        except PartialFailure as exc:
            return _error(str(exc), **await policy.render(exc.result))
        except WorkerError as exc:
            log.warning("job %s (%s) failed: %s", ctx.key_id, action, exc)
            if exc.refresh_worker:
                return _error(str(exc), refresh_worker=True)
            return _error(str(exc))
        except Exception as exc:
            # A bug, not a user error: keep the worker alive, log the traceback, tell the caller.
            log.exception("job %s (%s) failed unexpectedly", ctx.key_id, action)
            return _error(f"internal error while running {action}: {type(exc).__name__}: {exc}")


def concurrency_modifier(current: int) -> int:
    """Jobs this worker takes at once (``MAX_CONCURRENCY``); GPU jobs still run one at a time."""
    del current
    return load_settings().max_concurrency


def start(settings: Settings) -> None:
    """Hand the handler to the RunPod SDK (local test modes included)."""
    import runpod

    setup_logging(settings.log_level, settings.secret_values())  # again: runpod's logger now exists
    runpod.serverless.start({"handler": handler, "concurrency_modifier": concurrency_modifier})


if __name__ == "__main__":
    # The SDK's own logger defaults to DEBUG, which prints job inputs: set it before import.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", os.environ.get("LOG_LEVEL", "INFO").upper().replace("WARNING", "WARN"))
    worker_settings = load_settings()  # a bad setting stops here with a message naming it
    setup_logging(worker_settings.log_level, worker_settings.secret_values())
    start(worker_settings)
