"""Concurrent, idempotent batch upload of training files into ``datasets/<dataset>/``.

Each file is ``{"name": ..., "data": <base64>}`` or ``{"name": ..., "url": "https://..."}``.
Every input file ends up in exactly one of ``uploaded``, ``skipped`` (already there with
the same sha256) and ``failed`` (with the reason); one failed file never stops the others,
and a file is reported uploaded only after the store acknowledged it.

Two bounds, on purpose apart: URL sources download under the job's own
``download_concurrency`` (a job's slow URLs hold only that job), and only the store step
takes one of the worker-wide upload slots (:func:`upload_slots`). When the listing that
starts a batch fails because the store is unavailable, no file is sent: every file fails
with that reason at once instead of each retrying against a dead store.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import logging
import mimetypes
import random
import re
import weakref
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.errors import CircuitOpen, InputError, StorageTimeout, StorageUnavailable, WorkerError
from services.ingest.images import check_image_bytes, sniff_format
from services.storage.base import ObjectInfo, Storage
from services.storage.keys import dataset_prefix, file_name_problem

log = logging.getLogger(__name__)
_SLOTS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, asyncio.Semaphore]] = weakref.WeakKeyDictionary()

# Files named as images are checked (signature, pixel cap, full decode) before they are stored,
# as the README promises; the format the name claims is the one a failure names.
IMAGE_SUFFIX_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".webp": "WEBP",
    ".gif": "GIF",
    ".bmp": "BMP",
    ".tif": "TIFF",
    ".tiff": "TIFF",
}
FILE_RETRIES = 2  # per file, on top of botocore's own retries of each request
RETRY_BASE_SECONDS = 0.2

# Downloads a URL source into the job workspace and returns the local file; the batch
# removes that file once it has read it, so a batch of URLs never holds more than the
# files in flight on disk.
UrlFetcher = Callable[[str, str], Awaitable[Path]]
# RFC 6838 type/subtype with optional parameters, printable ASCII only: the value becomes an
# HTTP header (S3 Content-Type), so a line break would be header injection, and the HTTP
# client's refusal of one would look like a storage failure and count against the breaker.
_MIME_PART = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]*"
_CONTENT_TYPE = re.compile(
    rf'{_MIME_PART}/{_MIME_PART}(?: *; *{_MIME_PART}=(?:[A-Za-z0-9!#$&^_.+-]+|"[ !#-\[\]-~]*"))*', re.ASCII
)


class UploadedFile(BaseModel):
    """A file of the batch that was stored."""

    name: str
    key: str = Field(description="Where it is stored.")
    size: int = Field(description="Bytes.")
    sha256: str = Field(description="Hex digest of the stored bytes.")


class SkippedFile(BaseModel):
    """A file already stored with the same content: nothing was sent."""

    name: str
    key: str
    reason: str = Field(description="Why nothing was sent (already stored with the same sha256).")


class FailedFile(BaseModel):
    """A file that was not stored, and why."""

    name: str
    error: str = Field(description="input.files[i]...: what failed.")


class BatchResult(BaseModel):
    """The fate of every file of one batch."""

    dataset: str
    prefix: str = Field(description="datasets/<dataset>/")
    uploaded: list[UploadedFile] = Field(default_factory=list, description="Files stored by this job.")
    skipped: list[SkippedFile] = Field(default_factory=list, description="Files already stored, byte for byte.")
    failed: list[FailedFile] = Field(default_factory=list, description="Files not stored, each with its reason.")


class FileSource(BaseModel):
    """One file of a batch: inline base64 ``data`` or a ``url`` to fetch."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="File name inside the dataset (no separators, at most 255 bytes).")
    data: str | None = Field(None, description="File content, base64.")
    url: str | None = Field(None, description="http(s) URL to download the file from.")
    content_type: str | None = Field(None, description="MIME type; guessed from the name when absent.")


def content_type_problem(value: str) -> str | None:
    """Why ``value`` is not an acceptable MIME type (``image/png``), or ``None`` when it is."""
    if len(value) > 255 or not _CONTENT_TYPE.fullmatch(value):
        return "must be a MIME type such as image/png (printable ASCII, no line breaks)"
    return None


def upload_slots(concurrency: int) -> asyncio.Semaphore:
    """The worker-wide bound on files in flight (``UPLOAD_CONCURRENCY``), one per event loop.

    Shared by every job, so memory follows the concurrency, not the number of jobs.
    """
    per_size = _SLOTS.setdefault(asyncio.get_running_loop(), {})
    return per_size.setdefault(concurrency, asyncio.Semaphore(concurrency))


def _decode(data: str) -> bytes:
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"data is not valid base64 ({exc})") from exc


class _NotAnImage(Exception):
    """A file named as an image failed the image check; the message names ``files[i]``."""


class _Batch:
    def __init__(
        self,
        storage: Storage,
        dataset: str,
        slots: asyncio.Semaphore,
        fetch: UrlFetcher | None,
        max_file_bytes: int | None,
        max_batch_bytes: int | None = None,
        download_concurrency: int = 4,
        max_image_pixels: int | None = None,
    ):
        self.max_image_pixels = max_image_pixels
        self.storage = storage
        self.slots = slots
        self.downloads = asyncio.Semaphore(download_concurrency)  # this batch's own
        self.fetch = fetch
        self.max_file_bytes = max_file_bytes
        self.max_batch_bytes = max_batch_bytes
        self.batch_bytes = 0  # bytes of the files taken on so far (URL sources are sized only here)
        self.result = BatchResult(dataset=dataset, prefix=dataset_prefix(dataset))
        # Sizes of the objects already in the dataset (None: unknown, HEAD every file).
        self.existing: dict[str, int] | None = None

    async def list_existing(self) -> StorageUnavailable | None:
        """One LIST per 1000 keys instead of a HEAD per file: a fresh upload then costs one
        request per file, not two (HEADs of missing keys halved the benchmark's throughput).

        Returns the error when the store is unavailable (the batch then sends nothing);
        any other listing failure (a key allowed to write but not to list) falls back to a
        HEAD per file.
        """
        try:
            self.existing = {obj.key: obj.size async for obj in self.storage.iter_objects(self.result.prefix)}
        except StorageUnavailable as exc:
            log.warning("listing %s failed, the store is unavailable; sending nothing: %s", self.result.prefix, exc)
            return exc
        except WorkerError as exc:
            log.warning("listing %s failed, checking each file instead: %s", self.result.prefix, exc)
        return None

    def fail(self, name: str, error: str) -> None:
        self.result.failed.append(FailedFile(name=name, error=error))

    async def _store(self, key: str, data: bytes, digest: str, content_type: str) -> ObjectInfo | None:
        """Put the file unless it is already there (``None``), retrying a transient failure.

        botocore already retries each request; a file whose retries ran out in a burst of
        throttling gets up to ``FILE_RETRIES`` more tries after a pause, unless the breaker is
        open (then storage is down, and waiting inside the job would not help).
        """
        for attempt in range(FILE_RETRIES + 1):
            try:
                # Only a listed object of the same size can hold the same bytes.
                maybe_there = self.existing is None or self.existing.get(key) == len(data)
                existing = await self.storage.head(key) if maybe_there else None
                if existing is not None and existing.sha256 == digest:
                    return None
                return await self.storage.put_bytes(key, data, content_type=content_type, sha256=digest)
            except (CircuitOpen, StorageTimeout):
                raise  # storage is down, or had its whole deadline: waiting here would not help
            except StorageUnavailable as exc:
                if attempt == FILE_RETRIES:
                    raise
                delay = RETRY_BASE_SECONDS * 2**attempt * (1 + random.random())  # noqa: S311 - jitter
                log.info("upload of %s: %s; trying again in %.2f s", key, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _download(self, source: FileSource) -> Path:
        """Fetch a URL source into the workspace under this batch's own bound (not the worker's)."""
        if self.fetch is None:
            raise ValueError("url sources are not enabled here")
        async with self.downloads:
            return await self.fetch(source.url or "", source.name)

    def _check_size(self, data: bytes) -> None:
        if self.max_file_bytes is not None and len(data) > self.max_file_bytes:
            raise ValueError(f"{len(data)} bytes is over the {self.max_file_bytes}-byte limit (MAX_FILE_BYTES)")
        if self.max_batch_bytes is not None:
            if self.batch_bytes + len(data) > self.max_batch_bytes:
                raise ValueError(
                    f"{len(data)} more bytes would take the batch over its {self.max_batch_bytes}-byte "
                    "limit (MAX_BATCH_BYTES)"
                )
            self.batch_bytes += len(data)

    async def _check_image(self, index: int, name: str, data: bytes) -> None:
        """Refuse a file named as an image that is not one (``files[i]: not a decodable PNG image``)."""
        claimed = IMAGE_SUFFIX_FORMATS.get(Path(name).suffix.lower())
        if claimed is None or self.max_image_pixels is None:
            return
        if sniff_format(data[:16]) is None:
            raise _NotAnImage(f"files[{index}]: not a decodable {claimed} image (no image signature)")
        try:
            await asyncio.to_thread(check_image_bytes, data, self.max_image_pixels, f"files[{index}]")
        except InputError as exc:
            raise _NotAnImage(str(exc)) from exc

    async def upload_one(self, index: int, source: FileSource) -> None:
        key = self.result.prefix + source.name
        content_type = source.content_type or mimetypes.guess_type(source.name)[0] or "application/octet-stream"
        path: Path | None = None
        try:
            if source.url is not None:
                path = await self._download(source)  # a slow URL holds no worker-wide slot
            async with self.slots:  # bytes in memory follow the slots, whatever the jobs
                if path is not None:
                    data = await asyncio.to_thread(path.read_bytes)
                else:
                    data = _decode(source.data or "")
                self._check_size(data)
                await self._check_image(index, source.name, data)
                digest = hashlib.sha256(data).hexdigest()
                info = await self._store(key, data, digest, content_type)
        except ValueError as exc:
            self.fail(source.name, f"files[{index}]: {exc}")
            return
        except _NotAnImage as exc:  # already names files[i]
            self.fail(source.name, str(exc))
            return
        except WorkerError as exc:
            log.warning("upload of %s failed: %s", key, exc)
            self.fail(source.name, f"files[{index}]: {exc}")
            return
        finally:
            if path is not None:
                await asyncio.to_thread(path.unlink, missing_ok=True)
        if info is None:
            self.result.skipped.append(
                SkippedFile(name=source.name, key=key, reason="already stored with the same sha256")
            )
            return
        self.result.uploaded.append(UploadedFile(name=source.name, key=key, size=info.size, sha256=digest))


def _parse(index: int, item: Any, seen: set[str]) -> tuple[FileSource | None, FailedFile | None]:
    name = item.get("name") if isinstance(item, dict) else getattr(item, "name", None)
    label = name if isinstance(name, str) else f"files[{index}]"
    try:
        source = item if isinstance(item, FileSource) else FileSource.model_validate(item)
    except ValidationError as exc:
        problems = "; ".join(f"files[{index}]{''.join(f'.{p}' for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return None, FailedFile(name=label, error=problems)
    if problem := file_name_problem(source.name):
        return None, FailedFile(name=label, error=f"files[{index}].name: {problem}")
    if source.content_type is not None and (problem := content_type_problem(source.content_type)):
        return None, FailedFile(name=label, error=f"files[{index}].content_type: {problem}")
    if (source.data is None) == (source.url is None):
        return None, FailedFile(name=label, error=f"files[{index}]: give exactly one of 'data' and 'url'")
    if source.name in seen:
        return None, FailedFile(name=label, error=f"files[{index}].name: duplicate of an earlier file in the batch")
    seen.add(source.name)
    return source, None


def _parse_all(files: Sequence[dict[str, Any] | FileSource], batch: _Batch) -> list[tuple[int, FileSource]]:
    """The files that parse, with their index; the others are recorded as failed in ``batch``."""
    seen: set[str] = set()
    sources: list[tuple[int, FileSource]] = []
    for index, item in enumerate(files):
        source, failure = _parse(index, item, seen)
        if failure is not None:
            batch.result.failed.append(failure)
        elif source is not None:
            sources.append((index, source))
    return sources


async def _run_workers(batch: _Batch, sources: list[tuple[int, FileSource]], concurrency: int) -> None:
    """Upload ``sources`` on at most ``concurrency`` workers that share one iterator."""
    pending = iter(sources)

    async def worker() -> None:
        for index, source in pending:  # one shared iterator: each file is taken exactly once
            await batch.upload_one(index, source)

    # A few workers per batch, not a task per file: 20 jobs of 50 files would otherwise hold
    # 1000 tasks, their frames and semaphore waiters at once; memory follows the concurrency.
    workers = min(len(sources), concurrency)
    tasks = [asyncio.create_task(worker()) for _ in range(workers)]
    try:
        await asyncio.gather(*tasks)
    except BaseException:
        # gather returns at the first cancelled or failed file; every other file must end its
        # own cleanup (a multipart abort) before the job ends, or the loop may drop it unfinished.
        for task in tasks:
            if not task.cancelling():  # cancel once: a second cancel would cut an abort short
                task.cancel()
        await asyncio.shield(asyncio.gather(*tasks, return_exceptions=True))
        raise


async def upload_batch(
    storage: Storage,
    files: Sequence[dict[str, Any] | FileSource],
    dataset: str = "default",
    *,
    concurrency: int,
    fetch: UrlFetcher | None = None,
    max_file_bytes: int | None = None,
    max_batch_bytes: int | None = None,
    download_concurrency: int = 4,
    max_image_pixels: int | None = None,
) -> BatchResult:
    """Upload ``files`` into ``datasets/<dataset>/``, at most ``concurrency`` files at once
    across every batch of this worker (``UPLOAD_CONCURRENCY``; see :func:`upload_slots`).

    ``max_batch_bytes`` caps the bytes of the whole batch as files are read, which is where
    URL sources get their size (inline data can be checked before the upload starts).
    ``download_concurrency`` bounds this batch's URL downloads (``DOWNLOAD_CONCURRENCY``).
    With ``max_image_pixels``, files named as images must decode within that many pixels.
    """
    batch = _Batch(
        storage,
        dataset,
        upload_slots(concurrency),
        fetch,
        max_file_bytes,
        max_batch_bytes,
        download_concurrency,
        max_image_pixels,
    )
    sources = _parse_all(files, batch)
    if sources and (down := await batch.list_existing()) is not None:
        for index, source in sources:
            batch.fail(source.name, f"files[{index}]: {down} (nothing was sent; run the batch again later)")
        return batch.result
    await _run_workers(batch, sources, concurrency)
    return batch.result
