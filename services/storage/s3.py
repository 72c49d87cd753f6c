"""``RealStorageService``: any S3-compatible store (AWS, R2, B2, MinIO) via aiobotocore.

The only module that holds an S3 client. Every network call goes through
:func:`~services.storage.breaker.safe_s3_operation` (a test walks this file's AST and
fails on a direct call); ``generate_presigned_url`` only signs locally and needs none.
One client per worker (per event loop), its connection pool sized to the upload
concurrency, botocore retries in ``standard`` mode with ``S3_MAX_ATTEMPTS`` in all, and
every call, retries included, bounded by ``S3_OPERATION_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from pathlib import Path
from typing import Any, ClassVar

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from config.settings import Settings
from services.errors import ObjectNotFound, PreconditionFailed, StorageError
from services.storage.base import (
    SHA256_METADATA_KEY,
    DeleteResult,
    ListPage,
    ObjectInfo,
    PresignedUpload,
    Storage,
)
from services.storage.breaker import S3Breaker, safe_s3_operation
from services.storage.hashing import bytes_sha256, file_sha256
from services.storage.keys import validate_key, validate_prefix
from services.storage.s3_multipart import MultipartUploads, memory_chunks, read_file_chunks, rechunk

log = logging.getLogger(__name__)

DELETE_BATCH = 1000  # S3 DeleteObjects limit
READ_CHUNK = 1024 * 1024


def build_client_config(settings: Settings) -> AioConfig:
    """botocore config: retries, pool, timeouts, addressing, SigV4 and checksum mode."""
    return AioConfig(
        region_name=settings.s3_region,
        signature_version="s3v4",
        retries={"mode": "standard", "total_max_attempts": settings.s3_max_attempts},
        max_pool_connections=max(10, settings.upload_concurrency * 2),
        connect_timeout=settings.s3_connect_timeout,
        read_timeout=settings.s3_read_timeout,
        s3={"addressing_style": settings.s3_addressing_style},
        request_checksum_calculation=settings.s3_checksum,
        response_checksum_validation=settings.s3_checksum,
    )


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


class RealStorageService(MultipartUploads, Storage):
    """S3 storage. Create with :meth:`create` (opens the shared client); ``close`` when done."""

    backend: ClassVar[str] = "s3"

    def __init__(self, settings: Settings, client: Any, client_context: Any, breaker: S3Breaker | None = None) -> None:
        if not settings.s3_bucket:
            raise StorageError("S3_BUCKET is not set; the S3 backend needs a bucket")
        self.settings = settings
        self.bucket = settings.s3_bucket
        self._client = client
        self._client_context = client_context
        self.breaker = breaker or S3Breaker(settings.s3_breaker_fail_max, settings.s3_breaker_reset_timeout)
        self.deadline = settings.s3_operation_timeout  # per call, botocore's retries included

    @classmethod
    async def create(cls, settings: Settings, *, breaker: S3Breaker | None = None) -> RealStorageService:
        """Open the client (no network I/O yet); ``breaker`` defaults to one built from the settings."""
        context = get_session().create_client(
            "s3",
            endpoint_url=settings.s3_endpoint_url,
            region_name=settings.s3_region,
            aws_access_key_id=_secret(settings.aws_access_key_id),
            aws_secret_access_key=_secret(settings.aws_secret_access_key),
            aws_session_token=_secret(settings.aws_session_token),
            config=build_client_config(settings),
        )
        client = await context.__aenter__()
        return cls(settings, client, context, breaker)

    async def close(self) -> None:
        """Close the client's connection pool."""
        await self._client_context.__aexit__(None, None, None)

    def _uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{key}"

    def describe(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "bucket": self.bucket,
            "endpoint_url": self.settings.s3_endpoint_url or "aws",
            "region": self.settings.s3_region,
            "addressing_style": self.settings.s3_addressing_style,
            "checksum": self.settings.s3_checksum,
            "circuit_breaker": self.breaker.describe(),
        }

    # --- writes ---------------------------------------------------------------------

    def _put_args(self, key: str, content_type: str | None, metadata: Mapping[str, str] | None) -> dict[str, Any]:
        args: dict[str, Any] = {"Bucket": self.bucket, "Key": validate_key(key)}
        if content_type:
            args["ContentType"] = content_type
        if metadata:
            args["Metadata"] = dict(metadata)
        return args

    async def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        digest = sha256 or bytes_sha256(data)
        meta = {**(metadata or {}), SHA256_METADATA_KEY: digest}
        if len(data) > self.settings.multipart_threshold:
            return await self._multipart(
                key, memory_chunks(data, self.settings.multipart_chunk_size), content_type, meta
            )
        args = self._put_args(key, content_type, meta)
        if self.settings.s3_object_checksum:
            # An explicit value goes out as a plain header (no aws-chunked trailer, which R2 rejects).
            args["ChecksumAlgorithm"] = "SHA256"
            args["ChecksumSHA256"] = base64.b64encode(bytes.fromhex(digest)).decode()
        response = await safe_s3_operation(
            self.breaker,
            "put_object",
            self._client.put_object,
            Body=data,
            deadline=self.deadline,
            resource=self._uri(key),
            **args,
        )
        return ObjectInfo(key=key, size=len(data), etag=response.get("ETag"), content_type=content_type, metadata=meta)

    async def put_bytes_if(
        self, key: str, data: bytes, *, etag: str | None, content_type: str | None = None
    ) -> ObjectInfo:
        args = self._put_args(key, content_type, {SHA256_METADATA_KEY: bytes_sha256(data)})
        if etag is None:
            args["IfNoneMatch"] = "*"
        else:
            args["IfMatch"] = etag
        try:
            response = await safe_s3_operation(
                self.breaker,
                "put_object",
                self._client.put_object,
                Body=data,
                deadline=self.deadline,
                resource=self._uri(key),
                **args,
            )
        except StorageError as exc:
            if _condition_failed(exc.__cause__):
                what = "exists" if etag is None else f"is no longer version {etag}"
                raise PreconditionFailed(f"{self._uri(key)} {what}") from exc
            raise
        return ObjectInfo(key=key, size=len(data), etag=response.get("ETag"), content_type=content_type)

    async def put_file(
        self,
        key: str,
        path: Path,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        size = path.stat().st_size
        if size <= self.settings.multipart_threshold:
            data = await asyncio.to_thread(path.read_bytes)
            return await self.put_bytes(key, data, content_type=content_type, metadata=metadata)
        digest = await asyncio.to_thread(file_sha256, path)
        meta = {**(metadata or {}), SHA256_METADATA_KEY: digest}
        return await self._multipart(
            key, read_file_chunks(path, self.settings.multipart_chunk_size), content_type, meta
        )

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Buffer up to the threshold; a longer stream becomes a multipart upload.

        The sha256 of a multipart stream is known only at the end, so it is stored in
        the metadata of the completed object via a server-side copy onto itself.
        """
        buffer = bytearray()
        iterator = aiter(chunks)
        async for chunk in iterator:
            buffer += chunk
            if len(buffer) > self.settings.multipart_threshold:
                break
        else:
            return await self.put_bytes(key, bytes(buffer), content_type=content_type, metadata=metadata)

        hasher = hashlib.sha256()

        async def rest() -> AsyncIterator[bytes]:
            hasher.update(buffer)
            yield bytes(buffer)
            async for more in iterator:
                hasher.update(more)
                yield more

        chunked = rechunk(rest(), self.settings.multipart_chunk_size)
        info = await self._multipart(key, chunked, content_type, dict(metadata or {}))
        meta = {**(metadata or {}), SHA256_METADATA_KEY: hasher.hexdigest()}
        await self._copy(key, key, metadata=meta, content_type=content_type)
        return ObjectInfo(key=key, size=info.size, etag=info.etag, content_type=content_type, metadata=meta)

    # --- reads ----------------------------------------------------------------------

    async def _get_object(self, key: str) -> dict[str, Any]:
        return await safe_s3_operation(
            self.breaker,
            "get_object",
            self._client.get_object,
            Bucket=self.bucket,
            Key=validate_key(key),
            deadline=self.deadline,
            resource=self._uri(key),
        )

    async def get_bytes(self, key: str) -> bytes:
        return (await self.get_bytes_and_etag(key))[0]

    async def get_bytes_and_etag(self, key: str) -> tuple[bytes, str | None]:
        response = await self._get_object(key)
        async with response["Body"] as body:
            data = await safe_s3_operation(
                self.breaker, "get_object.read", body.read, deadline=self.deadline, resource=self._uri(key)
            )
        return data, response.get("ETag")

    async def download_file(self, key: str, path: Path) -> int:
        response = await self._get_object(key)
        partial = path.with_name(f".{uuid.uuid4().hex}.part")  # short: the final name may be 255 bytes
        size = 0
        try:
            async with response["Body"] as body:
                with partial.open("wb") as handle:
                    while chunk := await safe_s3_operation(
                        self.breaker,
                        "get_object.read",
                        body.read,
                        READ_CHUNK,
                        deadline=self.deadline,
                        resource=self._uri(key),
                    ):
                        size += len(chunk)
                        await asyncio.to_thread(handle.write, chunk)
            partial.replace(path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                partial.unlink()
        return size

    async def head(self, key: str) -> ObjectInfo | None:
        try:
            response = await safe_s3_operation(
                self.breaker,
                "head_object",
                self._client.head_object,
                Bucket=self.bucket,
                Key=validate_key(key),
                deadline=self.deadline,
                resource=self._uri(key),
            )
        except ObjectNotFound:
            return None
        return ObjectInfo(
            key=key,
            size=int(response.get("ContentLength", 0)),
            last_modified=response.get("LastModified"),
            etag=response.get("ETag"),
            content_type=response.get("ContentType"),
            metadata=response.get("Metadata", {}),
        )

    async def list_page(self, prefix: str = "", *, page_size: int = 1000, token: str | None = None) -> ListPage:
        args: dict[str, Any] = {"Bucket": self.bucket, "Prefix": validate_prefix(prefix), "MaxKeys": page_size}
        if token:
            args["ContinuationToken"] = token
        response = await safe_s3_operation(
            self.breaker,
            "list_objects_v2",
            self._client.list_objects_v2,
            deadline=self.deadline,
            resource=self._uri(prefix),
            caller_input=token is not None,  # a token may come from the caller (list_files)
            **args,
        )
        objects = [
            ObjectInfo(key=o["Key"], size=int(o["Size"]), last_modified=o.get("LastModified"), etag=o.get("ETag"))
            for o in response.get("Contents", [])
        ]
        next_token = response.get("NextContinuationToken") if response.get("IsTruncated") else None
        return ListPage(objects=objects, next_token=next_token)

    # --- delete, copy, presign --------------------------------------------------------

    async def delete_many(self, keys: list[str]) -> DeleteResult:
        deleted: list[str] = []
        errors: list[dict[str, str]] = []
        for start in range(0, len(keys), DELETE_BATCH):
            batch = [validate_key(k) for k in keys[start : start + DELETE_BATCH]]
            response = await safe_s3_operation(
                self.breaker,
                "delete_objects",
                self._client.delete_objects,
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in batch], "Quiet": False},
                deadline=self.deadline,
                resource=self._uri(batch[0]),
            )
            deleted += [d["Key"] for d in response.get("Deleted", [])]
            errors += [
                {"key": e.get("Key", ""), "error": f"{e.get('Code')}: {e.get('Message')}"}
                for e in response.get("Errors", [])
            ]
        return DeleteResult(deleted=deleted, errors=errors)

    async def _copy(
        self,
        source_key: str,
        dest_key: str,
        *,
        metadata: Mapping[str, str] | None = None,
        content_type: str | None = None,
    ) -> dict[str, Any]:
        args: dict[str, Any] = {
            "Bucket": self.bucket,
            "Key": validate_key(dest_key),
            "CopySource": {"Bucket": self.bucket, "Key": validate_key(source_key)},
        }
        if metadata is not None:
            args["Metadata"] = dict(metadata)
            args["MetadataDirective"] = "REPLACE"
            if content_type:
                args["ContentType"] = content_type
        return await safe_s3_operation(
            self.breaker,
            "copy_object",
            self._client.copy_object,
            deadline=self.deadline,
            resource=self._uri(dest_key),
            **args,
        )

    async def copy(self, source_key: str, dest_key: str) -> ObjectInfo:
        await self._copy(source_key, dest_key)
        info = await self.head(dest_key)
        if info is None:
            raise StorageError(f"copy {self._uri(source_key)} -> {self._uri(dest_key)}: destination missing")
        return info

    async def presign_get(self, key: str, expires_in: int | None = None) -> str:
        return await self._client.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": validate_key(key)},
            ExpiresIn=expires_in or self.settings.presign_expires,
        )

    async def presign_put(
        self, key: str, *, content_type: str | None = None, expires_in: int | None = None
    ) -> PresignedUpload:
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": validate_key(key)}
        headers: dict[str, str] = {}
        if content_type:
            params["ContentType"] = content_type
            headers["Content-Type"] = content_type
        expires = expires_in or self.settings.presign_expires
        url = await self._client.generate_presigned_url("put_object", Params=params, ExpiresIn=expires)
        return PresignedUpload(key=key, url=url, method="PUT", headers=headers, expires_in=expires)


def _condition_failed(cause: BaseException | None) -> bool:
    """An answer that says a conditional PUT lost: 412, AWS's 409 ConditionalRequestConflict
    (two conditional writes overlapped), or the 304 older MinIO sent for If-None-Match."""
    if not isinstance(cause, ClientError):
        return False
    error = cause.response.get("Error", {})
    status = cause.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    code = str(error.get("Code", ""))
    return status in (304, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict", "304", "412")
