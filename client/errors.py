"""The client's exceptions: one base class, one subclass per way a call can fail."""

from __future__ import annotations

from typing import Any

#: A worker error holding this marker stopped with a checkpoint saved: the same input resumes it.
RESUMABLE_MARKER = "[resumable]"


class ClientError(Exception):
    """Base class of every error the client raises."""


class TransportError(ClientError):
    """The endpoint could not be reached, or answered with an HTTP error."""


class JobFailed(ClientError):
    """The worker ran the job and reported an error (``{"error": ...}`` or status FAILED).

    ``output`` holds the partial result the worker sent next to the error, when any
    (RunPod keeps it; the local ``--rp_serve_api`` server drops it).
    """

    def __init__(self, message: str, *, job_id: str | None = None, status: str = "FAILED", output: Any = None) -> None:
        super().__init__(message)
        self.job_id = job_id
        self.status = status
        self.output = output

    @property
    def resumable(self) -> bool:
        """True when the worker saved a checkpoint and asks for the same input again."""
        return RESUMABLE_MARKER in str(self)


class JobInterrupted(KeyboardInterrupt):
    """Ctrl-C while a job ran. ``cancel`` says what became of the remote job.

    A :class:`KeyboardInterrupt`, so code that stops on Ctrl-C still does.
    """

    def __init__(self, job_id: str, action: str, cancel: str) -> None:
        super().__init__(f"{action}: interrupted; {cancel}")
        self.job_id = job_id
        self.action = action
        self.cancel = cancel


class JobTimeout(ClientError):
    """The job did not finish within the client's timeout (it was cancelled where possible)."""

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class DownloadError(ClientError):
    """An output file could not be fetched, decoded or written."""


class UploadError(ClientError):
    """A file could not be sent straight to storage through its presigned URL."""


class BadResponse(ClientError):
    """The endpoint or the worker answered with a response of the wrong shape or size."""
