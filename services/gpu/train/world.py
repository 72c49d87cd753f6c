"""How many data-parallel ranks a training job runs on, and the refusal of a checkpoint of another.

On CUDA every visible GPU is a rank unless the ``gpus`` input asks for fewer; on the CPU the
worker runs ``TRAIN_CPU_RANKS`` gloo processes (1 by default: a plain CPU run stays one process;
more emulates a multi-GPU worker for tests).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from services.durable.manifest import training_config_hash
from services.errors import InputError

if TYPE_CHECKING:
    import torch

    from config.settings import Settings

MAX_WORLD = 8  # the most GPUs a RunPod worker has


def available_ranks(device: torch.device, settings: Settings) -> int:
    """The GPUs this worker sees (``TRAIN_CPU_RANKS`` on the CPU)."""
    import torch

    if device.type == "cuda":
        return max(1, torch.cuda.device_count())
    return settings.train_cpu_ranks


def resolve_world_size(gpus: int | None, device: torch.device, settings: Settings) -> int:
    """``gpus`` when given and available, else every available rank."""
    available = available_ranks(device, settings)
    if gpus is None:
        return available
    if gpus > available:
        where = f"{available} GPU(s)" if device.type == "cuda" else f"TRAIN_CPU_RANKS={available} on the CPU"
        raise InputError(f"input.gpus: {gpus} asked, this worker has {where}; send gpus: {available} or less")
    return gpus


def checkpoint_world_size(fields: dict[str, Any], stored_hash: str) -> int | None:
    """The world size a checkpoint of otherwise this config was trained with; None: another config."""
    for world in range(1, MAX_WORLD + 1):
        if training_config_hash({**fields, "world_size": world}) == stored_hash:
            return world
    return None


def refuse_other_world_size(fields: dict[str, Any], stored_hash: str, step: int, output_name: str) -> None:
    """Raise a clear :class:`InputError` when the checkpoint differs from this run by the world size only."""
    stored = checkpoint_world_size(fields, stored_hash)
    world = fields["world_size"]
    if stored is None or stored == world:
        return
    raise InputError(
        f"input.output_name: {output_name} has a checkpoint at step {step} trained on {stored} GPU(s) "
        f"(data-parallel ranks), this job runs on {world}: a run resumes on the same number only "
        f"(the global batch is batch_size x gpus). Send gpus: {stored} on a worker with at least {stored} "
        "GPU(s), or overwrite: true to start over"
    )
