"""Storage: one interface (:class:`Storage`), an S3 backend and a local default.

``open_storage(settings)`` picks the backend: S3 when ``S3_BUCKET`` is set, local otherwise.
``get_storage(settings)`` keeps one instance per event loop (the worker runs one loop;
aiohttp connections cannot cross loops), so every job shares one client and pool.
"""

from __future__ import annotations

import asyncio
import weakref

from config.settings import Settings
from services.storage.base import DeleteResult, ListPage, ObjectInfo, PresignedUpload, Storage
from services.storage.local import LocalStorageService

__all__ = [
    "DeleteResult",
    "ListPage",
    "LocalStorageService",
    "ObjectInfo",
    "PresignedUpload",
    "Storage",
    "close_storages",
    "get_storage",
    "open_storage",
]

_PER_LOOP: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[int, Storage]] = weakref.WeakKeyDictionary()


async def open_storage(settings: Settings) -> Storage:
    """A new storage service for ``settings`` (close it when done)."""
    if settings.backend == "s3":
        from services.storage.s3 import RealStorageService

        return await RealStorageService.create(settings)
    return LocalStorageService(settings)


async def get_storage(settings: Settings) -> Storage:
    """The storage service shared by every job on this event loop."""
    per_settings = _PER_LOOP.setdefault(asyncio.get_running_loop(), {})
    storage = per_settings.get(id(settings))
    if storage is None:
        storage = per_settings[id(settings)] = await open_storage(settings)
    return storage


async def close_storages() -> None:
    """Close the storage services of the running event loop (worker shutdown, tests)."""
    for storage in _PER_LOOP.pop(asyncio.get_running_loop(), {}).values():
        await storage.close()
