"""Warm start: load ``WARM_MODEL`` into the pipeline cache at worker start, before the first job.

Opt-in (unset: nothing is loaded and torch is not imported, so a storage-only worker starts as
light as ever). The model is loaded on the worker's device in the dtype that both ``generate``
and ``train_lora`` (precision auto) use, so the first GPU job finds it cached. A warm-up that
fails stops the worker (exit 1) with one line saying why: a worker that was asked to be warm and
cannot load its model would fail every GPU job, and RunPod shows a worker that exits at once.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from services.errors import WorkerError

if TYPE_CHECKING:
    from config.settings import Settings

log = logging.getLogger(__name__)

WARM_FAILED_EXIT = 1


def warm_up(settings: Settings) -> float:
    """Load ``settings.warm_model``; returns the seconds it took. Raises :class:`WorkerError`."""
    from services.gpu import models
    from services.gpu.guard import gpu_errors

    assert settings.warm_model
    started = time.perf_counter()
    with gpu_errors("warm-up"):
        device = models.runtime_device()
        models.load_pipeline(settings.warm_model, settings, models.inference_dtype(device), device)
    seconds = time.perf_counter() - started
    log.info("warm: %s loaded on %s in %.1f s, before the first job", settings.warm_model, device, seconds)
    return seconds


def warm_or_exit(settings: Settings) -> None:
    """:func:`warm_up`, or a one-line error and exit 1."""
    try:
        warm_up(settings)
    except WorkerError as exc:
        log.error(  # noqa: TRY400 (one line: the message says why; no traceback)
            "WARM_MODEL=%s could not be loaded: %s; the worker exits (unset WARM_MODEL to start cold)",
            settings.warm_model,
            exc,
        )
        raise SystemExit(WARM_FAILED_EXIT) from None
