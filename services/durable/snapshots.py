"""Intermediate LoRA files kept along a training run (``save_every``), with their sample images.

Layout: ``loras/<output_name>/steps/<step>.safetensors`` and, per snapshot,
``loras/<output_name>/steps/<step>-sample-<i>.png``. Unlike checkpoints these are results for
the user (load one in ``generate``), so they survive the job; ``keep_last`` bounds how many.
No torch here.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from services.durable.checkpoints import lora_prefix
from services.storage.base import DeleteResult, ObjectInfo, Storage

log = logging.getLogger(__name__)

_SNAPSHOT = re.compile(r"(\d+)\.safetensors")
_SAMPLE = re.compile(r"(\d+)-sample-(\d+)\.png")


def snapshots_prefix(output_name: str) -> str:
    return f"{lora_prefix(output_name)}steps/"


def snapshot_key(output_name: str, step: int) -> str:
    return f"{snapshots_prefix(output_name)}{step}.safetensors"


def sample_key(output_name: str, step: int, index: int) -> str:
    return f"{snapshots_prefix(output_name)}{step}-sample-{index}.png"


@dataclass(frozen=True)
class Snapshot:
    """One stored snapshot: its LoRA file (``None`` when only samples are left) and sample images."""

    step: int
    lora: ObjectInfo | None
    samples: tuple[ObjectInfo, ...] = ()

    @property
    def keys(self) -> list[str]:
        return [obj.key for obj in ((self.lora,) if self.lora else ()) + self.samples]


class SnapshotStore:
    """The snapshots of one LoRA."""

    def __init__(self, storage: Storage, output_name: str) -> None:
        self.storage = storage
        self.output_name = output_name
        self.prefix = snapshots_prefix(output_name)

    async def save(self, step: int, lora_path: Path, samples: Sequence[Path] = ()) -> Snapshot:
        """Upload the LoRA file of ``step`` and its sample PNGs; storage errors propagate."""
        lora = await self.storage.put_file(
            snapshot_key(self.output_name, step), lora_path, content_type="application/octet-stream"
        )
        stored = [
            await self.storage.put_file(sample_key(self.output_name, step, i), path, content_type="image/png")
            for i, path in enumerate(samples)
        ]
        return Snapshot(step, lora, tuple(stored))

    async def list(self) -> list[Snapshot]:
        """Every snapshot in storage, by step (samples by index)."""
        loras: dict[int, ObjectInfo] = {}
        samples: dict[int, list[tuple[int, ObjectInfo]]] = {}
        async for obj in self.storage.iter_objects(self.prefix):
            name = obj.key[len(self.prefix) :]
            if match := _SNAPSHOT.fullmatch(name):
                loras[int(match.group(1))] = obj
            elif match := _SAMPLE.fullmatch(name):
                samples.setdefault(int(match.group(1)), []).append((int(match.group(2)), obj))
        return [
            Snapshot(step, loras.get(step), tuple(obj for _, obj in sorted(samples.get(step, []))))
            for step in sorted(loras.keys() | samples.keys())
        ]

    async def prune(self, keep_last: int) -> DeleteResult:
        """Delete all but the newest ``keep_last`` snapshots (samples included)."""
        if keep_last < 0:
            raise ValueError("keep_last must be >= 0")
        found = await self.list()
        doomed = found[: max(len(found) - keep_last, 0)]
        keys = [key for snapshot in doomed for key in snapshot.keys]
        result = await self.storage.delete_many(keys) if keys else DeleteResult([], [])
        if result.errors:
            log.warning("pruning snapshots under %s left objects: %s", self.prefix, result.errors)
        return result
