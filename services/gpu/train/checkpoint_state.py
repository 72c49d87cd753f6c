"""Everything a stopped training run needs to continue bit for bit, as files, and back.

:func:`capture` writes three files into a folder; :func:`restore` reads them into freshly built
parts. Written against :class:`TrainerParts` (named tensors, objects with ``state_dict``, named
generators) and :class:`LoopState` (plain data), not against a trainer class:

- ``lora.safetensors``: the trainable tensors by name, exactly as trained (fp32 on the CPU).
- ``trainer.safetensors``: every other tensor: optimizer moments and step counts, scheduler or
  grad-scaler tensors, the torch RNG states (the CPU default generator, each CUDA device, each
  named generator) and the loss EMA.
- ``trainer.json``: the rest: optimizer param groups, scheduler counters, python ``random`` and
  numpy RNG states, the data order (the planned batches and the cursor), the step, ``extra``.

Why not ``torch.save``: a checkpoint comes back from shared storage, and a pickle runs code on
load; ``weights_only=True`` narrows that but has had bypasses (CVE-2025-32434). safetensors and
JSON carry data only, and any tool can read them. JSON keeps what ``state_dict`` trees need
through a small tagged encoding: ``{"$tensor": key}`` for a tensor stored in
``trainer.safetensors``, ``{"$tuple": [...]}``, and ``{"$items": [[k, v], ...]}`` for a dict
whose keys are not all strings (an optimizer's ``state`` is keyed by parameter index). Python
floats go through ``repr``, so they come back exactly.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from services.errors import CheckpointCorrupt

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

STATE_FORMAT = 1
LORA_FILE = "lora.safetensors"
TENSORS_FILE = "trainer.safetensors"
JSON_FILE = "trainer.json"
FILES = (LORA_FILE, TENSORS_FILE, JSON_FILE)
_TAGS = ("$tensor", "$tuple", "$items")


class Stateful(Protocol):
    """An optimizer, LR scheduler or grad scaler."""

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> Any: ...


@dataclass
class TrainerParts:
    """The live objects of a run: restored in place (parameter tensors keep their identity)."""

    params: Mapping[str, torch.Tensor]
    states: Mapping[str, Stateful] = field(default_factory=dict)
    generators: Mapping[str, torch.Generator] = field(default_factory=dict)


@dataclass
class LoopState:
    """The loop's own position: plain data, plus the loss EMA as the loop keeps it."""

    step: int
    data_order: Any  # JSON: e.g. {"batches": [[3, 1], ...], "cursor": 8}
    loss_ema: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def capture(parts: TrainerParts, loop: LoopState, folder: Path) -> dict[str, Path]:
    """Write the state into ``folder``; returns ``{file name: path}`` (the names in :data:`FILES`)."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    tree = {
        "format": STATE_FORMAT,
        "torch_version": torch.__version__,
        "step": loop.step,
        "data_order": loop.data_order,
        "extra": loop.extra,
        "loss_ema": _encode(loop.loss_ema, "loss_ema", tensors),
        "states": {name: _encode(obj.state_dict(), f"states/{name}", tensors) for name, obj in parts.states.items()},
        "rng": {
            "torch_cpu": _encode(torch.get_rng_state(), "rng/torch_cpu", tensors),
            "torch_cuda": _encode(_cuda_states(), "rng/torch_cuda", tensors),
            "generators": {
                name: _encode(gen.get_state(), f"rng/generators/{name}", tensors)
                for name, gen in parts.generators.items()
            },
            "python": _encode(python_state, "rng/python", tensors),
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *(_plain(v) for v in numpy_state[2:])],
        },
    }
    paths = {name: folder / name for name in FILES}
    save_file({name: _cpu_copy(t) for name, t in parts.params.items()}, str(paths[LORA_FILE]))
    save_file({name: _cpu_copy(t) for name, t in tensors.items()}, str(paths[TENSORS_FILE]))
    paths[JSON_FILE].write_text(json.dumps(tree), encoding="utf-8")
    return paths


def restore(folder: Path, parts: TrainerParts) -> LoopState:
    """Load the files in ``folder`` into ``parts`` (built fresh, same shapes) and return the loop state.

    Raises :class:`CheckpointCorrupt` when the files do not fit ``parts`` (other parameter
    names or shapes, other state or generator names) or were written in another format.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tree = json.loads((folder / JSON_FILE).read_text(encoding="utf-8"))
        params = load_file(str(folder / LORA_FILE))
        tensors = load_file(str(folder / TENSORS_FILE))
    except OSError as exc:
        raise CheckpointCorrupt(f"its files are unreadable ({exc.strerror or type(exc).__name__})") from None
    except (ValueError, RecursionError, SafetensorError) as exc:
        raise CheckpointCorrupt(f"its files are unreadable ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(tree, dict) or tree.get("format") != STATE_FORMAT:
        found = tree.get("format") if isinstance(tree, dict) else type(tree).__name__
        raise CheckpointCorrupt(f"trainer state format {found}, this worker reads {STATE_FORMAT}")
    try:
        return _apply(tree, params, tensors, parts)
    except (KeyError, TypeError, IndexError, ValueError, AttributeError, RuntimeError, RecursionError) as exc:
        # Edited state (hashes recomputed to match): a missing key, a wrong type, a short list.
        raise CheckpointCorrupt(f"{JSON_FILE} does not fit this run ({type(exc).__name__}: {str(exc)[:200]})") from None


def _apply(
    tree: dict[str, Any], params: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], parts: TrainerParts
) -> LoopState:
    """Load the parsed state into ``parts``; errors of a malformed tree propagate to :func:`restore`."""
    import numpy as np
    import torch

    if tree["torch_version"] != torch.__version__:
        log.warning("resuming a checkpoint of torch %s on torch %s", tree["torch_version"], torch.__version__)
    _same_names("trainable tensors", params, parts.params)
    _same_names("states", tree["states"], parts.states)
    _same_names("generators", tree["rng"]["generators"], parts.generators)
    with torch.no_grad():
        for name, target in parts.params.items():
            value = params[name]
            if value.shape != target.shape or value.dtype != target.dtype:
                raise CheckpointCorrupt(
                    f"trainable tensor {name}: checkpoint has {value.dtype} {tuple(value.shape)}, "
                    f"the model {target.dtype} {tuple(target.shape)}"
                )
            target.copy_(value)
    for name, obj in parts.states.items():
        obj.load_state_dict(_decode(tree["states"][name], tensors))
    rng = tree["rng"]
    for name, gen in parts.generators.items():
        gen.set_state(_decode(rng["generators"][name], tensors))
    _restore_cuda(_decode(rng["torch_cuda"], tensors))
    torch.set_rng_state(_decode(rng["torch_cpu"], tensors))
    random.setstate(_decode(rng["python"], tensors))
    kind, keys, *rest = rng["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    return LoopState(
        step=int(tree["step"]),
        data_order=tree["data_order"],
        loss_ema=_decode(tree["loss_ema"], tensors),
        extra=tree["extra"],
    )


# --- helpers ----------------------------------------------------------------------------------


def _cuda_states() -> list[torch.Tensor]:
    """Each CUDA device's default generator, once CUDA is in use (never initialises it)."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return list(torch.cuda.get_rng_state_all())
    return []


def _restore_cuda(states: list[torch.Tensor]) -> None:
    import torch

    if not states:
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available != len(states):
        log.warning("checkpoint has %d CUDA RNG states, this worker %d devices: not restored", len(states), available)
        return
    torch.cuda.set_rng_state_all(states)


def _same_names(what: str, stored: Mapping[str, Any], live: Mapping[str, Any]) -> None:
    if set(stored) != set(live):
        missing, extra = sorted(set(live) - set(stored)), sorted(set(stored) - set(live))
        raise CheckpointCorrupt(f"checkpoint {what} do not match the model: missing {missing[:5]}, extra {extra[:5]}")


def _cpu_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A contiguous CPU copy that shares no memory (safetensors refuses shared storage)."""
    return tensor.detach().to("cpu", copy=True).contiguous()


def _plain(value: Any) -> Any:
    """numpy scalars as Python numbers."""
    return value.item() if hasattr(value, "item") else value


def _encode(value: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A ``state_dict``-style tree as JSON data; tensors go into ``tensors`` under their path."""
    import torch

    if isinstance(value, torch.Tensor):
        tensors[path] = value
        return {"$tensor": path}
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple):
        return {"$tuple": [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [_encode(v, f"{path}/{i}", tensors) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and k not in _TAGS for k in value):
            return {k: _encode(v, f"{path}/{k}", tensors) for k, v in value.items()}
        return {"$items": [[_encode(k, path, {}), _encode(v, f"{path}/{k}", tensors)] for k, v in value.items()]}
    raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint")


def _decode(value: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    if isinstance(value, list):
        return [_decode(v, tensors) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1 and next(iter(value)) in _TAGS:
        tag, inner = next(iter(value.items()))
        if tag == "$tensor":
            try:
                return tensors[inner]
            except KeyError:
                raise CheckpointCorrupt(f"tensor {inner} is missing from {TENSORS_FILE}") from None
        if tag == "$tuple":
            return tuple(_decode(v, tensors) for v in inner)
        return {_decode(k, tensors): _decode(v, tensors) for k, v in inner}
    return {k: _decode(v, tensors) for k, v in value.items()}
