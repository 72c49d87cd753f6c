"""Worker settings, read once from the environment and an optional ``.env`` file.

Every variable is documented in ``.env.example`` and the README's configuration table.
A bad value stops start-up with a message that names the variable and what is allowed
(see :func:`load_settings`). Secrets are ``SecretStr`` so they never print.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MAX_PRESIGN_SECONDS = 604_800  # S3 SigV4 limit (7 days); botocore does not enforce it.


class ConfigError(SystemExit):
    """Raised at start-up for a bad setting; exits non-zero with a readable message."""


class Settings(BaseSettings):
    """All configuration of the worker. Build with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        populate_by_name=True,
        env_ignore_empty=True,
    )

    # --- S3-compatible storage (the S3 backend is used when S3_BUCKET is set) ---
    s3_bucket: str | None = Field(None, description="Bucket name; unset means the local backend.")
    s3_endpoint_url: str | None = Field(
        None,
        validation_alias=AliasChoices("S3_ENDPOINT_URL", "BUCKET_ENDPOINT_URL"),
        description="Endpoint of an S3-compatible store (R2, B2, MinIO); unset for AWS.",
    )
    s3_region: str | None = Field(None, description="Region (R2: auto; B2: as in the endpoint).")
    aws_access_key_id: SecretStr | None = Field(
        None, validation_alias=AliasChoices("AWS_ACCESS_KEY_ID", "BUCKET_ACCESS_KEY_ID")
    )
    aws_secret_access_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("AWS_SECRET_ACCESS_KEY", "BUCKET_SECRET_ACCESS_KEY")
    )
    aws_session_token: SecretStr | None = None
    s3_addressing_style: Literal["auto", "path", "virtual"] = "auto"
    s3_checksum: Literal["when_required", "when_supported"] = Field(
        "when_required",
        description="botocore request/response checksum mode; R2 and B2 need when_required.",
    )
    s3_object_checksum: bool = Field(
        True, description="Send each object's sha256 as its S3 checksum (x-amz-checksum-sha256)."
    )
    s3_max_attempts: int = Field(3, ge=1, le=20, description="botocore total_max_attempts (standard mode).")
    s3_breaker_fail_max: int = Field(5, ge=1, le=1000)
    s3_breaker_reset_timeout: float = Field(30.0, gt=0, le=3600)
    s3_connect_timeout: float = Field(5.0, gt=0, le=300)
    s3_read_timeout: float = Field(60.0, gt=0, le=3600)
    s3_operation_timeout: float = Field(
        15.0, gt=0, le=3600, description="Deadline in seconds for one S3 call, botocore's retries included."
    )
    multipart_threshold: int = Field(8 * 1024 * 1024, ge=5 * 1024 * 1024, le=5 * 1024**3)
    multipart_chunk_size: int = Field(8 * 1024 * 1024, ge=5 * 1024 * 1024, le=5 * 1024**3)
    upload_concurrency: int = Field(16, ge=1, le=256)
    presign_expires: int = Field(3600, ge=1, le=MAX_PRESIGN_SECONDS)
    storage_dir: Path = Field(Path("./storage"), description="Root of the local backend.")

    # --- outputs and handler ---
    inline_max_bytes: int = Field(5 * 1024 * 1024, ge=0, le=20 * 1024 * 1024)
    response_max_bytes: int = Field(9 * 1024 * 1024, ge=1024, le=20 * 1024 * 1024)
    max_concurrency: int = Field(4, ge=1, le=64)
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    work_dir: Path | None = Field(None, description="Parent of per-job workspaces (default: system temp).")
    job_timeout: float = Field(
        3300.0, ge=0, le=7 * 24 * 3600, description="Deadline of every job in seconds; 0 means none."
    )
    runpod_webhook_post_output: str | None = Field(
        None, repr=False, description="Set by RunPod on its workers; progress updates are sent only there."
    )

    # --- input bounds ---
    max_files_per_batch: int = Field(1000, ge=1, le=100_000)
    max_file_bytes: int = Field(50 * 1024 * 1024, ge=1)
    max_batch_bytes: int = Field(200 * 1024 * 1024, ge=1)
    max_dataset_files: int = Field(10_000, ge=1, le=1_000_000, description="Most objects in a stored dataset.")
    max_dataset_bytes: int = Field(2 * 1024**3, ge=1, description="Most bytes a stored dataset may download.")
    max_download_bytes: int = Field(100 * 1024 * 1024, ge=1)
    download_connect_timeout: float = Field(5.0, gt=0, le=120)
    download_read_timeout: float = Field(30.0, gt=0, le=600)
    download_concurrency: int = Field(4, ge=1, le=64, description="URL downloads one upload job runs at once.")
    download_total_timeout: float = Field(300.0, gt=0, le=3600, description="Whole-download deadline in seconds.")
    allow_private_urls: bool = Field(False, description="Allow URL inputs to private hosts (tests only).")
    max_zip_entries: int = Field(10_000, ge=1)
    max_zip_uncompressed_bytes: int = Field(1024**3, ge=1)
    max_zip_ratio: float = Field(200.0, gt=1)
    max_image_pixels: int = Field(2048 * 2048, ge=64 * 64)
    max_train_steps: int = Field(10_000, ge=1)
    max_gen_steps: int = Field(150, ge=1)
    max_images_per_request: int = Field(8, ge=1, le=64)
    max_caption_chars: int = Field(
        2000, ge=1, le=100_000, description="Longest training caption (.txt) accepted, in characters."
    )

    # --- GPU runner ---
    model_id: str = Field("builtin:tiny-sd", description="Default base model.")
    model_cache_size: int = Field(1, ge=1, le=16, description="Pipelines kept loaded per worker.")
    compile: bool | None = Field(None, description="torch.compile the UNet; default on with CUDA, off on CPU.")
    hf_home: Path | None = None
    caption_model: str = Field(
        "florence-community/Florence-2-base",
        description="Captioning VLM (caption_dataset, auto_caption): a cached repo id, a directory or "
        "builtin:tiny-florence2.",
    )
    caption_batch_size: int = Field(8, ge=1, le=64, description="Images per captioning batch.")
    torchinductor_cache_dir: Path | None = Field(
        None, description="torch.compile cache folder; default: on the network volume when mounted."
    )
    checkpoint_every: int = Field(
        250, ge=1, le=100_000, description="Training checkpoint interval in steps (a job's checkpoint_every wins)."
    )
    checkpoint_minutes: float = Field(
        10.0, gt=0, le=24 * 60, description="A checkpoint at least this often (minutes), whatever the step interval."
    )
    train_cpu_ranks: int = Field(
        1,
        ge=1,
        le=8,
        description="Processes a CPU worker trains on (gloo): emulates a multi-GPU worker for tests; 1: one process.",
    )
    rank_timeout: float = Field(
        600.0, ge=10, le=7200, description="Seconds a training rank waits for another in a collective before failing."
    )
    warm_model: str | None = Field(
        None, description="A model (MODEL_ID value) loaded at worker start, before the first job; unset: none."
    )
    max_checkpoint_bytes: int = Field(
        20 * 1024**3, ge=1, description="Most bytes a training checkpoint to resume from may download."
    )
    max_lora_bytes: int = Field(
        4 * 1024**3, ge=1, description="Most bytes a stored LoRA (generate's lora input) may download."
    )
    lease_seconds: float = Field(
        600.0,
        ge=30,
        le=24 * 3600,
        description="How long a training job's claim on its output_name lasts unless renewed (every third of it).",
    )
    checkpoint_deadline_margin: float = Field(
        60.0, ge=0, le=3600, description="Training stops this many seconds before JOB_TIMEOUT to save a checkpoint."
    )

    @field_validator("s3_bucket", "s3_endpoint_url", "s3_region", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("aws_access_key_id", "aws_secret_access_key", "aws_session_token", mode="before")
    @classmethod
    def _empty_secret_is_unset(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("s3_region")
    @classmethod
    def _region_is_a_name(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,62}", value):
            raise ValueError("must be a region name such as us-east-1 or auto (lowercase letters, digits, '-')")
        return value

    @field_validator("s3_endpoint_url")
    @classmethod
    def _endpoint_is_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return value

    @property
    def backend(self) -> Literal["s3", "local"]:
        """``s3`` when a bucket is configured, ``local`` otherwise."""
        return "s3" if self.s3_bucket else "local"

    def secret_values(self) -> list[str]:
        """Configured secret values, for log redaction."""
        secrets = (self.aws_access_key_id, self.aws_secret_access_key, self.aws_session_token)
        return [s.get_secret_value() for s in secrets if s is not None and s.get_secret_value()]


def format_settings_error(error: ValidationError) -> str:
    """One line per bad variable: ``S3_CHECKSUM: Input should be 'when_required' or ...``."""
    lines = []
    for item in error.errors():
        name = str(item["loc"][0]).upper() if item["loc"] else "settings"
        secret = any(word in name for word in ("KEY", "SECRET", "TOKEN"))
        got = "" if secret else f" (got {item.get('input')!r})"
        lines.append(f"{name}: {item['msg']}{got}")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def build_settings(**overrides: object) -> Settings:
    """Build settings, turning a validation error into :class:`ConfigError` (no traceback)."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(format_settings_error(exc)) from None


@lru_cache(maxsize=1)
def load_settings() -> Settings:
    """The worker's settings, built once per process."""
    return build_settings()
