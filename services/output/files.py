"""Output files and the storage I/O that carries out the output plan (:mod:`services.output.plan`).

An action returns a pydantic result model whose fields may hold :class:`OutputFile` values
(alone, in lists, or in nested models). :class:`OutputPolicy` finds them by walking the model's
fields, asks the plan which travel inline (``{"type": "base64", ...}``) and which as a
presigned redirect (``{"type": "redirect", ..., "url"}``, stored under ``outputs/<job id>/``
unless already stored, like a LoRA), and returns the response dict. The size checked is
``len(json.dumps(...))`` of what is actually returned. Every number in a response is finite
(strict JSON): a NaN or infinity anywhere fails the job with :class:`ResultNotJson`.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import mimetypes
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_serializer

from config.settings import Settings
from services.errors import ResultNotJson
from services.output.plan import Delivery, initial_plan, shrink_plan
from services.storage.base import Storage
from services.storage.keys import output_key

log = logging.getLogger(__name__)


class Base64Output(BaseModel):
    """A file returned inline: its bytes base64-encoded in ``data``."""

    type: Literal["base64"] = "base64"
    name: str
    mime: str
    size: int
    data: str
    key: str | None = None


class RedirectOutput(BaseModel):
    """A file returned by reference: stored at ``key``, fetched from the presigned ``url``."""

    type: Literal["redirect"] = "redirect"
    name: str
    mime: str
    size: int
    key: str
    url: str
    expires_in: int


class OutputFile(BaseModel):
    """A file an action produced, before the policy decides how it travels.

    Exactly one of ``data`` (bytes in memory) and ``path`` (a file in the job workspace)
    holds the content; ``key`` is set when the file is already in storage. It serializes as
    its ``delivery``, which the policy sets.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    size: int
    mime: str = "application/octet-stream"
    data: bytes | None = None
    path: Path | None = None
    key: str | None = None
    delivery: Base64Output | RedirectOutput | None = None

    @classmethod
    def from_bytes(cls, name: str, data: bytes, mime: str | None = None, key: str | None = None) -> OutputFile:
        """An output held in memory (the MIME type guessed from ``name`` when not given)."""
        return cls(name=name, size=len(data), mime=mime or _guess_mime(name), data=data, key=key)

    @classmethod
    def from_path(cls, name: str, path: Path, mime: str | None = None, key: str | None = None) -> OutputFile:
        """An output in a workspace file (read only if the policy sends it inline)."""
        return cls(name=name, size=path.stat().st_size, mime=mime or _guess_mime(name), path=path, key=key)

    def read(self) -> bytes:
        """The content, from memory or from the file."""
        if self.data is not None:
            return self.data
        if self.path is None:
            raise ValueError(f"output file {self.name} has neither data nor path")
        return self.path.read_bytes()

    @model_serializer
    def _as_delivered(self) -> dict[str, Any]:
        if self.delivery is None:
            raise ValueError(f"output file {self.name} was not rendered by the output policy")
        return self.delivery.model_dump(exclude_none=True)


def _guess_mime(name: str) -> str:
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


def output_files(value: Any) -> Iterator[OutputFile]:
    """Every :class:`OutputFile` in a result model's fields (nested models and lists included)."""
    if isinstance(value, OutputFile):
        yield value
    elif isinstance(value, BaseModel):
        for name in type(value).model_fields:
            yield from output_files(getattr(value, name))
    elif isinstance(value, list | tuple):
        for item in value:
            yield from output_files(item)


def non_finite(value: Any, where: str = "output") -> str | None:
    """The path of the first NaN or infinite number in ``value`` (strict JSON has none), or None."""
    if isinstance(value, float) and not math.isfinite(value):
        return where
    if isinstance(value, dict):
        items = ((f"{where}.{key}", item) for key, item in value.items())
    elif isinstance(value, list | tuple):
        items = ((f"{where}[{index}]", item) for index, item in enumerate(value))
    else:
        return None
    return next((found for path, item in items if (found := non_finite(item, path)) is not None), None)


def response_size(response: dict[str, Any]) -> int:
    """Bytes of the JSON RunPod will post."""
    return len(json.dumps(response, separators=(",", ":")).encode()) + 64  # envelope: id, status


class OutputPolicy:
    """Renders a result's output files within the inline and response limits."""

    def __init__(self, storage: Storage, settings: Settings, job_id: str) -> None:
        self.storage = storage
        self.settings = settings
        self.job_id = job_id

    async def _redirect(self, item: OutputFile) -> RedirectOutput:
        key = item.key
        if key is None:
            key = output_key(self.job_id, item.name)
            if item.path is not None:
                await self.storage.put_file(key, item.path, content_type=item.mime)
            else:
                await self.storage.put_bytes(key, item.read(), content_type=item.mime)
            item.key = key
        expires = self.settings.presign_expires
        url = await self.storage.presign_get(key, expires_in=expires)
        return RedirectOutput(name=item.name, mime=item.mime, size=item.size, key=key, url=url, expires_in=expires)

    @staticmethod
    def _inline(item: OutputFile) -> Base64Output:
        data = base64.b64encode(item.read()).decode()
        return Base64Output(name=item.name, mime=item.mime, size=item.size, data=data, key=item.key)

    async def _carry_out(self, files: list[OutputFile], plan: list[Delivery]) -> None:
        for item, delivery in zip(files, plan, strict=True):
            if delivery == "redirect" and not isinstance(item.delivery, RedirectOutput):
                item.delivery = await self._redirect(item)
            elif delivery == "inline" and item.delivery is None:
                item.delivery = self._inline(item)

    async def render(self, result: BaseModel) -> dict[str, Any]:
        """``result`` as the response dict, every OutputFile in its inline or redirect form."""
        files = list(output_files(result))
        sizes = [f.size for f in files]
        plan = initial_plan(sizes, self.settings.inline_max_bytes)
        await self._carry_out(files, plan)
        response = result.model_dump()
        if (where := non_finite(response)) is not None:
            raise ResultNotJson(f"the result holds a non-finite number at {where}; it is not valid JSON")
        while "inline" in plan and (excess := response_size(response) - self.settings.response_max_bytes) > 0:
            new = shrink_plan(sizes, plan, excess)
            moved = [f"{f.name} ({f.size} bytes)" for f, old, d in zip(files, plan, new, strict=True) if old != d]
            log.info(
                "job %s: response over %d bytes; sending %s as redirects",
                self.job_id,
                self.settings.response_max_bytes,
                ", ".join(moved),
            )
            plan = new
            await self._carry_out(files, plan)
            response = result.model_dump()
        if response_size(response) > self.settings.response_max_bytes:
            return await self._truncated(response)
        return response

    async def _truncated(self, response: dict[str, Any]) -> dict[str, Any]:
        """An over-size response (long lists) stored whole as ``outputs/<job id>/result.json``.

        What is returned keeps every field, each top-level list cut to its first items (as many
        as fit), plus ``truncated: true``, ``counts`` (each list's full length) and
        ``result_file`` (a redirect to the whole result; ``get_file`` returns it too).
        """
        data = json.dumps(response, separators=(",", ":")).encode()
        stored = await self._redirect(OutputFile.from_bytes("result.json", data, "application/json"))
        lists = [name for name, value in response.items() if isinstance(value, list)]
        keep = max((len(response[name]) for name in lists), default=0)
        while True:
            keep //= 2
            summary = {name: value[:keep] if name in lists else value for name, value in response.items()}
            summary |= {
                "truncated": True,
                "counts": {name: len(response[name]) for name in lists},
                "result_file": stored.model_dump(),
            }
            if keep == 0 or response_size(summary) <= self.settings.response_max_bytes:
                break
        log.info(
            "job %s: response of %d bytes over %d; stored whole as %s, lists cut to %d items",
            self.job_id,
            len(data),
            self.settings.response_max_bytes,
            stored.key,
            keep,
        )
        return summary
