"""``LocalStorageService``: the default backend, files under ``STORAGE_DIR``.

Same semantics as S3: keys validated the same way, atomic writes (a temp file in
``.tmp/`` renamed into place), metadata (sha256, content type) in a sidecar under
``.meta/``, ``file://`` URLs where S3 gives presigned ones. Blocking file I/O runs in
threads so the event loop stays free.

Bytes and metadata commit as a pair: the sidecar names the file it describes by inode
(with size and mtime), is written *before* the one rename that puts the bytes in place,
and is trusted only while it names the file found there; concurrent writers of one key
can therefore never leave a sha256 that does not match the bytes. Listing walks
directories in key order, skipping what lies before the page's start-after token, and
stats only the objects on the page.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import itertools
import json
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterable, AsyncIterator, Iterator, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

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
from services.storage.hashing import bytes_sha256, file_sha256
from services.storage.keys import validate_key, validate_prefix

log = logging.getLogger(__name__)

INTERNAL_DIRS = (".tmp", ".meta")
READ_CHUNK = 1024 * 1024


class LocalStorageService(Storage):
    """Objects as files under ``root``; the default when ``S3_BUCKET`` is unset."""

    backend: ClassVar[str] = "local"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.root = settings.storage_dir.expanduser().resolve()
        self._tmp = self.root / ".tmp"
        self._meta = self.root / ".meta"
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
            self._meta.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"STORAGE_DIR {self.root}: cannot create it ({exc})") from exc

    def describe(self) -> dict[str, Any]:
        return {"backend": self.backend, "storage_dir": str(self.root)}

    # --- paths --------------------------------------------------------------------------

    def path_for(self, key: str) -> Path:
        """The file that holds ``key`` (inside ``root``, never outside)."""
        validate_key(key)
        if key.split("/", 1)[0] in INTERNAL_DIRS:
            raise StorageError(f"key {key!r}: {INTERNAL_DIRS} are reserved by the local backend")
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root):
            raise StorageError(f"key {key!r} leaves STORAGE_DIR")
        return path

    def _meta_path(self, key: str) -> Path:
        # Hashed: a 255-byte file name plus ".json" would pass the file system's name limit.
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self._meta / digest[:2] / f"{digest}.json"

    # --- writes -------------------------------------------------------------------------

    def _commit(
        self, key: str, temp: Path, size: int, digest: str, content_type: str | None, metadata: Mapping[str, str] | None
    ) -> ObjectInfo:
        path = self.path_for(key)
        meta = {**(metadata or {}), SHA256_METADATA_KEY: digest}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.is_dir():
                raise StorageError(f"key {key!r}: a folder of that name exists")
            sidecar = self._meta_path(key)
            sidecar.parent.mkdir(parents=True, exist_ok=True)
            stat = temp.stat()  # a rename keeps the inode and mtime: this is the file the sidecar names
            record = {**_identity(stat), "content_type": content_type, "metadata": meta}
            self._write_atomic(sidecar, json.dumps(record).encode())
            _replace_into(temp, path)  # the one step that commits bytes and sidecar together
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        return ObjectInfo(
            key=key,
            size=size,
            content_type=content_type,
            metadata=meta,
            last_modified=datetime.fromtimestamp(stat.st_mtime, UTC),
        )

    def _write_atomic(self, path: Path, data: bytes) -> None:
        temp = self._tmp / f"{uuid.uuid4().hex}.part"
        try:
            temp.write_bytes(data)
            os.replace(temp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def _put_bytes_sync(
        self, key: str, data: bytes, content_type: str | None, metadata: Mapping[str, str] | None, sha256: str | None
    ) -> ObjectInfo:
        self.path_for(key)
        temp = self._tmp / f"{uuid.uuid4().hex}.part"
        try:
            temp.write_bytes(data)
        except OSError:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
            raise
        digest = sha256 or bytes_sha256(data)
        return self._commit(key, temp, len(data), digest, content_type, metadata)

    async def put_bytes(
        self,
        key: str,
        data: bytes,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
        sha256: str | None = None,
    ) -> ObjectInfo:
        return await self._io(self._put_bytes_sync, key, data, content_type, metadata, sha256, key=key)

    async def put_file(
        self,
        key: str,
        path: Path,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        def copy() -> ObjectInfo:
            self.path_for(key)
            temp = self._tmp / f"{uuid.uuid4().hex}.part"
            digest = hashlib.sha256()
            size = 0
            try:
                with path.open("rb") as src, temp.open("wb") as dst:
                    while chunk := src.read(READ_CHUNK):
                        digest.update(chunk)
                        dst.write(chunk)
                        size += len(chunk)
            except OSError:
                with contextlib.suppress(FileNotFoundError):
                    temp.unlink()
                raise
            return self._commit(key, temp, size, digest.hexdigest(), content_type, metadata)

        return await self._io(copy, key=key)

    async def put_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> ObjectInfo:
        self.path_for(key)
        temp = self._tmp / f"{uuid.uuid4().hex}.part"
        digest = hashlib.sha256()
        size = 0
        try:
            with temp.open("wb") as handle:
                async for chunk in chunks:
                    digest.update(chunk)
                    size += len(chunk)
                    await asyncio.to_thread(handle.write, chunk)
            return await self._io(self._commit, key, temp, size, digest.hexdigest(), content_type, metadata, key=key)
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()

    def _put_if_sync(self, key: str, data: bytes, etag: str | None, content_type: str | None) -> ObjectInfo:
        """Check and write under an exclusive lock on the key (``flock``), so conditional writers of
        one key on this machine take turns; the ETag of a local object is its sha256."""
        path = self.path_for(key)
        lock = self._tmp / "locks" / f"{hashlib.sha256(key.encode()).hexdigest()}.lock"
        lock.parent.mkdir(parents=True, exist_ok=True)
        with lock.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                exists = path.is_file()
                if etag is None and exists:
                    raise PreconditionFailed(f"{self.describe_key(key)} exists")
                if etag is not None and (not exists or file_sha256(path) != etag):
                    raise PreconditionFailed(f"{self.describe_key(key)} is no longer version {etag}")
                info = self._put_bytes_sync(key, data, content_type, None, None)
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
        return dataclasses.replace(info, etag=info.sha256)

    async def put_bytes_if(
        self, key: str, data: bytes, *, etag: str | None, content_type: str | None = None
    ) -> ObjectInfo:
        return await self._io(self._put_if_sync, key, data, etag, content_type, key=key)

    # --- reads --------------------------------------------------------------------------

    async def _io(self, func: Any, *args: Any, key: str) -> Any:
        try:
            return await asyncio.to_thread(func, *args)
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{self.describe_key(key)}: not found") from exc
        except OSError as exc:
            raise StorageError(f"{self.describe_key(key)}: {exc.strerror or exc}") from exc

    def describe_key(self, key: str) -> str:
        """``file://`` location of a key, for messages."""
        return f"local:{key}"

    async def get_bytes(self, key: str) -> bytes:
        path = self.path_for(key)
        if not path.is_file():
            raise ObjectNotFound(f"{self.describe_key(key)}: not found")
        return await self._io(path.read_bytes, key=key)

    async def get_bytes_and_etag(self, key: str) -> tuple[bytes, str | None]:
        data = await self.get_bytes(key)
        return data, bytes_sha256(data)

    async def download_file(self, key: str, path: Path) -> int:
        source = self.path_for(key)
        if not source.is_file():
            raise ObjectNotFound(f"{self.describe_key(key)}: not found")
        partial = path.with_name(f".{uuid.uuid4().hex}.part")  # short: the final name may be 255 bytes

        def copy() -> int:
            try:
                shutil.copyfile(source, partial)
                partial.replace(path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    partial.unlink()
            return path.stat().st_size

        return await self._io(copy, key=key)

    def _head_sync(self, key: str) -> ObjectInfo | None:
        path = self.path_for(key)
        if not path.is_file():
            return None
        stat = path.stat()
        record: dict[str, Any] = {}
        sidecar = self._meta_path(key)
        if sidecar.is_file():
            record = json.loads(sidecar.read_text())
        if any(record.get(name) != value for name, value in _identity(stat).items()):
            # Another writer's sidecar, or a file written behind the worker's back: recompute.
            record = {"content_type": None, "metadata": {SHA256_METADATA_KEY: file_sha256(path)}}
        return ObjectInfo(
            key=key,
            size=stat.st_size,
            last_modified=datetime.fromtimestamp(stat.st_mtime, UTC),
            content_type=record.get("content_type"),
            metadata=record.get("metadata", {}),
        )

    async def head(self, key: str) -> ObjectInfo | None:
        return await self._io(self._head_sync, key, key=key)

    def _walk(self, prefix: str, after: str | None) -> Iterator[str]:
        """Keys under ``prefix`` greater than ``after``, in key order, without a single stat."""
        base = prefix.rsplit("/", 1)[0] + "/" if "/" in prefix else ""
        yield from self._walk_dir(self.root / base, base, prefix, after)

    def _walk_dir(self, directory: Path, rel: str, prefix: str, after: str | None) -> Iterator[str]:
        try:
            with os.scandir(directory) as scan:
                # A folder sorts as "<name>/", so a depth-first walk yields keys in S3 order.
                entries = sorted(
                    (rel + entry.name + ("/" if is_dir else ""), is_dir, entry.name)
                    for entry in scan
                    if (rel or entry.name not in INTERNAL_DIRS)
                    and ((is_dir := entry.is_dir(follow_symlinks=False)) or entry.is_file(follow_symlinks=False))
                )
        except (FileNotFoundError, NotADirectoryError):
            return
        for name, is_dir, child in entries:
            if not is_dir:
                if name.startswith(prefix) and (after is None or name > after):
                    yield name
                continue
            if not (name.startswith(prefix) or prefix.startswith(name)):
                continue
            if after is not None and name <= after and not after.startswith(name):
                continue  # every key in there sorts before the token
            yield from self._walk_dir(directory / child, name, prefix, after)

    def _stat_keys(self, keys: list[str]) -> list[ObjectInfo]:
        found = []
        for key in keys:
            try:
                stat = os.stat(self.root / key)
            except FileNotFoundError:
                # Deleted since the walk saw it: S3 would not list it either.
                log.debug("local storage: %s was deleted while being listed", key)
                continue
            found.append(
                ObjectInfo(key=key, size=stat.st_size, last_modified=datetime.fromtimestamp(stat.st_mtime, UTC))
            )
        return found

    def _page_sync(self, prefix: str, page_size: int, token: str | None) -> ListPage:
        keys = list(itertools.islice(self._walk(prefix, token), page_size + 1))
        more = len(keys) > page_size
        keys = keys[:page_size]
        return ListPage(objects=self._stat_keys(keys), next_token=keys[-1] if more else None)

    async def list_page(self, prefix: str = "", *, page_size: int = 1000, token: str | None = None) -> ListPage:
        validate_prefix(prefix)
        return await self._io(self._page_sync, prefix, page_size, token, key=prefix)

    async def iter_objects(self, prefix: str = "", *, page_size: int = 1000) -> AsyncIterator[ObjectInfo]:
        """One walk for the whole listing (not one per page), then a stat per object."""
        validate_prefix(prefix)
        keys: list[str] = await self._io(lambda: list(self._walk(prefix, None)), key=prefix)
        for start in range(0, len(keys), page_size):
            for info in await self._io(self._stat_keys, keys[start : start + page_size], key=prefix):
                yield info

    # --- delete, copy, presign ----------------------------------------------------------

    def _delete_sync(self, key: str) -> None:
        path = self.path_for(key)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(FileNotFoundError):
            self._meta_path(key).unlink()
        self._remove_empty_folders(path.parent)

    def _remove_empty_folders(self, folder: Path) -> None:
        """Remove ``folder`` and its parents while empty, up to (never including) the root: S3 has
        no folders, so a prefix whose last object is deleted leaves nothing here either."""
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except FileNotFoundError:
                log.debug("folder %s was already removed", folder)
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    log.warning("could not remove the empty folder %s: %s", folder, exc)
                return  # still holds something (or cannot go): the folders above stay too
            folder = folder.parent

    async def delete_many(self, keys: list[str]) -> DeleteResult:
        deleted: list[str] = []
        errors: list[dict[str, str]] = []
        for key in keys:
            try:
                await self._io(self._delete_sync, key, key=key)
            except (StorageError, ValueError) as exc:
                errors.append({"key": key, "error": str(exc)})
            else:
                deleted.append(key)
        return DeleteResult(deleted=deleted, errors=errors)

    async def copy(self, source_key: str, dest_key: str) -> ObjectInfo:
        info = await self.head(source_key)
        if info is None:
            raise ObjectNotFound(f"{self.describe_key(source_key)}: not found")
        return await self.put_file(
            dest_key, self.path_for(source_key), content_type=info.content_type, metadata=dict(info.metadata)
        )

    async def presign_get(self, key: str, expires_in: int | None = None) -> str:
        return self.path_for(key).as_uri()

    async def presign_put(
        self, key: str, *, content_type: str | None = None, expires_in: int | None = None
    ) -> PresignedUpload:
        headers = {"Content-Type": content_type} if content_type else {}
        return PresignedUpload(
            key=key,
            url=self.path_for(key).as_uri(),
            method="PUT",
            headers=headers,
            expires_in=expires_in or self.settings.presign_expires,
        )


def _identity(stat: os.stat_result) -> dict[str, int]:
    """What names one file's bytes: a rename keeps all four, a rewrite changes at least one."""
    return {"dev": stat.st_dev, "ino": stat.st_ino, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _replace_into(temp: Path, path: Path, attempts: int = 3) -> None:
    """``os.replace(temp, path)``, making ``path``'s folder again when a delete that emptied it
    removed it between our ``mkdir`` and the rename (deletes prune empty folders)."""
    for attempt in range(attempts):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.replace(temp, path)
            return
        except FileNotFoundError:
            if attempt == attempts - 1 or not temp.exists():
                raise
            log.debug("folder of %s was pruned by a concurrent delete; making it again", path)
