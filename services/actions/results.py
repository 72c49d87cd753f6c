"""What each action returns: pydantic models, rendered by the output policy into the response.

Their JSON is the API's output contract (README examples). Files travel as
:class:`~services.output.files.OutputFile` fields; everything else is plain data.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field, model_serializer

from services.actions.caption_results import TrainingCaptions
from services.ingest.batch_upload import BatchResult
from services.output.files import OutputFile

__all__ = [
    "BatchResult",
    "DeleteFilesResult",
    "GenerateResult",
    "GetFileResult",
    "HealthResult",
    "ListFilesResult",
    "ListedFile",
    "LossCurve",
    "PresignResult",
    "PresignedUploadOut",
    "TrainLoraResult",
    "UploadResult",
]


class ListedFile(BaseModel):
    key: str = Field(description="Storage key.")
    name: str = Field(description="The key's last part.")
    size: int = Field(description="Bytes.")
    last_modified: str | None = Field(description="ISO 8601 time, when the store gives one.")


class ListFilesResult(BaseModel):
    prefix: str = Field(description="The prefix listed.")
    files: list[ListedFile] = Field(description="One page, in key order.")
    next_token: str | None = Field(description="Pass as token for the next page; null on the last page.")


class DeleteFilesResult(BaseModel):
    """``missing``: requested keys that did not exist (nothing to delete)."""

    deleted: list[str] = Field(description="Keys deleted.")
    missing: list[str] = Field(default_factory=list, description="Requested keys that did not exist.")
    failed: list[dict[str, str]] = Field(default_factory=list, description='{"key", "error"} per key not deleted.')
    partial: bool = Field(False, description="True when some keys failed (the job still completes).")
    summary: str = Field("", description="Counts, and the reasons when some failed.")


class UploadResult(BatchResult):
    """A batch where some files failed still completes: ``partial`` is true and ``summary`` names the failures."""

    partial: bool = Field(False, description="True when some files failed (the job still completes).")
    summary: str = Field("", description="Counts, and each failed file with its reason.")


class GetFileResult(BaseModel):
    file: OutputFile = Field(description="The object: inline when small, else a presigned URL.")


class PresignedUploadOut(BaseModel):
    name: str = Field(description="The file name asked for.")
    key: str = Field(description="Where the upload lands.")
    url: str = Field(description="Presigned URL: send the bytes with this method and these headers.")
    method: str = Field(description="HTTP method (PUT).")
    headers: dict[str, str] = Field(description="Headers the request must carry (Content-Type).")
    expires_in: int = Field(description="Seconds the URL stays valid.")


class PresignResult(BaseModel):
    dataset: str
    prefix: str = Field(description="datasets/<dataset>/")
    uploads: list[PresignedUploadOut] = Field(description="One per file, in input order.")


class HealthResult(BaseModel):
    status: str = Field(description="ok, or degraded when storage does not answer.")
    storage: dict[str, Any] = Field(description="Backend, bucket, breaker state, reachability.")
    gpu: dict[str, Any] = Field(description="Device, memory, loaded pipelines, compile warm-ups.")
    python: str
    packages: dict[str, str | None] = Field(description="Versions of the main packages.")
    limits: dict[str, int] = Field(
        description="Output and concurrency limits in force (INLINE_MAX_BYTES, MAX_CONCURRENCY, ...)."
    )
    model_id: str = Field(description="The default base model (MODEL_ID).")


class StoredSnapshot(BaseModel):
    """An intermediate LoRA kept by ``save_every``: storage keys (load one with generate's ``lora``)."""

    step: int
    lora: str | None = Field(description="Key of the LoRA file of this step (absent when pruned meanwhile).")
    samples: list[str] = Field(default_factory=list, description="Keys of its sample images.")


class LossCurve(BaseModel):
    """This run's training loss (a resumed run's starts after ``start_step``)."""

    steps: list[int] = Field(default_factory=list, description="The step of each point.")
    loss: list[float] = Field(
        default_factory=list, description="The loss at that step; the mean of the last `every` steps' losses."
    )
    ema: list[float] = Field(default_factory=list, description="The smoothed loss (EMA, 0.9) at that step.")
    every: int = Field(1, description="Steps per point: 1, or more when the run had over 500 steps.")
    start_step: int = Field(0, description="The step this run started from.")


class TrainLoraResult(BaseModel):
    lora: OutputFile = Field(
        description="The LoRA file (the first of export_formats), stored at loras/<output_name>/<output_name>"
        ".safetensors; what generate loads by name."
    )
    lora_format: str = Field("diffusers", description="The format of lora: kohya or diffusers.")
    samples: list[OutputFile] = Field(default_factory=list, description="sample_prompts rendered with the LoRA.")
    metrics: dict[str, Any] = Field(
        default_factory=dict,
        description="steps, final_loss, seconds, steps_per_second, buckets, resolution, rank, alpha, precision, ...",
    )
    resumed_from_step: int = Field(0, description="The checkpoint step this job resumed from; 0: from the start.")
    snapshots: list[StoredSnapshot] = Field(
        default_factory=list, description="The snapshots in storage (save_every, keep_last), oldest first."
    )
    kohya_lora: OutputFile | None = Field(
        None, description="The kohya copy (<output_name>.kohya.safetensors): kohya after another format."
    )
    diffusers_lora: OutputFile | None = Field(
        None, description="The diffusers copy (<output_name>.diffusers.safetensors): diffusers after another format."
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="Things to know about the result, e.g. a distilled base (FLUX.1-schnell, Z-Image-Turbo) "
        "trained without a training_adapter.",
    )
    captions: TrainingCaptions | None = Field(None, description="The captions trained on (README, Captions).")

    loss_curve: LossCurve = Field(default_factory=LossCurve, description="Per-step loss and its EMA.")
    sample_grid: OutputFile | None = Field(
        None,
        description="With save_every and sample_prompts: one PNG, a row per snapshot step and the final "
        "step, a column per prompt; stored at loras/<output_name>/<output_name>.samples.png.",
    )

    @model_serializer(mode="wrap")
    def _without_absent_files(self, handler: Any) -> dict[str, Any]:
        data = handler(self)
        for name in ("kohya_lora", "diffusers_lora", "sample_grid"):
            if getattr(self, name) is None:
                data.pop(name, None)
        return data


class GenerateResult(BaseModel):
    images: list[OutputFile] = Field(description="image-<i>.<format>, image i rendered with seed + i.")
    seed: int = Field(description="The seed of the first image (random when none was given).")
    steps: int = Field(description="Denoising steps used (the input's, else the model variant's default).")
    guidance_scale: float | None = Field(
        description="Guidance used (the input's, else the model variant's default); null: the pipeline takes none."
    )
    memory_plan: dict[str, Any] | None = Field(
        None,
        description="The memory plan on this GPU (quantize_base, cpu_offload, peak_gib, needed_gib; README, "
        "Memory plans); null on a CPU worker.",
    )
