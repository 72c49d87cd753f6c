"""The shapes the client reads from responses, checked before use.

A field of the wrong type raises :class:`BadResponse` (a :class:`ClientError`) naming the
field, never ``AttributeError`` or ``TypeError`` from deep inside the client. No pydantic: the
installed client depends on ``requests`` and ``tqdm`` only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from client.errors import BadResponse
from client.names import local_name

FILE_TYPES = ("base64", "redirect")


def _shown(value: Any) -> str:
    return repr(value)[:120]


def obj(value: Any, what: str) -> dict[str, Any]:
    """``value`` when it is a JSON object."""
    if not isinstance(value, dict):
        raise BadResponse(f"{what}: expected an object, got {_shown(value)}")
    return value


def objects(value: Any, what: str) -> list[dict[str, Any]]:
    """A list of objects; a missing (``None``) list is empty."""
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadResponse(f"{what}: expected a list, got {_shown(value)}")
    return [obj(item, f"{what}[{index}]") for index, item in enumerate(value)]


def texts(value: Any, what: str) -> list[str]:
    """A list of strings; a missing list is empty."""
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise BadResponse(f"{what}: expected a list of strings, got {_shown(value)}")
    return value


def text(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise BadResponse(f"{what}: expected a string, got {_shown(value)}")
    return value


def optional_text(value: Any, what: str) -> str | None:
    return None if value is None else text(value, what)


def optional_int(value: Any, what: str) -> int | None:
    """An integer (not a bool) or ``None``."""
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise BadResponse(f"{what}: expected an integer, got {_shown(value)}")
    return value


def string_map(value: Any, what: str) -> dict[str, str]:
    """An object of strings (HTTP headers); a missing one is empty."""
    if value is None:
        return {}
    mapping = obj(value, what)
    if not all(isinstance(v, str) for v in mapping.values()):
        raise BadResponse(f"{what}: expected string values, got {_shown(value)}")
    return dict(mapping)


@dataclass(frozen=True)
class CaptionReport:
    """A ``caption_dataset`` answer: the captions written (``image``, ``key``, ``caption``), the
    images skipped (they had one) and failed (``image``, ``reason``), and the full list's file
    when the worker sent it apart (over 200 captions)."""

    captions: list[dict[str, Any]]
    skipped: list[dict[str, Any]]
    failed: list[dict[str, Any]]
    partial: bool
    captions_file: OutputFile | None


def caption_report(value: Any, what: str) -> CaptionReport:
    fields = obj(value, what)
    captions = objects(fields.get("captions"), f"{what}.captions")
    for index, entry in enumerate(captions):
        text(entry.get("image"), f"{what}.captions[{index}].image")
        text(entry.get("caption"), f"{what}.captions[{index}].caption")
        optional_text(entry.get("key"), f"{what}.captions[{index}].key")
    problems = {}
    for kind in ("skipped", "failed"):
        problems[kind] = objects(fields.get(kind), f"{what}.{kind}")
        for index, entry in enumerate(problems[kind]):
            text(entry.get("image"), f"{what}.{kind}[{index}].image")
            text(entry.get("reason"), f"{what}.{kind}[{index}].reason")
    partial = fields.get("partial", False)
    if not isinstance(partial, bool):
        raise BadResponse(f"{what}.partial: expected true or false, got {_shown(partial)}")
    file = fields.get("captions_file")
    return CaptionReport(
        captions=captions,
        skipped=problems["skipped"],
        failed=problems["failed"],
        partial=partial,
        captions_file=None if file is None else output_file(file, f"{what}.captions_file"),
    )


@dataclass(frozen=True)
class MemoryPlan:
    """A ``dry_run`` answer: whether the job fits the card, the plan, and every rented card's."""

    fits: bool | None
    card_gib: float | None
    plan: dict[str, Any] | None
    message: str
    cards: dict[str, dict[str, Any]]


def memory_plan(value: Any, what: str) -> MemoryPlan:
    fields = obj(value, what)
    if fields.get("dry_run") is not True:
        raise BadResponse(f"{what}: not a dry-run answer (dry_run is {_shown(fields.get('dry_run'))})")
    fits, card = fields.get("fits"), fields.get("card_gib")
    if fits is not None and not isinstance(fits, bool):
        raise BadResponse(f"{what}.fits: expected true, false or null, got {_shown(fits)}")
    if card is not None and (not isinstance(card, int | float) or isinstance(card, bool)):
        raise BadResponse(f"{what}.card_gib: expected a number, got {_shown(card)}")
    plan = fields.get("plan")
    cards = obj(fields.get("cards") or {}, f"{what}.cards")
    return MemoryPlan(
        fits=fits,
        card_gib=card,
        plan=None if plan is None else obj(plan, f"{what}.plan"),
        message=optional_text(fields.get("message"), f"{what}.message") or "",
        cards={name: obj(card_plan, f"{what}.cards.{name}") for name, card_plan in cards.items()},
    )


@dataclass(frozen=True)
class OutputFile:
    """One output file: ``{"type": "base64", "data"}`` or ``{"type": "redirect", "url"}``."""

    type: str
    name: str
    size: int | None
    data: str = ""
    url: str = ""
    key: str | None = None


def output_file(value: Any, what: str) -> OutputFile:
    """An output file with a safe local ``name`` (:func:`client.names.local_name`)."""
    fields = obj(value, what)
    kind = fields.get("type")
    if kind not in FILE_TYPES:
        raise BadResponse(f"{what}: unknown output file type {_shown(kind)} (expected base64 or redirect)")
    size = optional_int(fields.get("size"), f"{what}.size")
    if size is not None and size < 0:
        raise BadResponse(f"{what}.size: {size} is negative")
    return OutputFile(
        type=kind,
        name=local_name(fields.get("name")),
        size=size,
        data=text(fields.get("data"), f"{what}.data") if kind == "base64" else "",
        url=text(fields.get("url"), f"{what}.url") if kind == "redirect" else "",
        key=optional_text(fields.get("key"), f"{what}.key"),
    )


@dataclass(frozen=True)
class PresignedUpload:
    """One entry of ``presign_uploads``: where to send a file."""

    name: str
    url: str
    method: str
    headers: dict[str, str]
    key: str | None


def presigned_upload(value: Any, what: str) -> PresignedUpload:
    fields = obj(value, what)
    return PresignedUpload(
        name=text(fields.get("name"), f"{what}.name"),
        url=text(fields.get("url"), f"{what}.url"),
        method=(optional_text(fields.get("method"), f"{what}.method") or "PUT").upper(),
        headers=string_map(fields.get("headers"), f"{what}.headers"),
        key=optional_text(fields.get("key"), f"{what}.key"),
    )
