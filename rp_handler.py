"""RunPod serverless entrypoint: validate the job, dispatch it, shape the response.

    python rp_handler.py --test_input '{"input": {"action": "health"}}'
    python rp_handler.py                      # runs test_input.json beside this file
    python rp_handler.py --rp_serve_api       # local HTTP API on localhost:8000

Every job returns a dict; a failure, whatever its stage (settings, storage, workspace, the
action, the deadline), is RunPod's ``{"error": "<string>"}``, never a traceback. Nothing
heavy is imported here: torch and diffusers load only when a GPU action runs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from typing import Any

from config.settings import ConfigError, Settings, load_settings
from services.errors import JobStopped, WorkerError
from services.job.logs import redact, setup_logging

log = logging.getLogger("rp_handler")

RESUMABLE_PREFIX = "[resumable] "


def _error(message: str, **extra: Any) -> dict[str, Any]:
    return {"error": redact(message), **extra}


def _stopped_message(exc: JobStopped) -> str:
    return (RESUMABLE_PREFIX if exc.resumable else "") + str(exc)


async def handler(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job ``{"id": ..., "input": {"action": ..., ...}}`` and return its output."""
    from services.actions import parse_job_input
    from services.job.context import job_context

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
    try:
        async with job_context(job, settings) as ctx:
            return await _run(request, ctx)
    except WorkerError as exc:  # storage could not be opened
        log.warning("job %s (%s) could not start: %s", job.get("id"), request.action, exc)
        return _error(f"job setup failed: {exc}")
    except OSError as exc:  # storage or work directory not creatable or writable
        log.warning("job %s (%s) could not start: %s", job.get("id"), request.action, exc)
        return _error(f"job setup failed: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "))
    except Exception as exc:
        log.exception("job %s (%s) could not start", job.get("id"), request.action)
        return _error(f"job setup failed: {type(exc).__name__}: {exc}")


async def _run(request: Any, ctx: Any) -> dict[str, Any]:
    """Dispatch under the job deadline and turn every failure into an error string."""
    from services.actions import dispatch
    from services.output.files import OutputPolicy

    action = request.action
    settings = ctx.settings
    policy = OutputPolicy(ctx.storage, settings, ctx.key_id)
    ctx.stage = f"running {action}"
    timeout = asyncio.timeout(settings.job_timeout or None)
    try:
        async with timeout:
            ctx.deadline = timeout.when()
            result = await dispatch(request, ctx)
        return await policy.render(result)
    except TimeoutError:
        if not timeout.expired():
            raise
        where = f"while {ctx.stage}"
        if ctx.stopped is not None:
            where = "in " + str(ctx.stopped).removesuffix(f": stopped ({ctx.stopped.reason})")
        message = f"job timed out after {settings.job_timeout:g} s {where}"
        log.warning("job %s (%s): %s", ctx.key_id, action, message)
        resumable = ctx.stopped is not None and ctx.stopped.resumable
        return _error((RESUMABLE_PREFIX if resumable else "") + message)
    except JobStopped as exc:
        log.warning("job %s (%s) stopped: %s", ctx.key_id, action, exc)
        return _error(_stopped_message(exc))
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

    from services.job.local_run import is_local_test_run, local_handler, result_stream
    from services.job.shutdown import stop_jobs_on_signals

    setup_logging(settings.log_level, settings.secret_values())  # again: runpod's logger now exists
    local = is_local_test_run(sys.argv)
    entry = stop_jobs_on_signals(local_handler(handler, result_stream()) if local else handler, chain=not local)
    runpod.serverless.start({"handler": entry, "concurrency_modifier": concurrency_modifier})


def check_test_input(argv: list[str]) -> None:
    """Stop with one line on stderr (exit 2) when ``--test_input`` is not a JSON object."""
    from services.job.local_run import BAD_TEST_INPUT_EXIT, test_input_problem

    problem = test_input_problem(argv)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        raise SystemExit(BAD_TEST_INPUT_EXIT)


if __name__ == "__main__":
    check_test_input(sys.argv)
    # The SDK's own logger defaults to DEBUG, which prints job inputs: set it before import.
    os.environ.setdefault("RUNPOD_LOG_LEVEL", os.environ.get("LOG_LEVEL", "INFO").upper().replace("WARNING", "WARN"))
    worker_settings = load_settings()  # a bad setting stops here with a message naming it
    setup_logging(worker_settings.log_level, worker_settings.secret_values())
    if worker_settings.warm_model:  # opt-in: load the model before taking jobs (services/gpu/warm.py)
        from services.gpu.warm import warm_or_exit

        warm_or_exit(worker_settings)
    start(worker_settings)
