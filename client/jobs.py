"""Running one job: submit through ``/run``, poll its status until it ends, cancel on Ctrl-C.

:class:`JobRunner` is the part of :class:`client.api.WorkerClient` that runs jobs; every
other method goes through its :meth:`JobRunner.run`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any

from client.errors import ClientError, JobFailed, JobInterrupted, JobTimeout, TransportError
from client.schema import obj, optional_text
from client.transport import FINAL_STATES, Transport

log = logging.getLogger("client")

ProgressCallback = Callable[[Any], None]
POLL_FAILURES_TOLERATED = 3  # status polls that may fail in a row (a network blip) before giving up


def error_text(error: Any) -> str:
    """The worker's error as one line (the SDK sends a raised exception as JSON with a traceback)."""
    if isinstance(error, str) and error.startswith("{"):
        try:
            error = json.loads(error)
        except ValueError:
            return error
    if isinstance(error, dict):
        if "error_message" in error:
            kind = str(error.get("error_type", "")).removeprefix("<class '").removesuffix("'>")
            return f"{kind}: {error['error_message']}" if kind else str(error["error_message"])
        return json.dumps(error)
    return str(error)


def _state(value: Any, what: str) -> dict[str, Any]:
    """A job state: an object whose ``status``, when present, is a string."""
    state = obj(value, what)
    optional_text(state.get("status"), f"{what}.status")
    return state


class JobRunner:
    """Submits a job, waits for it and returns its output (the worker's errors raise)."""

    transport: Transport
    timeout: float
    poll_interval: float

    def run(
        self, job_input: dict[str, Any], *, timeout: float | None = None, on_progress: ProgressCallback | None = None
    ) -> Any:
        """Run one job and return its output; raises :class:`JobFailed` or :class:`JobTimeout`.

        ``on_progress`` receives each new progress update the worker posts while the job runs
        (RunPod shows them as the status's ``output``; the local server shows none). Ctrl-C
        while the job runs asks the endpoint to cancel it and raises :class:`JobInterrupted`.
        """
        limit = self.timeout if timeout is None else timeout
        action = str(job_input.get("action", "job"))
        deadline = time.monotonic() + limit
        state = _state(self.transport.submit(job_input), f"{action}: /run answer")
        job_id = state.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise TransportError(f"{action}: the endpoint accepted the job but sent no id: {str(state)[:200]}")
        log.debug("%s: job %s submitted", action, job_id)
        try:
            state = self._wait(job_id, action, state, deadline, limit, on_progress)
        except KeyboardInterrupt as exc:
            raise JobInterrupted(job_id, action, self._cancel(job_id, action)) from exc
        return self._finish(job_id, action, state)

    def _wait(
        self,
        job_id: str,
        action: str,
        state: dict[str, Any],
        deadline: float,
        limit: float,
        on_progress: ProgressCallback | None,
    ) -> dict[str, Any]:
        delay = 0.1
        last_progress: Any = None
        failures = 0
        while state.get("status") not in FINAL_STATES:
            progress = state.get("output")
            if on_progress and state.get("status") == "IN_PROGRESS" and progress not in (None, last_progress):
                last_progress = progress
                on_progress(progress)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._cancel(job_id, action)
                raise JobTimeout(f"{action}: job {job_id} did not finish within {limit:g} s", job_id=job_id)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, self.poll_interval)
            try:
                answer = self.transport.status(job_id, max(0.0, deadline - time.monotonic()))
                state = _state(answer, f"{action}: status of job {job_id}")
                failures = 0
            except TransportError as exc:
                failures += 1
                if failures > POLL_FAILURES_TOLERATED:
                    raise
                log.warning("%s: status of job %s failed (%s); retrying", action, job_id, exc)
        return state

    def _cancel(self, job_id: str, action: str) -> str:
        """Ask the endpoint to cancel ``job_id``; what happened, as a sentence."""
        try:
            self.transport.cancel(job_id)
        except ClientError as exc:
            log.warning("%s: could not cancel job %s: %s", action, job_id, exc)
            return f"could not cancel job {job_id}: {exc}"
        return f"cancelled job {job_id} on the endpoint"

    @staticmethod
    def _finish(job_id: str, action: str, state: dict[str, Any]) -> Any:
        status = state.get("status")
        if status == "COMPLETED":
            output = state.get("output")
            if output is None:
                raise JobFailed(
                    f"{action}: job {job_id} completed without output; RunPod drops a result it cannot "
                    "post (over 10 MB): lower RESPONSE_MAX_BYTES on the worker",
                    job_id=job_id,
                    status="COMPLETED",
                )
            if isinstance(output, dict) and output.get("error"):
                raise JobFailed(f"{action}: {error_text(output['error'])}", job_id=job_id, output=output)
            return output
        error = state.get("error") or f"job ended with status {status}"
        raise JobFailed(f"{action}: {error_text(error)}", job_id=job_id, status=str(status), output=state.get("output"))
