"""The storage interface both backends implement, with the types they return.

Storage knows objects, not use cases: keys are opaque to it beyond the generic rule of
:func:`services.storage.keys.validate_key`, which both backends apply so that a key valid on one
is valid on the other. The key layout (``datasets/``, ``loras/``, ``outputs/``) lives in
:mod:`services.storage.keys`.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

SHA256_METADATA_KEY = "sha256"


@dataclass(frozen=True)
class ObjectInfo:
    """What ``head``/``list`` know about one object."""

    key: str
    size: int
    last_modified: datetime | None = None
    etag: str | None = None
    content_type: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    @property
    def sha256(self) -> str | None:
        """The sha256 stored with the object, when it was written by this worker."""
        return self.metadata.get(SHA256_METADATA_KEY)


@dataclass(frozen=True)
class ListPage:
    """One page of a listing; ``next_token`` is ``None`` on the last page."""

    objects: list[ObjectInfo]
    next_token: str | None = None


@dataclass(frozen=True)
class DeleteResult:
    """Outcome of a batch delete: every key is in exactly one list."""

    deleted: list[str]
    errors: list[dict[str, str]]


@dataclass(frozen=True)
class PresignedUpload:
    """A presigned PUT: the client sends the body to ``url`` with ``headers``."""

    key: str
    url: str
    method: str
    headers: dict[str, str]
    expires_in: int


class Storage(abc.ABC):
    """Object storage with S3 semantics. ``RealStorageService`` and ``LocalStorageService``."""

    backend: ClassVar[str]

    @abc.abstractmethod
    async def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        """Store ``data`` at ``key`` (multipart above the threshold)."""

    @abc.abstractmethod
    async def put_file(
        self,
        key: str,
        path: Path,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Store a local file, streaming it (multipart above the threshold)."""

    @abc.abstractmethod
    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        """Store an async stream of chunks (multipart once it passes the threshold)."""

    @abc.abstractmethod
    async def put_bytes_if(
        self, key: str, data: bytes, *, etag: str | None, content_type: str | None = None
    ) -> ObjectInfo:
        """A conditional write: with ``etag=None`` create ``key`` only if it does not exist
        (S3 ``If-None-Match: *``), else replace it only while its ETag is ``etag`` (``If-Match``).

        Raises :class:`~services.errors.PreconditionFailed` when the condition does not hold. A
        store that ignores the headers writes anyway; callers that must know read back.
        The returned ``etag`` names the version written (for the next ``put_bytes_if``).
        """

    @abc.abstractmethod
    async def get_bytes_and_etag(self, key: str) -> tuple[bytes, str | None]:
        """Read a whole object with its ETag (the value ``put_bytes_if`` compares); ``ObjectNotFound``."""

    @abc.abstractmethod
    async def get_bytes(self, key: str) -> bytes:
        """Read a whole object; ``ObjectNotFound`` if missing."""

    @abc.abstractmethod
    async def download_file(self, key: str, path: Path) -> int:
        """Stream an object to ``path`` (atomically); return its size."""

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """Object metadata, or ``None`` when the key does not exist."""

    @abc.abstractmethod
    async def list_page(self, prefix: str = "", *, page_size: int = 1000, token: str | None = None) -> ListPage:
        """One page of objects under ``prefix``, in key order."""

    async def iter_objects(self, prefix: str = "", *, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        """Every object under ``prefix``, following pagination."""
        token: str | None = None
        while True:
            page = await self.list_page(prefix, page_size=page_size, token=token)
            for obj in page.objects:
                yield obj
            if page.next_token is None:
                return
            token = page.next_token

    async def list_all(self, prefix: str = "", *, limit: int | None = None) -> list[ObjectInfo]:
        """Objects under ``prefix`` as a list (at most ``limit``)."""
        found: list[ObjectInfo] = []
        async for obj in self.iter_objects(prefix):
            if limit is not None and len(found) >= limit:
                break
            found.append(obj)
        return found

    @abc.abstractmethod
    async def delete_many(self, keys: list[str]) -> DeleteResult:
        """Delete keys in batches; deleting a missing key succeeds (S3 semantics)."""

    @abc.abstractmethod
    async def copy(self, source_key: str, dest_key: str) -> ObjectInfo:
        """Server-side copy, metadata included."""

    @abc.abstractmethod
    async def presign_get(self, key: str, expires_in: int | None = None) -> str:
        """A URL that reads ``key`` without credentials until it expires."""

    @abc.abstractmethod
    async def presign_put(
        self, key: str, *, content_type: str | None = None, expires_in: int | None = None
    ) -> PresignedUpload:
        """A URL the client PUTs the object body to."""

    @abc.abstractmethod
    def describe(self) -> dict[str, Any]:
        """Backend facts for the health action (never a secret)."""

    async def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release connections."""
