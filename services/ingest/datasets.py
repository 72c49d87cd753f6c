"""The training dataset of a ``train_lora`` job, fetched into its workspace.

Either a zip from ``dataset_url`` (checked by :mod:`services.ingest.zipsafe`) or the objects stored
under ``datasets/<dataset>/``. A stored dataset may hold what other S3 tools wrote, so its
listing is checked before a single byte is downloaded:

* more than ``MAX_DATASET_FILES`` objects, or sizes summing past ``MAX_DATASET_BYTES``,
  refuse the job with a clear error (nothing is dropped silently);
* keys ending in ``/`` (folder markers of S3 consoles) are skipped;
* keys that are not a plain file name directly under the prefix (``x/y.png`` beside ``x``,
  ``//``, ``../``, control or format characters) are skipped with a warning naming them;
* a local path is built only from a name that passed :func:`services.storage.keys.file_name_problem`.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from config.settings import Settings
from services.errors import InputError
from services.storage.base import ObjectInfo, Storage
from services.storage.keys import dataset_prefix, file_name_problem

if TYPE_CHECKING:
    from services.gpu.params import TrainLoraInput
    from services.job.context import JobContext

log = logging.getLogger(__name__)
NAMED_IN_WARNINGS = 20  # skipped keys named in one warning line


async def fetch_dataset(request: TrainLoraInput, ctx: JobContext) -> Path:
    """The job's dataset as a folder in its workspace (from ``dataset_url`` or storage)."""
    ctx.stage = "downloading the dataset"
    target = ctx.workspace / "dataset"
    target.mkdir()
    if request.dataset_url:
        from services.ingest.fetch import download
        from services.ingest.zipsafe import extract_zip

        archive = await download(request.dataset_url, ctx.workspace / "dataset.zip", ctx.settings, expect="zip")
        await asyncio.to_thread(extract_zip, archive.path, target, ctx.settings)
        return target
    return await fetch_stored_dataset(ctx.storage, request.dataset or "", target, ctx.settings)


async def plan_stored_dataset(storage: Storage, prefix: str, settings: Settings) -> list[tuple[str, ObjectInfo]]:
    """``(file name, object)`` pairs to download from ``prefix``, checked against the limits."""
    wanted: list[tuple[str, ObjectInfo]] = []
    foreign: list[str] = []
    listed = 0
    async for obj in storage.iter_objects(prefix):
        listed += 1
        if listed > settings.max_dataset_files:
            raise InputError(
                f"input.dataset: {prefix} holds more than {settings.max_dataset_files} objects "
                "(MAX_DATASET_FILES); split it into smaller datasets"
            )
        name = obj.key.removeprefix(prefix)
        if not name or name.endswith("/"):
            continue  # a folder marker, not a file
        if not obj.key.startswith(prefix) or file_name_problem(name) is not None:
            foreign.append(obj.key)
            continue
        wanted.append((name, obj))
    if foreign:
        named = ", ".join(repr(k) for k in foreign[:NAMED_IN_WARNINGS])
        more = f" and {len(foreign) - NAMED_IN_WARNINGS} more" if len(foreign) > NAMED_IN_WARNINGS else ""
        log.warning(
            "dataset %s: skipping %d keys that are not plain file names: %s%s", prefix, len(foreign), named, more
        )
    total = sum(obj.size for _, obj in wanted)
    if total > settings.max_dataset_bytes:
        raise InputError(
            f"input.dataset: {prefix} holds {total} bytes in {len(wanted)} files, over the "
            f"{settings.max_dataset_bytes}-byte limit (MAX_DATASET_BYTES)"
        )
    if not wanted:
        skipped = f" ({len(foreign)} keys skipped: not plain file names)" if foreign else ""
        raise InputError(
            f"input.dataset: no files under {prefix}{skipped}; upload them with upload_training_files first"
        )
    return wanted


async def fetch_stored_dataset(storage: Storage, dataset: str, target: Path, settings: Settings) -> Path:
    """Download the checked files of ``datasets/<dataset>/`` into ``target`` (a few at a time).

    The byte cap is held again as files arrive: an object replaced by a larger one after the
    listing cannot take the job past ``MAX_DATASET_BYTES``.
    """
    prefix = dataset_prefix(dataset)
    plan = await plan_stored_dataset(storage, prefix, settings)
    slots = asyncio.Semaphore(settings.upload_concurrency)
    received = 0

    async def fetch(name: str, key: str) -> None:
        nonlocal received
        async with slots:
            received += await storage.download_file(key, target / name)
        if received > settings.max_dataset_bytes:
            raise InputError(
                f"input.dataset: {prefix} grew past the {settings.max_dataset_bytes}-byte limit "
                "(MAX_DATASET_BYTES) while it was being downloaded"
            )

    await asyncio.gather(*(fetch(name, obj.key) for name, obj in plan))
    return target
