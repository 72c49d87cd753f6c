"""What each action returns: pydantic models, rendered by the output policy into the response.

Their JSON is the API's output contract (README examples). Files travel as
:class:`~services.outputs.OutputFile` fields; everything else is plain data.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_serializer

from services.batch_upload import BatchResult
from services.outputs import OutputFile

__all__ = [
    "BatchResult",
    "DeleteFilesResult",
    "GenerateResult",
    "GetFileResult",
    "HealthResult",
    "ListFilesResult",
    "ListedFile",
    "PresignResult",
    "PresignedUploadOut",
    "TrainLoraResult",
    "UploadResult",
]


class ListedFile(BaseModel):
    key: str
    name: str
    size: int
    last_modified: str | None


class ListFilesResult(BaseModel):
    prefix: str
    files: list[ListedFile]
    next_token: str | None


class DeleteFilesResult(BaseModel):
    """``missing``: requested keys that did not exist (nothing to delete)."""

    deleted: list[str]
    missing: list[str] = Field(default_factory=list)
    failed: list[dict[str, str]] = Field(default_factory=list)
    partial: bool = False
    summary: str = ""


class UploadResult(BatchResult):
    """A batch where some files failed still completes: ``partial`` is true and ``summary`` names the failures."""

    partial: bool = False
    summary: str = ""


class GetFileResult(BaseModel):
    file: OutputFile


class PresignedUploadOut(BaseModel):
    name: str
    key: str
    url: str
    method: str
    headers: dict[str, str]
    expires_in: int


class PresignResult(BaseModel):
    dataset: str
    prefix: str
    uploads: list[PresignedUploadOut]


class HealthResult(BaseModel):
    status: str
    storage: dict[str, Any]
    gpu: dict[str, Any]
    python: str
    packages: dict[str, str | None]
    limits: dict[str, int]
    model_id: str


class StoredSnapshot(BaseModel):
    """An intermediate LoRA kept by ``save_every``: storage keys (load one with generate's ``lora``)."""

    step: int
    lora: str | None = Field(description="Key of the LoRA file of this step (absent when pruned meanwhile).")
    samples: list[str] = Field(default_factory=list, description="Keys of its sample images.")


class TrainLoraResult(BaseModel):
    lora: OutputFile
    samples: list[OutputFile] = Field(default_factory=list)
    metrics: dict[str, Any] = Field(default_factory=dict)
    resumed_from_step: int = Field(0, description="The checkpoint step this job resumed from; 0: from the start.")
    snapshots: list[StoredSnapshot] = Field(
        default_factory=list, description="The snapshots in storage (save_every, keep_last), oldest first."
    )
    kohya_lora: OutputFile | None = None

    @model_serializer(mode="wrap")
    def _without_absent_kohya(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        if self.kohya_lora is None:
            data.pop("kohya_lora", None)
        return data


class GenerateResult(BaseModel):
    images: list[OutputFile]
    seed: int
