"""The job API of the storage actions: one input model per action.

Accepted shapes (``{"input": {...}}``)::

    {"action": "upload_training_files", "dataset": "cats", "files": [{"name": "a.png", "data": "<base64>"}]}
    {"action": "presign_uploads", "dataset": "cats", "files": [{"name": "big.png", "content_type": "image/png"}]}
    {"action": "list_files", "dataset": "cats"}            or {"action": "list_files", "prefix": "loras/"}
    {"action": "delete_files", "keys": ["datasets/cats/a.png"]}  or {"action": "delete_files", "dataset": "cats"}
    {"action": "get_file", "key": "loras/my-lora/my-lora.safetensors"}
    {"action": "train_lora", ...}  {"action": "generate", ...}   (services/gpu/params.py)
    {"action": "health"}

Unknown fields are rejected. The union of these models and the coroutine of each action are
registered in :mod:`services.actions`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)

from services.errors import InputError
from services.ingest.batch_upload import FileSource, content_type_problem
from services.ingest.urls import Url
from services.storage.keys import managed_key, managed_prefix, safe_name

if TYPE_CHECKING:
    from config.settings import Settings

DatasetName = Annotated[str, AfterValidator(lambda value: safe_name(value, "dataset"))]


def _content_type(value: str | None) -> str | None:
    if value is not None and (problem := content_type_problem(value)):
        raise ValueError(problem)
    return value


# Sent as an HTTP header to storage: no line breaks (header injection), ASCII only.
ContentType = Annotated[str | None, AfterValidator(_content_type)]


class _Action(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def check_limits(self, settings: Settings) -> None:
        """Bounds from settings; raises InputError before any work starts."""


# A FileSource, so the batch upload takes these as they are (no second model per file).
class TrainingFileInput(FileSource):
    """One file of an upload: inline base64 ``data`` or a ``url`` to fetch (exactly one).

    Names are checked per file by the upload itself: a bad name fails that file only.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=1024, description="File name in the dataset: no separators, no '..', <= 255 bytes.")
    data: str | None = Field(None, description="File content, base64.")
    url: Url | None = Field(None, description="http(s) URL to download the file from.")
    content_type: ContentType = Field(None, max_length=255, description="MIME type; guessed from the name if absent.")


class UploadTrainingFilesInput(_Action):
    """Upload a batch of training files into ``datasets/<dataset>/``."""

    action: Literal["upload_training_files"]
    dataset: DatasetName = Field("default", description="Dataset name (letters, digits, '-', '_', '.').")
    files: list[TrainingFileInput] = Field(min_length=1, description="The files of the batch.")

    def check_limits(self, settings: Settings) -> None:
        if len(self.files) > settings.max_files_per_batch:
            raise InputError(
                f"input.files: {len(self.files)} files is over the limit of "
                f"{settings.max_files_per_batch} (MAX_FILES_PER_BATCH)"
            )
        total = 0
        for index, item in enumerate(self.files):
            size = len(item.data) * 3 // 4 if item.data else 0
            if size > settings.max_file_bytes:
                raise InputError(
                    f"input.files[{index}].data: about {size} bytes is over the limit of "
                    f"{settings.max_file_bytes} (MAX_FILE_BYTES)"
                )
            total += size
        if total > settings.max_batch_bytes:
            raise InputError(
                f"input.files: about {total} bytes in all is over the limit of "
                f"{settings.max_batch_bytes} (MAX_BATCH_BYTES)"
            )


class PresignFileInput(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=1024, description="File name in the dataset.")
    content_type: ContentType = Field(None, max_length=255, description="MIME type the client will send.")


class PresignUploadsInput(_Action):
    """Presigned PUT URLs for files a client sends straight to storage (datasets over 10 MB)."""

    action: Literal["presign_uploads"]
    dataset: DatasetName = Field("default", description="Dataset name.")
    files: list[PresignFileInput] = Field(min_length=1, description="Files to presign.")
    expires_in: int | None = Field(None, ge=1, le=604_800, description="URL lifetime in seconds.")

    def check_limits(self, settings: Settings) -> None:
        if len(self.files) > settings.max_files_per_batch:
            raise InputError(
                f"input.files: {len(self.files)} files is over the limit of "
                f"{settings.max_files_per_batch} (MAX_FILES_PER_BATCH)"
            )


class ListFilesInput(_Action):
    """List objects of a dataset or under a prefix, a page at a time."""

    action: Literal["list_files"]
    dataset: DatasetName | None = Field(None, description="Dataset name (lists datasets/<dataset>/).")
    prefix: str | None = Field(None, description="Key prefix inside datasets/, loras/ or outputs/.")
    limit: int = Field(1000, ge=1, le=10_000, description="Most objects returned.")
    token: str | None = Field(None, max_length=2048, description="next_token of the previous page.")

    @field_validator("prefix")
    @classmethod
    def _prefix(cls, value: str | None) -> str | None:
        return None if value is None else managed_prefix(value)

    @model_validator(mode="after")
    def _one_of(self) -> ListFilesInput:
        if (self.dataset is None) == (self.prefix is None):
            raise ValueError("give exactly one of dataset or prefix")
        return self


class DeleteFilesInput(_Action):
    """Delete keys, every object of a dataset, or a LoRA with its checkpoints and snapshots."""

    action: Literal["delete_files"]
    keys: list[str] | None = Field(
        None,
        min_length=1,
        max_length=10_000,
        description="Keys to delete; a trained LoRA's file (loras/<name>/<name>.safetensors) takes its "
        "training checkpoints with it.",
    )
    dataset: DatasetName | None = Field(None, description="Delete everything under datasets/<dataset>/.")
    lora: DatasetName | None = Field(
        None, description="Delete everything under loras/<lora>/: the LoRA, its checkpoints and snapshots."
    )

    @field_validator("keys")
    @classmethod
    def _keys(cls, value: list[str] | None) -> list[str] | None:
        return None if value is None else [managed_key(k) for k in value]

    @model_validator(mode="after")
    def _one_of(self) -> DeleteFilesInput:
        if sum(value is not None for value in (self.keys, self.dataset, self.lora)) != 1:
            raise ValueError("give exactly one of keys, dataset or lora")
        return self


class GetFileInput(_Action):
    """Return one stored object, inline when small or as a presigned URL."""

    action: Literal["get_file"]
    key: str = Field(description="Storage key, e.g. loras/my-lora/my-lora.safetensors.")

    @field_validator("key")
    @classmethod
    def _key(cls, value: str) -> str:
        return managed_key(value)


class HealthInput(_Action):
    """Backend, breaker state, GPU presence and package versions; never a secret."""

    action: Literal["health"]
