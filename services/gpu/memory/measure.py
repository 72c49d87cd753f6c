"""Measure what a training step keeps for backward, on the meta device (no weights, no FLOPs).

A denoiser built from its real config (full width, usually few blocks: see
``tests/gpu/test_memory.py``) runs one forward on meta tensors with a LoRA attached, inside
``torch.autograd.graph.saved_tensors_hooks``: every tensor autograd saves for backward is
counted once (views by their base), the frozen weights excluded (they are the model's own
memory). Attention runs as the GPU's fused kernels do (flash / memory-efficient SDPA keep
q, k, v, the output and one fp32 log-sum-exp per query and head, never the score matrix).

With gradient checkpointing, diffusers calls each block through its checkpoint function; the
recorder here stands in for it: the block's tensor inputs are what checkpointing keeps, and the
block's own saved tensors (counted apart) are what its recomputation holds during backward.
So the measured peak of kept activations is ``outside + sum(block inputs) + max(block)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class Saved:
    """Bytes kept for backward: outside checkpointed blocks, and per checkpointed block."""

    outside: int = 0
    inputs: int = 0
    blocks: list[int] = field(default_factory=list)
    _seen: dict[int, torch.Tensor] = field(default_factory=dict)

    def peak(self, checkpointing: bool) -> int:
        if not checkpointing:
            return self.outside + sum(self.blocks)
        return self.outside + self.inputs + max(self.blocks, default=0)


def _base(t: torch.Tensor) -> torch.Tensor:
    while t._base is not None:
        t = t._base
    return t


class _Counter:
    def __init__(self, saved: Saved, params: set[int]) -> None:
        self.saved, self.params, self.total = saved, params, 0

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        base = _base(t)
        if id(base) not in self.params and id(base) not in self.saved._seen:
            self.saved._seen[id(base)] = base  # held, so the id stays unique
            self.total += base.numel() * base.element_size()
        return t


class _FlashSDPA(torch.autograd.Function):
    """SDPA that saves what the GPU's flash / efficient kernels save."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *rest: Any) -> torch.Tensor:
        with torch.no_grad():
            out = _ORIGINAL_SDPA(q, k, v, *rest[:1], **rest[1])
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> Any:  # never run: the meta step only counts
        raise NotImplementedError


_ORIGINAL_SDPA = torch.nn.functional.scaled_dot_product_attention


def _flash_sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: Any = None, **kw: Any) -> Any:
    return _FlashSDPA.apply(query, key, value, attn_mask, kw)


@contextmanager
def fused_attention() -> Iterator[None]:
    torch.nn.functional.scaled_dot_product_attention = _flash_sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = _ORIGINAL_SDPA


def measure(model: torch.nn.Module, run: Callable[[], Any], checkpointing: bool) -> Saved:
    """Run ``run()`` (one forward of ``model``) and count what it keeps for backward."""
    saved = Saved()
    params = {id(p) for p in model.parameters()}
    outer = _Counter(saved, params)

    def recorder(module: Any, *args: Any) -> Any:
        inner = _Counter(saved, params)
        for arg in args:
            if isinstance(arg, torch.Tensor):
                inner.pack(arg)  # the inputs checkpointing keeps
        saved.inputs += inner.total
        inner.total = 0
        with torch.autograd.graph.saved_tensors_hooks(inner.pack, lambda t: t):
            out = module(*args)
        saved.blocks.append(inner.total)
        return out

    if checkpointing:
        model.enable_gradient_checkpointing(gradient_checkpointing_func=recorder)
    with fused_attention(), torch.autograd.graph.saved_tensors_hooks(outer.pack, lambda t: t):
        run()
    saved.outside = outer.total
    return saved
