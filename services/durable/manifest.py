"""What a checkpoint's manifest and pointer hold, parsed as untrusted input; the config hash.

A checkpoint comes back from shared storage, where anyone with the bucket's keys may have edited
it, so its JSON goes through strict schemas before anything uses it: a size cap before
``json.loads`` (so no deep nesting reaches the parser's recursion), exact types (no ``"1"`` for
an int, no ``null`` for a list), file names that are one plain path segment, steps within
bounds. Anything else is :class:`ManifestInvalid`; text that is not JSON at all (a cut write) is
:class:`ManifestUnparsable`, which readers treat as a missing pointer and scan the step folders.
:func:`corrupt` builds the one error a job reports for any damaged checkpoint.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from services.errors import CheckpointCorrupt
from services.storage.hashing import bytes_sha256
from services.storage.keys import checkpoint_step_prefix

CHECKPOINT_FORMAT = 1
POINTER_NAME = "latest.json"
MANIFEST_NAME = "state.json"
FINISHED_NAME = "finished.json"
MAX_MANIFEST_BYTES = 64 * 1024  # a real one is about 1 KiB: three files and a few numbers
MAX_STEP = 10_000_000
MAX_FILES = 64
MAX_KEPT = 100

FileName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")]
Sha256 = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
Step = Annotated[int, Field(ge=0, le=MAX_STEP)]

# The training inputs that change the trained weights, and so must match for a resume.
TRAINING_HASH_FIELDS: dict[str, str] = {
    "base_model": "the weights the LoRA is trained against",
    "dataset": "dataset_digest() of the images and their resolved captions (trigger word included): "
    "the content, not the dataset name or URL, so the same images resume and changed ones do not",
    "steps": "the total: an LR schedule over the run and the batch plan drawn up front depend on it, "
    "and the same input again must mean the same job",
    "rank": "the adapter's shape",
    "alpha": "the adapter's scale",
    "learning_rate": "the update size",
    "resolution": "the latents trained on",
    "batch_size": "the batch plan and the gradient",
    "gradient_accumulation": "the batch plan and the gradient",
    "seed": "the adapter's init, the batch order and the noise",
    "precision": "the arithmetic (resolved: bf16/fp16/fp32, so auto on another device does not match)",
    "cache_latents": "cached posteriors and per-batch VAE encodes round differently",
    "cache_text_embeddings": "cached and per-batch text encodes round differently",
    "lora_targets": "the adapter's layers",
    "timestep_sampling": "the noise levels trained on",
    "training_adapter": "sha256 of the LoRA merged into the base while training (null: none)",
    "caption_dropout": "the share of samples trained on the empty caption",
    "shuffle_caption": "the tag orders trained on",
    "keep_tokens": "the tags shuffle_caption keeps in place",
    "world_size": "the data-parallel ranks (gpus): the global batch and its split over the ranks",
}
# Left out on purpose: gradient_checkpointing and compile (the same math; changing them on resume
# is how a job gets past an out-of-memory or a slow warm-up), and everything about what is saved
# rather than learned: output_name, sample_prompts, sample_steps, export_formats,
# checkpoint_every, save_every, keep_last, keep_checkpoints.


class ManifestUnparsable(ValueError):
    """Not JSON at all: a write that was cut short on a store that does not replace whole objects."""


class ManifestInvalid(ValueError):
    """JSON, but not a manifest this worker wrote (edited, or another format)."""


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, no whitespace, no NaN)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return bytes_sha256(canonical.encode())


def training_config_hash(fields: Mapping[str, Any]) -> str:
    """:func:`config_hash` of exactly the :data:`TRAINING_HASH_FIELDS`, resolved (no defaults left)."""
    missing = sorted(set(TRAINING_HASH_FIELDS) - set(fields))
    extra = sorted(set(fields) - set(TRAINING_HASH_FIELDS))
    if missing or extra:
        raise ValueError(
            f"training config hash: missing {missing}, unknown {extra}; "
            "a new field that changes the weights belongs in TRAINING_HASH_FIELDS with its reason"
        )
    canonical = dict(fields)
    if canonical.get("world_size") == 1:  # one process hashes as before the field: its checkpoints resume
        del canonical["world_size"]
    return config_hash({"format": CHECKPOINT_FORMAT, **canonical})


def dataset_digest(examples: Iterable[tuple[str, str, str]]) -> str:
    """sha256 over ``(relative name, image sha256, caption)`` of every example, in name order."""
    return config_hash({"examples": sorted([list(example) for example in examples])})


def corrupt(output_name: str, step: int | None, detail: str) -> CheckpointCorrupt:
    """The one error for a damaged checkpoint: names the LoRA and step, and how to start over."""
    at = f"at step {step}" if step is not None else "(step unknown)"
    return CheckpointCorrupt(
        f"the stored checkpoint of {output_name} {at} is corrupt: {detail}; "
        "send overwrite: true to delete the checkpoints and start over"
    )


class _FileModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    name: FileName
    size: Annotated[int, Field(ge=0, le=1 << 40)]
    sha256: Sha256

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value in (MANIFEST_NAME, POINTER_NAME, FINISHED_NAME):
            raise ValueError(f"{value} is reserved")
        return value


class _ManifestModel(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    format: Literal[1]
    step: Step
    config_hash: Sha256
    files: Annotated[list[_FileModel], Field(min_length=1, max_length=MAX_FILES)]
    info: dict[str, Any] = Field(default_factory=dict)

    @field_validator("files")
    @classmethod
    def _unique(cls, value: list[_FileModel]) -> list[_FileModel]:
        if len({f.name for f in value}) != len(value):
            raise ValueError("file names repeat")
        return value


class _PointerModel(_ManifestModel):
    previous: Annotated[list[Step], Field(max_length=MAX_KEPT)]

    @field_validator("previous")
    @classmethod
    def _older(cls, value: list[int], info: Any) -> list[int]:
        step = info.data.get("step")
        if step is not None and any(s >= step for s in value):
            raise ValueError("names a step not older than the pointer's")
        return value


@dataclass(frozen=True)
class StoredFile:
    """One file of a checkpoint, as the manifest records it."""

    name: str
    size: int
    sha256: str


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: its step, config hash, files and the caller's ``info`` (JSON)."""

    output_name: str
    step: int
    config_hash: str
    files: tuple[StoredFile, ...]
    info: Mapping[str, Any] = field(default_factory=dict)

    @property
    def prefix(self) -> str:
        return checkpoint_step_prefix(self.output_name, self.step)

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def key(self, name: str) -> str:
        return self.prefix + name

    def manifest(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "config_hash": self.config_hash,
            "files": [{"name": f.name, "size": f.size, "sha256": f.sha256} for f in self.files],
            "info": dict(self.info),
        }


def _load(raw: bytes) -> Any:
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestInvalid(f"{len(raw)} bytes, more than the {MAX_MANIFEST_BYTES} a manifest may hold")
    try:
        return json.loads(raw)
    except RecursionError:
        raise ManifestInvalid("nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ManifestUnparsable(f"not JSON ({exc})") from None


def _validated(model: type[_ManifestModel], data: Any) -> _ManifestModel:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "top level"
        raise ManifestInvalid(f"{where}: {first['msg']} ({exc.error_count()} problems)") from None
    except RecursionError:
        raise ManifestInvalid("nested too deeply") from None


def _checkpoint(output_name: str, parsed: _ManifestModel) -> Checkpoint:
    files = tuple(StoredFile(f.name, f.size, f.sha256) for f in parsed.files)
    return Checkpoint(output_name, parsed.step, parsed.config_hash, files, parsed.info)


def parse_manifest(output_name: str, raw: bytes) -> Checkpoint:
    """A step folder's ``state.json``; :class:`ManifestUnparsable` / :class:`ManifestInvalid`."""
    return _checkpoint(output_name, _validated(_ManifestModel, _load(raw)))


def parse_pointer(output_name: str, raw: bytes) -> tuple[Checkpoint, list[int]]:
    """``latest.json``: the newest checkpoint and the older kept steps, newest first."""
    parsed = _validated(_PointerModel, _load(raw))
    assert isinstance(parsed, _PointerModel)
    return _checkpoint(output_name, parsed), sorted(set(parsed.previous), reverse=True)
