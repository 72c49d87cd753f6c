"""The collectives of a data-parallel step, the same on every rank (rank 0 and the spawned ones).

- :func:`gradient_sync`: after the backward passes of a step, one all-reduce of the LoRA
  gradients and the step's loss, flattened into one buffer, averaged over the ranks: every
  replica then takes the same optimizer step, and the loss is the global batch's.
- :func:`share_stop`: before each step, rank 0's decision to stop (cancel, SIGTERM, deadline),
  broadcast on a CPU (gloo) group so that no rank waits on a GPU sync for it.
- :func:`lora_digest`: a sha256 of a replica's LoRA, compared over the ranks at the end.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from services.gpu.train.trainer import LoraTrainer

GradSync = Callable[[list["torch.Tensor"], "torch.Tensor"], "torch.Tensor"]


def gradient_sync(world: int, group: Any = None) -> GradSync:
    """``sync(params, loss) -> mean loss``: averages every ``param.grad`` and the loss over the ranks."""

    def sync(params: list[torch.Tensor], loss: torch.Tensor) -> torch.Tensor:
        import torch
        import torch.distributed as dist

        for param in params:
            if param.grad is None:  # a layer this step did not reach: its gradient is zero
                param.grad = torch.zeros_like(param)
        flat = torch.cat([*(p.grad.reshape(-1) for p in params), loss.reshape(1).to(params[0].grad.dtype)])
        dist.all_reduce(flat, group=group)
        flat.div_(world)
        offset = 0
        for param in params:
            count = param.grad.numel()
            param.grad.copy_(flat[offset : offset + count].view_as(param.grad))
            offset += count
        return flat[offset].to(loss.dtype)

    return sync


def share_stop(stop: bool, group: Any = None) -> bool:
    """Rank 0's ``stop`` on every rank (the others pass anything)."""
    import torch
    import torch.distributed as dist

    flag = torch.tensor([int(stop)], dtype=torch.int32)
    dist.broadcast(flag, 0, group=group)
    return bool(flag.item())


def lora_digest(trainer: LoraTrainer) -> str:
    """sha256 over the replica's LoRA tensors (name, then bytes), in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(trainer.named_params):
        tensor = trainer.named_params[name].detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def gather_digests(digest: str, world: int, group: Any = None) -> list[str]:
    """Every rank's :func:`lora_digest`, by rank."""
    import torch.distributed as dist

    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, digest, group=group)
    return [str(d) for d in digests]
