"""The output policy: small files inline as base64, the rest as presigned redirects.

RunPod drops a result it cannot post (10 MB for ``/run``, 20 MB for ``/runsync``) and the
client sees COMPLETED with no output, so two rules hold for every response:

* a file over ``INLINE_MAX_BYTES`` is stored under ``outputs/<job id>/`` (or is already
  stored, like a LoRA) and comes back as ``{"type": "redirect", ..., "url"}``;
* the serialized response stays under ``RESPONSE_MAX_BYTES``: while it would not, the
  largest inline file goes to storage. The size measured is ``len(json.dumps(...))`` of
  what is actually returned (not ``sys.getsizeof``).
"""

from __future__ import annotations

import base64
import json
import logging
import mimetypes
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel

from config.settings import Settings
from services.storage.base import Storage

log = logging.getLogger(__name__)


@dataclass
class OutputFile:
    """A file an action produced, before the policy decides how it travels.

    Exactly one of ``data`` (bytes in memory) and ``path`` (a file in the job workspace)
    holds the content; ``key`` is set when the file is already in storage.
    """

    name: str
    size: int
    mime: str = "application/octet-stream"
    data: bytes | None = None
    path: Path | None = None
    key: str | None = None

    @classmethod
    def from_bytes(cls, name: str, data: bytes, mime: str | None = None, key: str | None = None) -> OutputFile:
        return cls(name=name, size=len(data), mime=mime or _guess_mime(name), data=data, key=key)

    @classmethod
    def from_path(cls, name: str, path: Path, mime: str | None = None, key: str | None = None) -> OutputFile:
        return cls(name=name, size=path.stat().st_size, mime=mime or _guess_mime(name), path=path, key=key)

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        if self.path is None:
            raise ValueError(f"output file {self.name} has neither data nor path")
        return self.path.read_bytes()


class Base64Output(BaseModel):
    type: Literal["base64"] = "base64"
    name: str
    mime: str
    size: int
    data: str
    key: str | None = None


class RedirectOutput(BaseModel):
    type: Literal["redirect"] = "redirect"
    name: str
    mime: str
    size: int
    key: str
    url: str
    expires_in: int


def _guess_mime(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def base64_length(size: int) -> int:
    """Length of the base64 text of ``size`` bytes."""
    return 4 * ((size + 2) // 3)


def find_output_files(value: Any) -> list[OutputFile]:
    """Every :class:`OutputFile` inside nested dicts and lists, in order."""
    if isinstance(value, OutputFile):
        return [value]
    if isinstance(value, dict):
        return [f for item in value.values() for f in find_output_files(item)]
    if isinstance(value, list | tuple):
        return [f for item in value for f in find_output_files(item)]
    return []


def _replace(value: Any, rendered: dict[int, dict[str, Any]]) -> Any:
    if isinstance(value, OutputFile):
        return rendered[id(value)]
    if isinstance(value, dict):
        return {k: _replace(v, rendered) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_replace(v, rendered) for v in value]
    return value


def response_size(response: dict[str, Any]) -> int:
    """Bytes of the JSON RunPod will post."""
    return len(json.dumps(response, separators=(",", ":")).encode()) + 64  # envelope: id, status


class OutputPolicy:
    """Renders a result's output files within the inline and response limits."""

    def __init__(self, storage: Storage, settings: Settings, job_id: str) -> None:
        self.storage = storage
        self.settings = settings
        self.job_id = job_id

    async def _redirect(self, item: OutputFile) -> dict[str, Any]:
        key = item.key
        if key is None:
            key = f"outputs/{self.job_id}/{item.name}"
            if item.path is not None:
                await self.storage.put_file(key, item.path, content_type=item.mime)
            else:
                await self.storage.put_bytes(key, item.read(), content_type=item.mime)
            item.key = key
        expires = self.settings.presign_expires
        url = await self.storage.presign_get(key, expires_in=expires)
        return RedirectOutput(
            name=item.name, mime=item.mime, size=item.size, key=key, url=url, expires_in=expires
        ).model_dump()

    @staticmethod
    def _inline(item: OutputFile) -> dict[str, Any]:
        data = base64.b64encode(item.read()).decode()
        return Base64Output(name=item.name, mime=item.mime, size=item.size, data=data, key=item.key).model_dump(
            exclude_none=True
        )

    async def render(self, result: dict[str, Any]) -> dict[str, Any]:
        """``result`` with every OutputFile replaced by its inline or redirect form."""
        files = find_output_files(result)
        rendered: dict[int, dict[str, Any]] = {}
        inline: list[OutputFile] = []
        for item in files:
            if item.size > self.settings.inline_max_bytes:
                rendered[id(item)] = await self._redirect(item)
            else:
                rendered[id(item)] = self._inline(item)
                inline.append(item)
        response = _replace(result, rendered)
        while inline and response_size(response) > self.settings.response_max_bytes:
            largest = max(inline, key=lambda f: f.size)
            inline.remove(largest)
            log.info(
                "job %s: response over %d bytes; sending %s (%d bytes) as a redirect",
                self.job_id,
                self.settings.response_max_bytes,
                largest.name,
                largest.size,
            )
            rendered[id(largest)] = await self._redirect(largest)
            response = _replace(result, rendered)
        return response
