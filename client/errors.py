"""The client's exceptions: one base class, one subclass per way a call can fail."""

from __future__ import annotations

from typing import Any


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


class JobTimeout(ClientError):
    """The job did not finish within the client's timeout (it was cancelled where possible)."""

    def __init__(self, message: str, *, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class DownloadError(ClientError):
    """An output file could not be fetched, decoded or written."""


class UploadError(ClientError):
    """A file could not be sent straight to storage through its presigned URL."""
