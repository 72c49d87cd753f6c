"""The storage interface both backends implement, with the types they return.

Keys are S3-style: ``datasets/<dataset>/<name>``, ``loras/<output_name>/...``,
``outputs/<job id>/...``. Both backends validate keys the same way (:func:`validate_key`)
and share the batch upload (:mod:`services.storage.batch`).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import AsyncIterable, AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

SHA256_METADATA_KEY = "sha256"
MAX_KEY_BYTES = 1024


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


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ``ValueError``.

    Both backends use the same rule so that a key valid on one is valid on the other:
    no leading ``/``, no empty, ``.`` or ``..`` segments, no backslashes or control
    characters, at most 1024 bytes.
    """
    if not key:
        raise ValueError("key must not be empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise ValueError(f"key is longer than {MAX_KEY_BYTES} bytes")
    if key.startswith("/") or "\\" in key:
        raise ValueError("key must be relative and use '/' separators")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in key):
        raise ValueError("key must not contain control characters")
    if any(part in ("", ".", "..") for part in key.rstrip("/").split("/")):
        raise ValueError("key must not contain empty, '.' or '..' segments")
    return key


def validate_prefix(prefix: str) -> str:
    """Validate a listing prefix (empty means everything)."""
    if prefix:
        validate_key(prefix)
    return prefix


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
    async def get_bytes(self, key: str) -> bytes:
        """Read a whole object; ``ObjectNotFound`` if missing."""

    @abc.abstractmethod
    async def download_file(self, key: str, path: Path) -> int:
        """Stream an object to ``path`` (atomically); return its size."""

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo | None:
        """Object metadata, or ``None`` when the key does not exist."""

    async def exists(self, key: str) -> bool:
        """Whether ``key`` exists."""
        return await self.head(key) is not None

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

    async def upload_training_files(self, files: list[dict[str, Any]], dataset: str = "default") -> dict[str, Any]:
        """Upload a batch of ``{"name", "data": <base64>}`` files into ``datasets/<dataset>/``.

        Concurrent (bounded by ``UPLOAD_CONCURRENCY``), idempotent (an object with the
        same sha256 is skipped) and exact: the result lists every input file in exactly
        one of ``uploaded``, ``skipped`` and ``failed``.
        """
        from services.storage.batch import upload_batch

        return (await upload_batch(self, files, dataset)).model_dump()

    @property
    @abc.abstractmethod
    def upload_concurrency(self) -> int:
        """How many files a batch upload sends at once."""

    @property
    @abc.abstractmethod
    def upload_slots(self) -> asyncio.Semaphore:
        """Bounds concurrent file uploads across every job of this worker."""
