"""The worker's own exceptions. Vendor errors are translated into these at the boundary.

The handler turns each into RunPod's ``{"error": "<string>"}``; ``refresh_worker`` asks
RunPod to replace the worker after the job (a broken CUDA context, say).
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error the worker reports to the caller."""

    refresh_worker: bool = False


class InputError(WorkerError):
    """The job input is invalid; the message names the field and what is allowed."""


class StorageError(WorkerError):
    """A storage operation failed for a reason other than the backend being unavailable."""


class ObjectNotFound(StorageError):
    """The key does not exist."""


class PreconditionFailed(StorageError):
    """A conditional write lost: the object exists (create) or is no longer the version named (replace)."""


class StorageUnavailable(StorageError):
    """The storage backend is unreachable or the circuit breaker is open."""


class StorageTimeout(StorageUnavailable):
    """A storage call got no answer within its whole deadline (``S3_OPERATION_TIMEOUT``)."""


class CircuitOpen(StorageUnavailable):
    """The circuit breaker refused the call without sending it."""


class GpuError(WorkerError):
    """Training or generation failed."""


class GpuOutOfMemory(GpuError):
    """CUDA ran out of memory; the worker is refreshed so the next job starts clean."""

    refresh_worker = True


class TrainingDiverged(GpuError):
    """The training loss or a LoRA weight stopped being finite; nothing of that state was stored."""


class ModelStateError(GpuError):
    """The model or CUDA state is broken; the worker is refreshed."""

    refresh_worker = True


class ResultNotJson(WorkerError):
    """A result holds a number strict JSON cannot carry (NaN, infinity); it is not returned."""


class JobStopped(WorkerError):
    """The job was stopped between steps: cancelled, the worker shutting down, or its deadline passed.

    ``resumable`` is true when a checkpoint was saved and the same input again resumes the work.
    """

    def __init__(self, message: str, *, reason: str, resumable: bool = False) -> None:
        super().__init__(message)
        self.reason = reason
        self.resumable = resumable


class OutputBusy(WorkerError):
    """Another job holds the lease on the output (``output_name``) this job would write."""


class CheckpointError(WorkerError):
    """A training checkpoint could not be saved, found or used."""


class CheckpointUploadFailed(CheckpointError):
    """Saving a checkpoint failed; the previous checkpoint (if any) is still the one referenced."""


class CheckpointCorrupt(CheckpointError):
    """A stored checkpoint is missing a file, has a partial one, or does not fit the model."""
