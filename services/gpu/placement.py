"""Where a cached pipeline's components live while it works: the memory plan's ``cpu_offload``.

Resident (the default): every component on the device. Offloaded: the text encoders and the
VAE wait on the CPU and come to the device only while they run: a text encoder for its forward,
the VAE from its ``encode``/``decode`` call until :meth:`Placement.release` (the end of a
pipeline call, or of the trainer's caching). The largest text encoder (T5, Qwen3) runs alone:
a bf16 denoiser waits on the CPU during its forward (an NF4 one stays: it is small, and
bitsandbytes' packed weights are not moved). The denoiser is never hooked: ``torch.compile``,
peft and the optimizer see a plain module.

The moves are accelerate hooks, the mechanism of diffusers' own ``enable_model_cpu_offload``: a
hooked component reports the device it runs on, so a pipeline's ``_execution_device`` is the GPU
while its first component waits on the CPU, and diffusers' ``apply_forward_hook`` triggers the
VAE's on ``encode`` and ``decode``. :attr:`Placement.resident` is the placement's own record of
what is on the device (what the tests and the logs read, on a CPU as on a GPU).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

PARK_DEVICE = "cpu"


class _OnDeviceWhileRunning(ModelHook):
    """Brings one parked component to the device before it runs; a text encoder leaves again
    after its forward (unless held), the VAE at :meth:`Placement.release`."""

    def __init__(self, placement: Placement, name: str) -> None:
        super().__init__()
        self.placement = placement
        self.name = name
        self.execution_device = placement.device  # what diffusers' _execution_device reads

    def pre_forward(self, module: Any, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        self.placement.bring(self.name)
        return args, kwargs

    def post_forward(self, module: Any, output: Any) -> Any:
        if self.name != "vae":
            self.placement.drop(self.name)
        return output


def _size(module: Any) -> int:
    return sum(p.numel() for p in module.parameters())


class Placement:
    """The components of ``pipe`` and where they are; ``offloaded`` parks all but ``denoiser``."""

    def __init__(self, pipe: Any, denoiser: str, device: torch.device, denoiser_movable: bool = True) -> None:
        import torch

        self.pipe = pipe
        self.device = device
        self.denoiser = denoiser
        self.parkable = [
            name
            for name, component in pipe.components.items()
            if isinstance(component, torch.nn.Module) and name != denoiser
        ]
        encoders = [name for name in self.parkable if name != "vae"]
        # the encoder that runs alone when offloaded (None: the denoiser never moves)
        self.alone = max(encoders, key=lambda n: _size(getattr(pipe, n))) if encoders and denoiser_movable else None
        self._denoiser_away = False  # parked for the lone encoder's forward
        self._alone_active = True
        self.offloaded = False
        self.resident: set[str] = {self.denoiser, *self.parkable}
        self.moves = 0  # component moves between the CPU and the device, for the logs and tests
        self._held: set[str] = set()

    @property
    def moves_denoiser(self) -> bool:
        """Offloaded with a denoiser that leaves the device for the largest encoder (bf16, not NF4)."""
        return self.offloaded and self.alone is not None

    # switching

    def set_offload(self, offload: bool, alone: bool = True) -> None:
        """Park the encoders and the VAE on the CPU (hooks on) or bring them back for good.
        ``alone``: the largest text encoder runs with the denoiser on the CPU (the plan's
        ``cpu_offload``; off where the card holds both and only the encoders should wait).

        Each component is brought to the asked state on every call, so a call that failed
        half-way (an out-of-memory ``.to``) is repaired by the next one."""
        self._alone_active = alone
        changed = offload != self.offloaded
        self.offloaded = offload
        self._held.clear()
        for name in self.parkable:
            module = getattr(self.pipe, name)
            hooked = isinstance(getattr(module, "_hf_hook", None), _OnDeviceWhileRunning)
            if offload and not hooked:
                add_hook_to_module(module, _OnDeviceWhileRunning(self, name))
            elif not offload and hooked:
                remove_hook_from_module(module)
            if offload and name in self.resident:
                self._move(name, False)
            elif not offload and name not in self.resident:
                self._move(name, True)
        self.bring(self.denoiser)
        if changed:
            log.info("placement of %s: %s", type(self.pipe).__name__, self.describe())

    def describe(self) -> str:
        if not self.offloaded:
            return "every component on the device"
        alone = f"; {self.alone} runs alone" if self.alone and self._alone_active else ""
        return f"{self.denoiser} on the device; {', '.join(self.parkable)} on the CPU while they do not run{alone}"

    # moves

    def bring(self, name: str) -> None:
        """``name`` to the device (a no-op when it is there); the lone encoder sends the denoiser
        to the CPU first."""
        if name in self.resident:
            return
        if self.offloaded and self._alone_active and name == self.alone and self.denoiser in self.resident:
            self._move(self.denoiser, False)
            self._denoiser_away = True
        self._move(name, True)

    def drop(self, name: str) -> None:
        """``name`` back to the CPU when offloaded and not held; after the lone encoder, the
        denoiser comes back."""
        if self.offloaded and name in self.resident and name != self.denoiser and name not in self._held:
            self._move(name, False)
            if self._denoiser_away and name == self.alone:
                self._denoiser_away = False
                self._move(self.denoiser, True)

    def release(self) -> None:
        """Every parked component that came to the device goes back, and the denoiser is on the
        device (the end of a pipeline call, or a forward that raised)."""
        for name in self.parkable:
            self.drop(name)
        self.bring(self.denoiser)
        self._denoiser_away = False

    @contextmanager
    def holding(self, names: Sequence[str]) -> Iterator[None]:
        """``names`` on the device for the whole block (many calls, one move each way)."""
        names = [n for n in names if n in self.parkable]
        for name in names:
            self.bring(name)
        self._held.update(names)
        try:
            yield
        finally:
            self._held.difference_update(names)
            for name in names:
                self.drop(name)

    @contextmanager
    def denoiser_parked(self, park: bool) -> Iterator[None]:
        """With ``park``, the denoiser waits on the CPU for the block (while the encoders fill the
        caches, so the largest encoder never sits beside it); back on the device after."""
        if not park or self.denoiser not in self.resident:
            yield
            return
        self._move(self.denoiser, False)
        try:
            yield
        finally:
            self._move(self.denoiser, True)

    def _move(self, name: str, to_device: bool) -> None:
        import torch

        getattr(self.pipe, name).to(self.device if to_device else PARK_DEVICE)
        # On a CPU worker both places are the CPU: the record still follows the plan.
        (self.resident.add if to_device else self.resident.discard)(name)
        self.moves += 1
        if not to_device and self.device.type == "cuda":
            torch.cuda.empty_cache()
