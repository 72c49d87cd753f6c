"""Translate torch and diffusers failures into the worker's own errors at the GPU boundary."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from services.errors import GpuError, GpuOutOfMemory, ModelStateError, WorkerError

log = logging.getLogger(__name__)

_MAX_MESSAGE = 500

# What a failing torch/diffusers call raises, besides CUDA's own errors handled first.
_RUNTIME_ERRORS = (RuntimeError, ValueError, TypeError, KeyError, IndexError, AttributeError, OSError)


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."


@contextmanager
def gpu_errors(action: str) -> Iterator[None]:
    """Run a GPU action; out-of-memory becomes :class:`GpuOutOfMemory`, a CUDA error
    :class:`ModelStateError` (both refresh the worker), anything else :class:`GpuError`."""
    import torch

    accelerator_error = getattr(torch, "AcceleratorError", None) or torch.cuda.CudaError
    try:
        yield
    except WorkerError:
        raise
    except torch.cuda.OutOfMemoryError as exc:
        log.exception("%s: CUDA out of memory", action)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise GpuOutOfMemory(
            f"{action}: the GPU ran out of memory; use fewer or smaller images, a smaller batch_size "
            "or resolution, or gradient_checkpointing"
        ) from exc
    except accelerator_error as exc:
        log.exception("%s: CUDA error", action)
        raise ModelStateError(f"{action}: CUDA error, the worker will be replaced: {_short(exc)}") from exc
    except _RUNTIME_ERRORS as exc:
        log.exception("%s failed", action)
        raise GpuError(f"{action} failed: {type(exc).__name__}: {_short(exc)}") from exc
