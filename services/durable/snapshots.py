"""Intermediate LoRA files kept along a training run (``save_every``), with their sample images.

Layout (keys from :mod:`services.storage.keys`): ``loras/<output_name>/steps/<step>.safetensors``
and, per snapshot, ``loras/<output_name>/steps/<step>-sample-<i>.png``. Unlike checkpoints these
are results for the user (load one in ``generate``), so they survive the job; ``keep_last``
bounds how many. Each object records the run it came from (the training config hash, in its
``run`` metadata): ``keep_last`` and the job's ``snapshots`` list cover the current run only, and
a new run of an existing name must clear the old run's snapshots first (``overwrite``).
No torch here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.storage.base import DeleteResult, ObjectInfo, Storage
from services.storage.keys import snapshot_key, snapshot_sample_key, snapshots_prefix

log = logging.getLogger(__name__)

RUN_METADATA_KEY = "run"
_SNAPSHOT = re.compile(r"(\d+)\.safetensors")
_SAMPLE = re.compile(r"(\d+)-sample-(\d+)\.png")


@dataclass(frozen=True)
class Snapshot:
    """One stored snapshot: its LoRA file (``None`` when only samples are left), sample images,
    and the run (config hash) it came from (``None``: written before runs were recorded)."""

    step: int
    lora: ObjectInfo | None
    samples: tuple[ObjectInfo, ...] = ()
    run: str | None = None

    @property
    def keys(self) -> list[str]:
        return [obj.key for obj in ((self.lora,) if self.lora else ()) + self.samples]


class SnapshotStore:
    """The snapshots of one LoRA; ``run`` is the current run's config hash (set before saving)."""

    def __init__(self, storage: Storage, output_name: str, run: str | None = None) -> None:
        self.storage = storage
        self.output_name = output_name
        self.run = run
        self.prefix = snapshots_prefix(output_name)

    async def save(self, step: int, lora_path: Path, samples: Sequence[Path] = ()) -> Snapshot:
        """Upload the LoRA file of ``step`` and its sample PNGs; storage errors propagate."""
        meta = {RUN_METADATA_KEY: self.run} if self.run else None
        lora = await self.storage.put_file(
            snapshot_key(self.output_name, step), lora_path, content_type="application/octet-stream", metadata=meta
        )
        stored = [
            await self.storage.put_file(
                snapshot_sample_key(self.output_name, step, i), path, content_type="image/png", metadata=meta
            )
            for i, path in enumerate(samples)
        ]
        return Snapshot(step, lora, tuple(stored), self.run)

    async def list(self) -> list[Snapshot]:
        """Every snapshot in storage, by step (samples by index), with the run each came from."""
        loras: dict[int, ObjectInfo] = {}
        samples: dict[int, list[tuple[int, ObjectInfo]]] = {}
        async for obj in self.storage.iter_objects(self.prefix):
            name = obj.key[len(self.prefix) :]
            if match := _SNAPSHOT.fullmatch(name):
                loras[int(match.group(1))] = obj
            elif match := _SAMPLE.fullmatch(name):
                samples.setdefault(int(match.group(1)), []).append((int(match.group(2)), obj))
        found = []
        for step in sorted(loras.keys() | samples.keys()):
            shots = tuple(obj for _, obj in sorted(samples.get(step, [])))
            first = loras.get(step) or shots[0]
            head = await self.storage.head(first.key)  # a listing carries no metadata
            run = head.metadata.get(RUN_METADATA_KEY) if head is not None else None
            found.append(Snapshot(step, loras.get(step), shots, run))
        return found

    async def current(self) -> list[Snapshot]:
        """The snapshots of the current run (``run``)."""
        return [s for s in await self.list() if s.run == self.run]

    async def others(self) -> list[Snapshot]:
        """Snapshots of any other run (or of no recorded run)."""
        return [s for s in await self.list() if s.run != self.run]

    async def prune(self, keep_last: int) -> DeleteResult:
        """Delete all but the newest ``keep_last`` snapshots of the current run (samples included)."""
        if keep_last < 0:
            raise ValueError("keep_last must be >= 0")
        found = await self.current()
        return await self.delete(found[: max(len(found) - keep_last, 0)])

    async def delete(self, snapshots: Sequence[Snapshot]) -> DeleteResult:
        """Delete these snapshots (their LoRA files and samples); failures are logged and returned."""
        keys = [key for snapshot in snapshots for key in snapshot.keys]
        result = await self.storage.delete_many(keys) if keys else DeleteResult([], [])
        if result.errors:
            log.warning("deleting snapshots under %s left objects: %s", self.prefix, result.errors)
        return result
