"""Training checkpoints in storage: complete before referenced, verified when read, pruned after.

Layout under ``loras/<output_name>/checkpoints/``::

    step-00000200/lora.safetensors     the files the trainer wrote (any simple names)
    step-00000200/trainer.json
    step-00000200/state.json           the manifest: step, config hash, size and sha256 of each file
    latest.json                        the pointer: the newest manifest plus the older steps kept
    finished.json                      the run of these checkpoints completed (keep_checkpoints)

Keys come from :mod:`services.storage.keys`; the manifest and pointer are parsed as untrusted
input by :mod:`services.durable.manifest`.

Saving uploads every file, checks each with ``head`` (size, and the sha256 the backend stored),
uploads the manifest, and only then writes the pointer. A PUT replaces an object atomically, so
a save that fails at any point leaves the previous pointer, which names only verified files;
the failure is a :class:`~services.errors.CheckpointUploadFailed` naming the key, for the caller
to log before training goes on. Step folders that no pointer names (a failed save's partial
files, steps past a rewind) are deleted by the next successful save, after its pointer is
written, together with all but the newest ``keep`` checkpoints.

Reading (:meth:`CheckpointStore.latest`) returns the pointer's checkpoint only when every file
it names exists with the recorded size and sha256; otherwise it falls back to the older kept
steps, newest first, and raises :class:`~services.errors.CheckpointCorrupt` (naming the LoRA,
the step and what is wrong) when none is complete. :meth:`CheckpointStore.download` hashes what it downloads.

Only :class:`~services.storage.Storage` calls are used (``put_file``, ``put_bytes``,
``get_bytes``, ``download_file``, ``head``, ``iter_objects``, ``delete_many``); no torch here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.durable.manifest import (
    CHECKPOINT_FORMAT,
    MANIFEST_NAME,
    POINTER_NAME,
    TRAINING_HASH_FIELDS,
    Checkpoint,
    ManifestInvalid,
    ManifestUnparsable,
    StoredFile,
    config_hash,
    corrupt,
    dataset_digest,
    parse_manifest,
    parse_pointer,
    training_config_hash,
)
from services.errors import (
    CheckpointError,
    CheckpointUploadFailed,
    ObjectNotFound,
    StorageError,
)
from services.storage.base import DeleteResult, Storage
from services.storage.hashing import bytes_sha256, file_sha256
from services.storage.keys import (
    checkpoint_finished_key,
    checkpoint_pointer_key,
    checkpoint_step_prefix,
    lora_checkpoint_prefix,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "TRAINING_HASH_FIELDS",
    "Checkpoint",
    "CheckpointStore",
    "SaveResult",
    "StoredFile",
    "config_hash",
    "dataset_digest",
    "training_config_hash",
]

log = logging.getLogger(__name__)

DEFAULT_KEEP = 2  # the newest plus one to fall back to if the newest is damaged in storage
_STEP_FOLDER = re.compile(r"step-(\d{8})/")


@dataclass(frozen=True)
class SaveResult:
    """``uploaded`` is false when the step was already stored and verified (nothing sent).

    ``prune_errors`` lists what pruning could not delete (logged; the next save retries)."""

    checkpoint: Checkpoint
    uploaded: bool
    pruned: tuple[int, ...] = ()
    prune_errors: tuple[str, ...] = ()


class CheckpointStore:
    """The checkpoints of one LoRA (``output_name``), keeping the newest ``keep`` of them;
    :meth:`download` refuses a checkpoint larger than ``max_bytes``."""

    def __init__(
        self, storage: Storage, output_name: str, keep: int = DEFAULT_KEEP, max_bytes: int | None = None
    ) -> None:
        if keep < 1:
            raise ValueError("keep must be at least 1")
        self.storage = storage
        self.output_name = output_name
        self.keep = keep
        self.prefix = lora_checkpoint_prefix(output_name)
        self.pointer_key = checkpoint_pointer_key(output_name)
        self.finished_key = checkpoint_finished_key(output_name)
        self.max_bytes = max_bytes

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
            if not _allowed_name(name):
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
        entry = StoredFile(MANIFEST_NAME, len(manifest), bytes_sha256(manifest))
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
        problem = _mismatch(StoredFile(POINTER_NAME, len(pointer), bytes_sha256(pointer)), info)
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
        raises :class:`CheckpointCorrupt` (naming the LoRA and step) when none is complete or the
        pointer or a manifest is not one this worker wrote. Storage errors propagate.
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
        detail = f"no complete checkpoint under {self.prefix}: {'; '.join(problems)}"
        raise corrupt(self.output_name, first.step, detail)

    async def download(self, checkpoint: Checkpoint, folder: Path) -> dict[str, Path]:
        """Download every file into ``folder``; :class:`CheckpointCorrupt` if one differs or the
        whole is larger than ``max_bytes``."""
        if self.max_bytes is not None and checkpoint.size > self.max_bytes:
            raise corrupt(
                self.output_name,
                checkpoint.step,
                f"its files hold {checkpoint.size} bytes, more than MAX_CHECKPOINT_BYTES ({self.max_bytes})",
            )
        folder.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}
        for item in checkpoint.files:
            key, path = checkpoint.key(item.name), folder / item.name
            try:
                await self.storage.download_file(key, path)
            except ObjectNotFound:
                raise corrupt(self.output_name, checkpoint.step, f"{key} disappeared while resuming") from None
            digest = await asyncio.to_thread(file_sha256, path)
            if digest != item.sha256 or path.stat().st_size != item.size:
                raise corrupt(self.output_name, checkpoint.step, f"{key}: downloaded bytes differ from the manifest")
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

    async def mark_finished(self, config_hash: str, steps: int) -> None:
        """Record that the run of ``config_hash`` completed all ``steps`` (kept checkpoints only)."""
        data = _json_bytes({"config_hash": config_hash, "steps": steps})
        await self.storage.put_bytes(self.finished_key, data, content_type="application/json")

    async def finished(self) -> str | None:
        """The config hash of the run that completed with these checkpoints, or ``None``."""
        try:
            raw = await self.storage.get_bytes(self.finished_key)
        except ObjectNotFound:
            return None
        try:
            value = json.loads(raw[:4096])["config_hash"]
        except (ValueError, KeyError, TypeError, RecursionError):
            log.warning("%s is unreadable; the run counts as not finished", self.finished_key)
            return None
        return value if isinstance(value, str) else None

    async def _read_pointer(self) -> tuple[Checkpoint, list[int | Checkpoint]] | None:
        """The pointer's checkpoint and the older steps to fall back to; ``None`` without one.

        A pointer that is not JSON (a write cut short) is logged and replaced by the step folders
        found in storage, newest first, each checked through its manifest; a pointer that is JSON
        but not one this worker wrote is :class:`CheckpointCorrupt`."""
        try:
            raw = await self.storage.get_bytes(self.pointer_key)
        except ObjectNotFound:
            return None
        try:
            checkpoint, previous = parse_pointer(self.output_name, raw)
            return checkpoint, list(previous)
        except ManifestInvalid as exc:
            raise corrupt(self.output_name, _claimed_step(raw), f"{self.pointer_key} is invalid: {exc}") from None
        except ManifestUnparsable as exc:
            log.warning("checkpoint pointer %s is unreadable (%s); scanning the step folders", self.pointer_key, exc)
        found = sorted({s for s, _ in await self._step_objects()}, reverse=True)
        problems: list[str] = []
        for index, step in enumerate(found):
            checkpoint = await self._manifest(step, problems)
            if checkpoint is not None:
                return checkpoint, list(found[index + 1 :])
        return None

    async def _manifest(self, step: int, problems: list[str]) -> Checkpoint | None:
        key = checkpoint_step_prefix(self.output_name, step) + MANIFEST_NAME
        try:
            checkpoint = parse_manifest(self.output_name, await self.storage.get_bytes(key))
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


def _allowed_name(name: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}", name) is not None and name not in (
        MANIFEST_NAME,
        POINTER_NAME,
        "finished.json",
    )


def _claimed_step(raw: bytes) -> int | None:
    """The step an invalid pointer claims, for the message, when it is a plain small number."""
    match = re.search(rb'"step":\s*(\d{1,8})[,}\s]', raw[:4096])
    return int(match.group(1)) if match else None


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
