"""Training checkpoints in storage: complete before referenced, verified when read, pruned after.

Layout under ``loras/<output_name>/checkpoints/``::

    step-00000200/lora.safetensors     the files the trainer wrote (any simple names)
    step-00000200/trainer.json
    step-00000200/state.json           the manifest: step, config hash, size and sha256 of each file
    latest.json                        the pointer: the newest manifest plus the older steps kept

Saving uploads every file, checks each with ``head`` (size, and the sha256 the backend stored),
uploads the manifest, and only then writes the pointer. A PUT replaces an object atomically, so
a save that fails at any point leaves the previous pointer, which names only verified files;
the failure is a :class:`~services.errors.CheckpointUploadFailed` naming the key, for the caller
to log before training goes on. Step folders that no pointer names (a failed save's partial
files, steps past a rewind) are deleted by the next successful save, after its pointer is
written, together with all but the newest ``keep`` checkpoints.

Reading (:meth:`CheckpointStore.latest`) returns the pointer's checkpoint only when every file
it names exists with the recorded size and sha256; otherwise it falls back to the older kept
steps, newest first, and raises :class:`~services.errors.CheckpointCorrupt` (listing what is
wrong) when none is complete. :meth:`CheckpointStore.download` hashes what it downloads.

Only :class:`~services.storage.Storage` calls are used (``put_file``, ``put_bytes``,
``get_bytes``, ``download_file``, ``head``, ``iter_objects``, ``delete_many``); no torch here.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.errors import (
    CheckpointCorrupt,
    CheckpointError,
    CheckpointUploadFailed,
    ObjectNotFound,
    StorageError,
)
from services.storage.base import DeleteResult, Storage

log = logging.getLogger(__name__)

LORA_ROOT = "loras"
CHECKPOINT_FORMAT = 1
POINTER_NAME = "latest.json"
MANIFEST_NAME = "state.json"
DEFAULT_KEEP = 2  # the newest plus one to fall back to if the newest is damaged in storage
READ_CHUNK = 1024 * 1024
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_STEP_FOLDER = re.compile(r"step-(\d{8})/")

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
}
# Left out on purpose: gradient_checkpointing and compile (the same math; changing them on resume
# is how a job gets past an out-of-memory or a slow warm-up), and everything about what is saved
# rather than learned: output_name, sample_prompts, sample_steps, export_formats,
# checkpoint_every, save_every, keep_last, keep_checkpoints.


def lora_prefix(output_name: str) -> str:
    """``loras/<output_name>/``: everything stored for one LoRA."""
    return f"{LORA_ROOT}/{output_name}/"


def checkpoints_prefix(output_name: str) -> str:
    return f"{lora_prefix(output_name)}checkpoints/"


def step_prefix(output_name: str, step: int) -> str:
    return f"{checkpoints_prefix(output_name)}step-{step:08d}/"


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of ``config`` (sorted keys, no whitespace, no NaN)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def training_config_hash(fields: Mapping[str, Any]) -> str:
    """:func:`config_hash` of exactly the :data:`TRAINING_HASH_FIELDS`, resolved (no defaults left)."""
    missing = sorted(set(TRAINING_HASH_FIELDS) - set(fields))
    extra = sorted(set(fields) - set(TRAINING_HASH_FIELDS))
    if missing or extra:
        raise ValueError(
            f"training config hash: missing {missing}, unknown {extra}; "
            "a new field that changes the weights belongs in TRAINING_HASH_FIELDS with its reason"
        )
    return config_hash({"format": CHECKPOINT_FORMAT, **fields})


def dataset_digest(examples: Iterable[tuple[str, str, str]]) -> str:
    """sha256 over ``(relative name, image sha256, caption)`` of every example, in name order."""
    return config_hash({"examples": sorted([list(example) for example in examples])})


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


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
        return step_prefix(self.output_name, self.step)

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

    @classmethod
    def from_manifest(cls, output_name: str, data: Any) -> Checkpoint:
        """Parse a manifest (or pointer); ``ValueError`` when it is not one this worker wrote."""
        try:
            if data["format"] != CHECKPOINT_FORMAT:
                raise ValueError(f"format {data['format']}, this worker reads {CHECKPOINT_FORMAT}")
            files = tuple(StoredFile(str(f["name"]), int(f["size"]), str(f["sha256"])) for f in data["files"])
            return cls(output_name, int(data["step"]), str(data["config_hash"]), files, dict(data.get("info", {})))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a checkpoint manifest ({exc!r})") from exc


@dataclass(frozen=True)
class SaveResult:
    """``uploaded`` is false when the step was already stored and verified (nothing sent).

    ``prune_errors`` lists what pruning could not delete (logged; the next save retries)."""

    checkpoint: Checkpoint
    uploaded: bool
    pruned: tuple[int, ...] = ()
    prune_errors: tuple[str, ...] = ()


class CheckpointStore:
    """The checkpoints of one LoRA (``output_name``), keeping the newest ``keep`` of them."""

    def __init__(self, storage: Storage, output_name: str, keep: int = DEFAULT_KEEP) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.storage = storage
        self.output_name = output_name
        self.keep = keep
        self.prefix = checkpoints_prefix(output_name)
        self.pointer_key = self.prefix + POINTER_NAME

    # --- saving -------------------------------------------------------------------------

    async def save(
        self, step: int, files: Mapping[str, Path], config_hash: str, info: Mapping[str, Any] | None = None
    ) -> SaveResult:
        """Upload ``files`` (name -> local path) as the checkpoint of ``step``, then point to it.

        Raises :class:`CheckpointUploadFailed` (the previous pointer stays) when any part fails,
        and :class:`CheckpointError` when the stored checkpoints belong to another config.
        """
        if step < 0:
            raise ValueError("step must be >= 0")
        for name in files:
            if not _FILE_NAME.fullmatch(name) or name in (MANIFEST_NAME, POINTER_NAME):
                raise ValueError(f"checkpoint file name {name!r} is not allowed")
        where = f"checkpoint step {step} of {self.output_name}"
        try:
            previous = await self._read_pointer()
            if previous is not None and previous[0].config_hash != config_hash:
                raise CheckpointError(
                    f"{where}: {self.prefix} holds checkpoints of another training config; delete them first"
                )
            if previous is not None and previous[0].step == step and not await self._problems(previous[0]):
                return SaveResult(previous[0], uploaded=False)
            stored = await asyncio.to_thread(_describe, files)
        except (StorageError, OSError) as exc:
            raise CheckpointUploadFailed(f"{where}: {exc}; the previous checkpoint stays current") from exc
        checkpoint = Checkpoint(self.output_name, step, config_hash, stored, dict(info or {}))
        for item in stored:
            await self._upload_verified(where, checkpoint.key(item.name), item, path=files[item.name])
        manifest = _json_bytes(checkpoint.manifest())
        entry = StoredFile(MANIFEST_NAME, len(manifest), hashlib.sha256(manifest).hexdigest())
        await self._upload_verified(where, checkpoint.key(MANIFEST_NAME), entry, data=manifest)
        older = [] if previous is None else [previous[0].step, *previous[1]]
        kept = [step, *sorted({int(s) for s in older if int(s) < step}, reverse=True)][: self.keep]
        pointer = _json_bytes({**checkpoint.manifest(), "previous": kept[1:]})
        try:
            # The commit point: before this PUT the previous pointer is current, after it this one.
            await self.storage.put_bytes(self.pointer_key, pointer, content_type="application/json")
            info = await self.storage.head(self.pointer_key)
        except StorageError as exc:
            # A lost answer does not say whether the PUT landed: either pointer names a complete checkpoint.
            raise CheckpointUploadFailed(
                f"{where}: writing {self.pointer_key} failed: {exc}; it names this checkpoint or the previous one"
            ) from exc
        problem = _mismatch(StoredFile(POINTER_NAME, len(pointer), hashlib.sha256(pointer).hexdigest()), info)
        if problem:  # a PUT replaces whole objects, so only a misbehaving store gets here
            raise CheckpointUploadFailed(
                f"{where}: {self.pointer_key} {problem} after upload; readers will scan the step folders"
            )
        log.info("checkpoint %s saved (%d files; kept steps %s)", checkpoint.prefix, len(stored), kept)
        pruned, errors = await self._prune(set(kept))
        return SaveResult(checkpoint, uploaded=True, pruned=pruned, prune_errors=errors)

    async def _upload_verified(
        self, where: str, key: str, expected: StoredFile, *, path: Path | None = None, data: bytes | None = None
    ) -> None:
        """Upload a file (``path``) or bytes (``data``), then check size and sha256 with ``head``."""
        try:
            if path is not None:
                await self.storage.put_file(key, path, content_type="application/octet-stream")
            else:
                await self.storage.put_bytes(key, data or b"", content_type="application/json")
            problem = _mismatch(expected, await self.storage.head(key))
        except (StorageError, OSError) as exc:
            raise CheckpointUploadFailed(
                f"{where}: uploading {key} failed: {exc}; the previous checkpoint stays current"
            ) from exc
        if problem:
            raise CheckpointUploadFailed(
                f"{where}: {key} {problem} after upload; the previous checkpoint stays current"
            )

    async def _prune(self, kept: set[int]) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Delete every step folder not in ``kept``; failures are logged and returned, not raised."""
        try:
            doomed = [(s, k) for s, k in await self._step_objects() if s not in kept]
            if not doomed:
                return (), ()
            result = await self.storage.delete_many([key for _, key in doomed])
        except StorageError as exc:
            log.warning("pruning old checkpoints under %s failed: %s", self.prefix, exc)
            return (), (f"{self.prefix}: {exc}",)
        errors = tuple(f"{e['key']}: {e['error']}" for e in result.errors)
        if errors:
            log.warning("pruning old checkpoints under %s left %d objects: %s", self.prefix, len(errors), errors)
        failed = {e["key"] for e in result.errors}
        steps = {s for s, _ in doomed} - {s for s, k in doomed if k in failed}
        return tuple(sorted(steps)), errors

    # --- reading ------------------------------------------------------------------------

    async def steps(self) -> list[int]:
        """Steps with a folder in storage (complete or not), ascending."""
        return sorted({step for step, _ in await self._step_objects()})

    async def latest(self) -> Checkpoint | None:
        """The newest complete checkpoint, or ``None`` when no pointer exists.

        Falls back to older kept steps (logged) when the pointer's checkpoint lost a file;
        raises :class:`CheckpointCorrupt` when none is complete. Storage errors propagate.
        """
        pointer = await self._read_pointer()
        if pointer is None:
            return None
        first, older = pointer
        problems: list[str] = []
        for candidate in [first, *older]:
            checkpoint = candidate if isinstance(candidate, Checkpoint) else await self._manifest(candidate, problems)
            if checkpoint is None:
                continue
            found = await self._problems(checkpoint)
            if not found:
                if problems:
                    log.warning("checkpoint fallback for %s to step %d: %s", self.prefix, checkpoint.step, problems)
                return checkpoint
            problems += found
        raise CheckpointCorrupt(
            f"no complete checkpoint under {self.prefix}: {'; '.join(problems)}; "
            "delete them to start over (train again with overwrite: true)"
        )

    async def download(self, checkpoint: Checkpoint, folder: Path) -> dict[str, Path]:
        """Download every file into ``folder``; :class:`CheckpointCorrupt` if one differs."""
        folder.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for item in checkpoint.files:
            key, path = checkpoint.key(item.name), folder / item.name
            try:
                await self.storage.download_file(key, path)
            except ObjectNotFound as exc:
                raise CheckpointCorrupt(f"{key} disappeared while resuming") from exc
            digest = await asyncio.to_thread(file_sha256, path)
            if digest != item.sha256 or path.stat().st_size != item.size:
                raise CheckpointCorrupt(f"{key}: downloaded bytes differ from the manifest (sha256 {digest})")
            paths[item.name] = path
        return paths

    async def delete_all(self) -> DeleteResult:
        """Delete every checkpoint of this LoRA, the pointer first (so none points at half-deleted files)."""
        pointer = await self.storage.delete_many([self.pointer_key])
        if pointer.errors:
            return pointer
        keys = [obj.key async for obj in self.storage.iter_objects(self.prefix)]
        rest = await self.storage.delete_many(keys) if keys else DeleteResult([], [])
        return DeleteResult(pointer.deleted + rest.deleted, rest.errors)

    async def _read_pointer(self) -> tuple[Checkpoint, list[int | Checkpoint]] | None:
        """The pointer's checkpoint and the older steps to fall back to; ``None`` without one.

        An unreadable pointer (not JSON, another format) is logged and replaced by the step
        folders found in storage, newest first, each to be checked through its manifest."""
        try:
            raw = await self.storage.get_bytes(self.pointer_key)
        except ObjectNotFound:
            return None
        try:
            data = json.loads(raw)
            checkpoint = Checkpoint.from_manifest(self.output_name, data)
            return checkpoint, [int(s) for s in data.get("previous", [])]
        except ValueError as exc:
            log.warning("checkpoint pointer %s is unreadable (%s); scanning the step folders", self.pointer_key, exc)
        found = sorted({s for s, _ in await self._step_objects()}, reverse=True)
        problems: list[str] = []
        for index, step in enumerate(found):
            checkpoint = await self._manifest(step, problems)
            if checkpoint is not None:
                return checkpoint, list(found[index + 1 :])
        return None

    async def _manifest(self, step: int, problems: list[str]) -> Checkpoint | None:
        key = step_prefix(self.output_name, step) + MANIFEST_NAME
        try:
            checkpoint = Checkpoint.from_manifest(self.output_name, json.loads(await self.storage.get_bytes(key)))
        except ObjectNotFound:
            problems.append(f"{key} is missing")
            return None
        except ValueError as exc:
            problems.append(f"{key} is unreadable ({exc})")
            return None
        if checkpoint.step != step:
            problems.append(f"{key} names step {checkpoint.step}")
            return None
        return checkpoint

    async def _problems(self, checkpoint: Checkpoint) -> list[str]:
        """What is wrong with a checkpoint's files in storage (empty when complete)."""
        problems = []
        for item in checkpoint.files:
            key = checkpoint.key(item.name)
            problem = _mismatch(item, await self.storage.head(key))
            if problem:
                problems.append(f"{key} {problem}")
        return problems

    async def _step_objects(self) -> list[tuple[int, str]]:
        found = []
        async for obj in self.storage.iter_objects(self.prefix):
            match = _STEP_FOLDER.match(obj.key, len(self.prefix))
            if match:
                found.append((int(match.group(1)), obj.key))
        return found


def _describe(files: Mapping[str, Path]) -> tuple[StoredFile, ...]:
    return tuple(StoredFile(name, path.stat().st_size, file_sha256(path)) for name, path in sorted(files.items()))


def _mismatch(expected: StoredFile, info: Any) -> str | None:
    """Why ``info`` (a head result) is not ``expected``; a backend without sha256 metadata is checked by size."""
    if info is None:
        return "is missing"
    if info.size != expected.size:
        return f"has {info.size} bytes, expected {expected.size}"
    if info.sha256 is not None and info.sha256 != expected.sha256:
        return "has another sha256"
    return None


def _json_bytes(data: Mapping[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, indent=1).encode()
