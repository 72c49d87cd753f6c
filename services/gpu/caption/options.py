"""Job inputs of captioning (pydantic; imports no torch).

``caption_dataset``::

    {"action": "caption_dataset", "dataset": "cats", "trigger_word": "sks", "detail": "detailed",
     "prefix": "a photo of", "suffix": "high quality", "overwrite": false, "max_length": 300}

``train_lora`` takes the same options (without ``action``/``dataset``/``trigger_word``) as
``"auto_caption": true`` or ``"auto_caption": {"detail": "detailed", ...}``.
"""

from __future__ import annotations

import unicodedata
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from services.errors import InputError
from services.storage.keys import safe_name

if TYPE_CHECKING:
    from config.settings import Settings

CaptionDetail = Literal["short", "detailed"]
TriggerPlacement = Literal["start", "end", "none"]
DEFAULT_MAX_LENGTH = 300


def one_line_text(value: str) -> str:
    """Caption text the user gives (trigger word, prefix, suffix): one line without control or
    invisible formatting characters (U+202E reverses how a caption reads, U+200B splits a tag
    unseen), stripped."""
    bad = next((c for c in value if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")), None)
    if bad is not None:
        raise ValueError(f"must be text on one line without control or invisible characters (found {bad!a})")
    return value.strip()


class CaptionOptions(BaseModel):
    """How captions are generated and written (``auto_caption`` of ``train_lora``)."""

    model_config = ConfigDict(extra="forbid")

    detail: CaptionDetail = Field(
        "short", description="short: one sentence; detailed: a paragraph (slower, longer prompts)."
    )
    trigger_placement: TriggerPlacement = Field(
        "start", description="Where the trigger_word goes: start ('sks, <caption>'), end, or none."
    )
    prefix: str = Field("", max_length=200, description="Text put before the generated caption.")
    suffix: str = Field("", max_length=200, description="Text put after the generated caption.")
    overwrite: bool = Field(False, description="Caption images that already have a .txt caption too (replaced).")
    max_length: int = Field(
        DEFAULT_MAX_LENGTH,
        ge=16,
        le=2000,
        description="Longest caption kept, in characters (trigger, prefix and suffix included); a longer "
        "one is cut at a word boundary. At most MAX_CAPTION_CHARS.",
    )
    batch_size: int | None = Field(
        None, ge=1, le=64, description="Images per captioning batch; default CAPTION_BATCH_SIZE."
    )

    @field_validator("prefix", "suffix")
    @classmethod
    def _text(cls, value: str) -> str:
        return one_line_text(value)

    def check_caption_limits(self, settings: Settings, field: str) -> None:
        if self.max_length > settings.max_caption_chars:
            raise InputError(
                f"input.{field}max_length: {self.max_length} is over MAX_CAPTION_CHARS ({settings.max_caption_chars})"
            )


class CaptionDatasetInput(CaptionOptions):
    """Caption the images of ``datasets/<dataset>/`` that have no ``.txt`` caption (all with
    ``overwrite``) with a vision-language model (``CAPTION_MODEL``); captions are written beside
    the images as ``<image stem>.txt`` and returned."""

    action: Literal["caption_dataset"]
    dataset: str = Field(description="Dataset name (datasets/<dataset>/).")
    trigger_word: str | None = Field(
        None, min_length=1, max_length=100, description="Put into every caption (see trigger_placement)."
    )

    @field_validator("dataset")
    @classmethod
    def _dataset(cls, value: str) -> str:
        return safe_name(value, "dataset")

    @field_validator("trigger_word")
    @classmethod
    def _trigger(cls, value: str | None) -> str | None:
        if value is not None and not one_line_text(value):
            raise ValueError("must be non-blank text on one line")
        return None if value is None else one_line_text(value)

    def check_limits(self, settings: Settings) -> None:
        self.check_caption_limits(settings, "")


def auto_caption_options(value: bool | CaptionOptions | None) -> CaptionOptions | None:
    """``train_lora``'s ``auto_caption``: ``true`` means the default options; false/absent: none."""
    if value is None or value is False:
        return None
    return CaptionOptions() if value is True else value
