"""``upload_training_files`` and ``presign_uploads``."""

from __future__ import annotations

import mimetypes
import uuid
from pathlib import Path
from typing import Any

from services.actions.results import PresignedUploadOut, PresignResult, UploadResult
from services.actions.schemas import PresignUploadsInput, UploadTrainingFilesInput
from services.errors import InputError, StorageError
from services.ingest.batch_upload import BatchResult, upload_batch
from services.job.context import JobContext
from services.storage.keys import dataset_prefix, file_name_problem

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp"}


def _url_fetcher(ctx: JobContext) -> Any:
    """Downloads a URL source into the job workspace (SSRF-safe, size-capped).

    The cap is the smaller of ``MAX_DOWNLOAD_BYTES`` and ``MAX_FILE_BYTES``. The local file
    gets a short generated name: the dataset name may be up to 255 bytes, and the download's
    temporary ``.<name>.<random>.part`` beside it would then pass the file system's limit.
    """
    from services.ingest.fetch import download

    downloads = ctx.workspace / "downloads"
    downloads.mkdir(exist_ok=True)
    cap = min(ctx.settings.max_download_bytes, ctx.settings.max_file_bytes)

    async def fetch(url: str, name: str) -> Path:
        expect = "image" if Path(name).suffix.lower() in IMAGE_SUFFIXES else "any"
        fetched = await download(url, downloads / uuid.uuid4().hex, ctx.settings, expect=expect, max_bytes=cap)
        return fetched.path

    return fetch


MAX_NAMED_FAILURES = 10


def batch_summary(result: BatchResult) -> str:
    """``2 uploaded, 0 skipped, 1 failed: input.files[3].name: ...`` (at most 10 failures named)."""
    counts = f"{len(result.uploaded)} uploaded, {len(result.skipped)} skipped, {len(result.failed)} failed"
    if not result.failed:
        return counts
    named = "; ".join(f"input.{f.error}" for f in result.failed[:MAX_NAMED_FAILURES])
    more = len(result.failed) - MAX_NAMED_FAILURES
    return f"{counts}: {named}" + (f" (and {more} more)" if more > 0 else "")


async def upload_training_files(request: UploadTrainingFilesInput, ctx: JobContext) -> UploadResult:
    """Upload the batch. Some files failed: the job completes with ``partial`` and a summary; all failed: an error."""
    files = request.files  # validated FileSources: the batch uses them without a copy
    result = await upload_batch(
        ctx.storage,
        files,
        request.dataset,
        concurrency=ctx.settings.upload_concurrency,
        fetch=_url_fetcher(ctx),
        max_file_bytes=ctx.settings.max_file_bytes,
        max_batch_bytes=ctx.settings.max_batch_bytes,
        download_concurrency=ctx.settings.download_concurrency,
        max_image_pixels=ctx.settings.max_image_pixels,
    )
    summary = batch_summary(result)
    if result.failed and not result.uploaded and not result.skipped:
        raise StorageError(f"no file was stored: {summary}")
    return UploadResult(**dict(result), partial=bool(result.failed), summary=summary)


async def presign_uploads(request: PresignUploadsInput, ctx: JobContext) -> PresignResult:
    """Presigned PUT URLs into ``datasets/<dataset>/`` for files sent straight to storage."""
    if ctx.settings.backend == "local":
        raise InputError("presigned uploads need an S3 bucket; send the file inline")
    prefix = dataset_prefix(request.dataset)
    problems = [
        f"input.files[{i}].name: {problem}"
        for i, f in enumerate(request.files)
        if (problem := file_name_problem(f.name))
    ]
    names = [f.name for f in request.files]
    problems += [f"input.files[{i}].name: duplicate" for i, n in enumerate(names) if n in names[:i]]
    if problems:
        raise InputError("invalid input: " + "; ".join(problems))
    uploads = []
    for item in request.files:
        content_type = item.content_type or mimetypes.guess_type(item.name)[0] or "application/octet-stream"
        presigned = await ctx.storage.presign_put(
            prefix + item.name, content_type=content_type, expires_in=request.expires_in
        )
        uploads.append(
            PresignedUploadOut(
                name=item.name,
                key=presigned.key,
                url=presigned.url,
                method=presigned.method,
                headers=presigned.headers,
                expires_in=presigned.expires_in,
            )
        )
    return PresignResult(dataset=request.dataset, prefix=prefix, uploads=uploads)
