"""Multipart uploads of the S3 backend: create, send parts a few at a time, complete; abort on
any failure or cancel, so no open upload is left behind. Mixed into
:class:`~services.storage.s3.RealStorageService`, whose client, breaker and deadline it uses:
every call goes through :func:`~services.storage.breaker.safe_s3_operation`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from pathlib import Path
from typing import Any

from services.errors import StorageError
from services.storage.base import ObjectInfo
from services.storage.breaker import safe_s3_operation

log = logging.getLogger(__name__)

MULTIPART_PART_CONCURRENCY = 4


class MultipartUploads:
    """The multipart half of the S3 backend (``self._client``, ``breaker``, ``bucket`` and
    ``deadline`` come from :class:`~services.storage.s3.RealStorageService`)."""

    _client: Any
    breaker: Any
    bucket: str
    deadline: float

    # and its ``_uri(key)`` (for messages) and ``_put_args(...)`` (PutObject-style arguments)

    async def _multipart(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        content_type: str | None,
        metadata: Mapping[str, str],
    ) -> ObjectInfo:
        """Create, upload parts (a few at a time), complete; abort on any failure or cancel."""
        upload_id = await self._create_multipart(key, content_type, metadata)
        parts: dict[int, str] = {}
        tasks: list[asyncio.Task[None]] = []
        try:
            size = await self._upload_parts(key, upload_id, chunks, parts, tasks)
            response = await self._complete_multipart(key, upload_id, parts)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await asyncio.shield(self._abort_multipart(key, upload_id))
            raise
        return ObjectInfo(
            key=key, size=size, etag=response.get("ETag"), content_type=content_type, metadata=dict(metadata)
        )

    async def _create_multipart(self, key: str, content_type: str | None, metadata: Mapping[str, str]) -> str:
        """Start a multipart upload; its id. A cancel while it is in flight aborts what it created."""
        uri = self._uri(key)
        create = asyncio.ensure_future(
            safe_s3_operation(
                self.breaker,
                "create_multipart_upload",
                self._client.create_multipart_upload,
                deadline=self.deadline,
                resource=uri,
                **self._put_args(key, content_type, metadata),
            )
        )
        try:
            created = await asyncio.shield(create)
        except asyncio.CancelledError:
            # Cancelled while the server may already have created the upload: let the request
            # finish, then abort what it created, so no open multipart upload is left behind.
            try:
                orphan = await create
            except StorageError as exc:
                log.warning("create_multipart_upload of %s failed during cancellation: %s", uri, exc)
            else:
                await self._abort_multipart(key, orphan["UploadId"])
            raise
        return str(created["UploadId"])

    async def _upload_parts(
        self,
        key: str,
        upload_id: str,
        chunks: AsyncIterable[bytes],
        parts: dict[int, str],
        tasks: list[asyncio.Task[None]],
    ) -> int:
        """Send each chunk as a part (at most a few in memory at once); fills ``parts`` (number ->
        ETag) and ``tasks`` (for the caller to cancel on failure); returns the bytes sent."""
        in_memory = asyncio.Semaphore(MULTIPART_PART_CONCURRENCY)

        async def send(number: int, body: bytes) -> None:
            try:
                response = await safe_s3_operation(
                    self.breaker,
                    "upload_part",
                    self._client.upload_part,
                    Bucket=self.bucket,
                    Key=key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=body,
                    deadline=self.deadline,
                    resource=f"{self._uri(key)} part {number}",
                )
                parts[number] = response["ETag"]
            finally:
                in_memory.release()

        size = number = 0
        async for chunk in chunks:
            number += 1
            size += len(chunk)
            await in_memory.acquire()
            tasks.append(asyncio.create_task(send(number, chunk)))
            if failed := next((t for t in tasks if t.done() and t.exception()), None):
                await failed  # raises the part's error
        await asyncio.gather(*tasks)
        return size

    async def _complete_multipart(self, key: str, upload_id: str, parts: Mapping[int, str]) -> dict[str, Any]:
        return await safe_s3_operation(
            self.breaker,
            "complete_multipart_upload",
            self._client.complete_multipart_upload,
            Bucket=self.bucket,
            Key=key,
            UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": parts[n]} for n in sorted(parts)]},
            deadline=self.deadline,
            resource=self._uri(key),
        )

    async def _abort_multipart(self, key: str, upload_id: str) -> None:
        try:
            await safe_s3_operation(
                self.breaker,
                "abort_multipart_upload",
                self._client.abort_multipart_upload,
                Bucket=self.bucket,
                Key=key,
                UploadId=upload_id,
                deadline=self.deadline,
                resource=self._uri(key),
            )
        except StorageError as exc:
            # The upload stays open until the bucket's lifecycle rule removes it.
            log.warning("could not abort multipart upload %s of %s: %s", upload_id, self._uri(key), exc)


async def read_file_chunks(path: Path, chunk_size: int) -> AsyncIterator[bytes]:
    with path.open("rb") as handle:
        while chunk := await asyncio.to_thread(handle.read, chunk_size):
            yield chunk


async def memory_chunks(data: bytes, size: int) -> AsyncIterator[bytes]:
    """``data`` in parts of ``size`` bytes."""
    view = memoryview(data)
    for start in range(0, len(data), size):
        yield bytes(view[start : start + size])


async def rechunk(chunks: AsyncIterable[bytes], size: int) -> AsyncIterator[bytes]:
    """Regroup a stream into parts of ``size`` bytes (S3 needs >= 5 MiB but the last)."""
    buffer = bytearray()
    async for chunk in chunks:
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
    if buffer:
        yield bytes(buffer)
