"""Caption a list of images in batches: progress after each batch, the stop signal checked
between batches, each batch's captions handed to ``on_batch`` (stored as they come, so a
stopped job keeps what it did), the model released from the GPU at the end whatever happens.

Synchronous; the caller runs it in a worker thread under the GPU lock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.errors import InputError
from services.gpu.caption.text import CaptionRefused, clean_caption, compose

if TYPE_CHECKING:
    from PIL import Image

    from config.settings import Settings
    from services.gpu.caption.model import Captioner
    from services.job.stop import StopSignal

log = logging.getLogger(__name__)

Progress = Callable[..., None]


@dataclass(frozen=True)
class CaptionJob:
    """What to caption and how (resolved from the job's options and the settings)."""

    model: str
    detail: str = "short"
    trigger_word: str | None = None
    trigger_placement: str = "start"
    prefix: str = ""
    suffix: str = ""
    max_chars: int = 300
    batch_size: int = 8


@dataclass(frozen=True)
class Captioned:
    """One image's generated caption and where the image lies."""

    name: str  # the image's file name
    caption: str
    path: Path  # the image's local file


@dataclass
class CaptionRun:
    """What a run produced: the captions, the images refused (name -> reason), timings."""

    captions: list[Captioned] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    load_seconds: float = 0.0


def finish_caption(raw: str, job: CaptionJob) -> str:
    """The stored caption of one model output: cleaned, then trigger/prefix/suffix placed."""
    budget = job.max_chars - sum(len(p) + 2 for p in (job.prefix, job.suffix, job.trigger_word or "") if p)
    body = clean_caption(raw, max(budget, 8))
    return compose(body, job.trigger_word, job.trigger_placement, job.prefix, job.suffix, job.max_chars)


def _open(path: Path, max_pixels: int) -> Image.Image:
    from services.gpu.train.dataset import load_rgb
    from services.ingest.images import check_image_file

    check_image_file(path, max_pixels, label=path.name)
    return load_rgb(path)


def caption_batch(captioner: Captioner, paths: list[Path], job: CaptionJob, max_pixels: int) -> CaptionRun:
    """One batch: images that do not open and captions refused are failures naming the image."""
    result = CaptionRun()
    images, kept = [], []
    for path in paths:
        try:
            images.append(_open(path, max_pixels))
            kept.append(path)
        except InputError as exc:
            result.failed[path.name] = str(exc)
    raw = captioner.caption(images, job.detail) if images else []
    for path, text in zip(kept, raw, strict=True):
        try:
            result.captions.append(Captioned(path.name, finish_caption(text, job), path))
        except CaptionRefused as exc:
            log.warning("caption of %s refused: %s (model output %r)", path.name, exc, text[:200])
            result.failed[path.name] = f"caption refused: {exc}"
    return result


def caption_images(
    paths: list[Path],
    job: CaptionJob,
    settings: Settings,
    progress: Progress | None = None,
    stop: StopSignal | None = None,
    on_batch: Callable[[list[Captioned]], Any] | None = None,
) -> CaptionRun:
    """Caption ``paths`` with ``job.model`` (loaded here, released at the end)."""
    from services.gpu import models
    from services.gpu.caption.model import load_captioner
    from services.gpu.guard import gpu_errors

    total, run = len(paths), CaptionRun()
    started = time.perf_counter()
    with gpu_errors("caption"):
        device = models.runtime_device()
        captioner = load_captioner(job.model, settings, device, models.inference_dtype(device))
        run.load_seconds = time.perf_counter() - started
        try:
            for start in range(0, total, job.batch_size):
                if stop is not None:
                    stop.check(f"captioning after {start} of {total} images")
                batch = caption_batch(captioner, paths[start : start + job.batch_size], job, settings.max_image_pixels)
                if on_batch is not None and batch.captions:
                    on_batch(batch.captions)
                run.captions += batch.captions
                run.failed.update(batch.failed)
                _report(progress, start + len(paths[start : start + job.batch_size]), total, started + run.load_seconds)
        finally:
            captioner.release()
    run.seconds = time.perf_counter() - started
    return run


def _report(progress: Progress | None, done: int, total: int, since: float) -> None:
    if progress is None:
        return
    elapsed = time.perf_counter() - since
    rate = done / elapsed if elapsed > 0 else None
    update = {
        "stage": "captioning",
        "images_done": done,
        "total_images": total,
        "images_per_second": None if rate is None else round(rate, 3),
        "eta_seconds": None if not rate else round((total - done) / rate, 1),
    }
    progress(update, final=done >= total)
