"""``caption_dataset``, and ``auto_caption`` / the captions record of ``train_lora``.

Storage in and out around the captioning runner (:mod:`services.gpu.caption.run`), which
imports torch inside its functions and runs in a worker thread under the GPU lock. Each batch's
captions are stored as they come (``datasets/<dataset>/<stem>.txt``), so a stopped job keeps
what it did and the same request again carries on (captioned images are skipped).
A dataset whose images all have captions never loads the model (nor torch).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from services.actions.caption_results import (
    INLINE_CAPTIONS,
    CaptionDatasetResult,
    CaptionEntry,
    CaptionProblem,
    TrainingCaptions,
)
from services.durable.manifest import dataset_digest
from services.errors import StorageError
from services.gpu.caption.options import CaptionDatasetInput, CaptionOptions, auto_caption_options
from services.gpu.caption.run import Captioned, CaptionJob, CaptionRun
from services.ingest.datasets import plan_stored_dataset
from services.ingest.images import CAPTION_EXTENSION, IMAGE_EXTENSIONS
from services.job.context import JobContext, gpu_lock
from services.output.files import OutputFile
from services.storage.hashing import file_sha256
from services.storage.keys import caption_key, dataset_prefix, lora_captions_key

if TYPE_CHECKING:
    from config.settings import Settings
    from services.gpu.params import TrainLoraInput

log = logging.getLogger(__name__)


def caption_job(options: CaptionOptions, trigger_word: str | None, settings: Settings) -> CaptionJob:
    return CaptionJob(
        model=settings.caption_model,
        detail=options.detail,
        trigger_word=trigger_word,
        trigger_placement=options.trigger_placement,
        prefix=options.prefix,
        suffix=options.suffix,
        max_chars=min(options.max_length, settings.max_caption_chars),
        batch_size=options.batch_size or settings.caption_batch_size,
    )


async def run_captioner(
    ctx: JobContext, paths: list[Path], job: CaptionJob, on_batch: Callable[[list[Captioned]], None]
) -> CaptionRun:
    """The runner in a worker thread under the GPU lock (the model is released before it ends)."""
    from services.gpu.caption.run import caption_images

    ctx.stage = f"captioning {len(paths)} images"
    async with gpu_lock():
        return await ctx.in_thread(
            "captioning", caption_images, paths, job, ctx.settings, ctx.progress, ctx.stop, on_batch
        )


def _stem(name: str) -> str:
    return Path(name).stem


def _select(names: list[str], overwrite: bool) -> tuple[list[str], list[CaptionProblem]]:
    """Images to caption, and those left alone (captioned already, or sharing a caption file)."""
    captioned = {_stem(n) for n in names if n.lower().endswith(CAPTION_EXTENSION)}
    todo: list[str] = []
    skipped: list[CaptionProblem] = []
    owner: dict[str, str] = {}
    for name in sorted(n for n in names if Path(n).suffix.lower() in IMAGE_EXTENSIONS):
        stem = _stem(name)
        if stem in owner:
            skipped.append(CaptionProblem(image=name, reason=f"shares {stem}.txt with {owner[stem]}"))
        elif stem in captioned and not overwrite:
            skipped.append(CaptionProblem(image=name, reason=f"already captioned ({stem}.txt)"))
        else:
            todo.append(name)
        owner.setdefault(stem, name)
    return todo, skipped


async def caption_dataset(request: CaptionDatasetInput, ctx: JobContext) -> CaptionDatasetResult:
    """Caption the stored images of a dataset that have no caption (all with ``overwrite``)."""
    ctx.stage = "listing the dataset"
    plan = await plan_stored_dataset(ctx.storage, dataset_prefix(request.dataset), ctx.settings)
    objects = dict(plan)
    todo, skipped = _select(list(objects), request.overwrite)
    job = caption_job(request, request.trigger_word, ctx.settings)
    result = CaptionDatasetResult(dataset=request.dataset, model=job.model, captions=[], skipped=skipped)
    if not todo:
        return result
    folder = ctx.workspace / "images"
    folder.mkdir()
    ctx.stage = f"downloading {len(todo)} images"
    slots = asyncio.Semaphore(ctx.settings.upload_concurrency)

    async def fetch(name: str) -> None:
        async with slots:
            await ctx.storage.download_file(objects[name].key, folder / name)

    await asyncio.gather(*(fetch(name) for name in todo))
    store = _storer(ctx, request.dataset, False)
    run = await run_captioner(ctx, [folder / name for name in todo], job, store)
    entries = [_entry(c, request.dataset) for c in run.captions]
    result.captions = entries[:INLINE_CAPTIONS]
    if len(entries) > INLINE_CAPTIONS:
        data = json.dumps([e.model_dump() for e in entries], ensure_ascii=False, indent=1).encode()
        result.captions_file = OutputFile.from_bytes("captions.json", data, "application/json")
    result.failed = [CaptionProblem(image=name, reason=reason) for name, reason in sorted(run.failed.items())]
    result.partial = bool(run.failed)
    result.seconds = round(run.seconds, 3)
    busy = run.seconds - run.load_seconds
    result.images_per_second = round(len(todo) / busy, 3) if busy > 0 else None
    return result


def _entry(item: Captioned, dataset: str | None) -> CaptionEntry:
    key = caption_key(dataset, Path(item.name).name) if dataset else None
    return CaptionEntry(image=item.name, key=key, caption=item.caption)


def _storer(ctx: JobContext, dataset: str | None, local: bool) -> Callable[[list[Captioned]], None]:
    """``on_batch`` for the runner's thread: each caption beside its local image (``local``: the
    training folder) and, for a stored dataset, in storage, before the next batch starts."""
    loop = asyncio.get_running_loop()

    def store(batch: list[Captioned]) -> None:
        for item in batch:
            if local:
                item.path.with_suffix(CAPTION_EXTENSION).write_text(item.caption, encoding="utf-8")
            if dataset is not None:
                data = item.caption.encode()
                put = ctx.storage.put_bytes(caption_key(dataset, Path(item.name).name), data, content_type="text/plain")
                asyncio.run_coroutine_threadsafe(put, loop).result()

    return store


def _local_images(root: Path) -> list[str]:
    """Image paths under the training folder, relative, as the trainer finds them."""
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file()
        and p.suffix.lower() in IMAGE_EXTENSIONS
        and not any(part.startswith(".") or part == "__MACOSX" for part in p.relative_to(root).parts)
    )


async def auto_caption(request: TrainLoraInput, ctx: JobContext, root: Path) -> tuple[list[Captioned], dict[str, str]]:
    """``train_lora``'s ``auto_caption``: caption the fetched dataset's uncaptioned images
    (written beside them, and into storage for a stored dataset) before training loads its model."""
    options = auto_caption_options(request.auto_caption)
    if options is None:
        return [], {}
    names = _local_images(root)
    captioned = {n for n in names if (root / n).with_suffix(CAPTION_EXTENSION).is_file()}
    todo = [n for n in names if options.overwrite or n not in captioned]
    if not todo:
        return [], {}
    job = caption_job(options, request.trigger_word, ctx.settings)
    run = await run_captioner(ctx, [root / n for n in todo], job, _storer(ctx, request.dataset, True))
    done = [Captioned(c.path.relative_to(root).as_posix(), c.caption, c.path) for c in run.captions]
    return done, run.failed


async def record_captions(
    request: TrainLoraInput, ctx: JobContext, root: Path, generated: tuple[list[Captioned], dict[str, str]]
) -> TrainingCaptions:
    """Store ``loras/<output_name>/captions.json``: every image with the caption it trained on."""
    from services.gpu.train.dataset import scan_dataset

    settings = ctx.settings
    examples = await asyncio.to_thread(
        scan_dataset, root, request.caption, request.trigger_word, settings.max_image_pixels, settings.max_caption_chars
    )
    rows = [(e.path.relative_to(root).as_posix(), file_sha256(e.path), e.caption) for e in examples]
    digest = dataset_digest(rows)
    record = {"dataset_digest": digest, "captions": [{"image": r[0], "caption": r[2]} for r in rows]}
    key: str | None = lora_captions_key(request.output_name)
    data = json.dumps(record, ensure_ascii=False, indent=1).encode()
    try:
        await ctx.storage.put_bytes(lora_captions_key(request.output_name), data, content_type="application/json")
    except StorageError as exc:  # the LoRA is stored: the job succeeds without the record
        log.warning("job %s: captions record %s not stored: %s", ctx.key_id, key, exc)
        key = None
    done, failed = generated
    return TrainingCaptions(
        record=key,
        dataset_digest=digest,
        generated=[_entry(c, request.dataset) for c in done],
        failed=[CaptionProblem(image=name, reason=reason) for name, reason in sorted(failed.items())],
    )
