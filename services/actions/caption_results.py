"""What captioning returns: ``caption_dataset``'s result and ``train_lora``'s ``captions``."""

from __future__ import annotations

from pydantic import BaseModel, Field

from services.output.files import OutputFile

INLINE_CAPTIONS = 200  # more captions than this: the full list goes in captions_file


class CaptionEntry(BaseModel):
    image: str = Field(description="The image's file name in the dataset.")
    key: str | None = Field(description="Where it is stored: datasets/<dataset>/<stem>.txt; null: not stored.")
    caption: str


class CaptionProblem(BaseModel):
    image: str = Field(description="The image's file name.")
    reason: str


class CaptionDatasetResult(BaseModel):
    """A run where some images failed still completes: ``partial`` is true and ``failed`` names them."""

    dataset: str
    model: str = Field(description="The captioning model (CAPTION_MODEL).")
    captions: list[CaptionEntry] = Field(
        description="The captions written, in image order (the first 200; all of them are in captions_file)."
    )
    captions_file: OutputFile | None = Field(
        None, description="captions.json with every caption, when there are more than 200 (output policy)."
    )
    skipped: list[CaptionProblem] = Field(
        default_factory=list, description="Images left as they were: they already had a caption (overwrite: false)."
    )
    failed: list[CaptionProblem] = Field(
        default_factory=list, description="Images that got no caption: not decodable, or the model's caption refused."
    )
    partial: bool = Field(False, description="True when some images failed.")
    seconds: float = Field(0.0, description="Captioning time, the model load included.")
    images_per_second: float | None = Field(None, description="Captioned images per second, the model load excluded.")


class TrainingCaptions(BaseModel):
    """The captions a training run used, recorded in storage (their hash is in the config hash)."""

    record: str | None = Field(description="Key of loras/<output_name>/captions.json: every image with its caption.")
    dataset_digest: str = Field(description="sha256 over the images and the captions trained on.")
    generated: list[CaptionEntry] = Field(default_factory=list, description="The captions auto_caption wrote.")
    failed: list[CaptionProblem] = Field(
        default_factory=list, description="Images auto_caption could not caption (trained on the fallback caption)."
    )
