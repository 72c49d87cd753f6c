"""Apply a job's LoRA to a cached pipeline, and take it away again after the job.

The LoRA is loaded with ``pipe.load_lora_weights``, the weights it touches are copied to the CPU, it is
fused in place (``fuse_lora``) and its peft layers are unloaded, so the pipeline runs with the
module tree it had at rest: a compiled denoiser (reduce-overhead, CUDA graphs over the same
parameter storage) runs it without recompiling, and there is no LoRA overhead per step. After
the job the copies are written back in place: the base weights are restored bit for bit and
nothing leaks into the next job. A pipeline that cannot be restored is evicted from the cache
and the job fails with :class:`ModelStateError`. On a quantized (NF4) base the LoRA runs
unfused at ``scale`` (fusing would re-quantize the base) and is unloaded after the job.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.errors import InputError, ModelStateError
from services.gpu.models import PIPELINES, LoadedPipeline

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

JOB_ADAPTER = "job_lora"

Backup = tuple[Any, "torch.Tensor", "torch.Tensor | None"]


def tuner_layers(pipe: Any) -> list[Any]:
    """Every peft layer currently injected into the pipeline's models."""
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers: list[Any] = []
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            layers.extend(m for m in component.modules() if isinstance(m, BaseTunerLayer))
    return layers


def _backup(layers: list[Any]) -> list[Backup]:
    backups: list[Backup] = []
    for layer in layers:
        base = layer.get_base_layer()
        bias = getattr(base, "bias", None)
        # on the CPU: a GPU-side copy of every touched weight would cost generation up to +12 GiB (FLUX.1)
        weight = base.weight.detach().to("cpu", copy=True)
        backups.append((base, weight, None if bias is None else bias.detach().to("cpu", copy=True)))
    return backups


def _restore(entry: LoadedPipeline, backups: list[Backup]) -> None:
    """Write the base weights back in place and drop any peft layer left."""
    import torch

    try:
        with torch.no_grad():
            for base, weight, bias in backups:
                base.weight.copy_(weight)
                if bias is not None:
                    base.bias.copy_(bias)
        if tuner_layers(entry.pipe):
            entry.pipe.unload_lora_weights()
        left = tuner_layers(entry.pipe)
    except (RuntimeError, ValueError, AttributeError) as exc:
        PIPELINES.evict(entry.key)
        raise ModelStateError(f"could not remove the job's LoRA from {entry.key}: {exc}") from exc
    if left:
        PIPELINES.evict(entry.key)
        raise ModelStateError(f"{len(left)} LoRA layers stayed in {entry.key}; the pipeline was dropped")


def _load(entry: LoadedPipeline, path: Path) -> None:
    from safetensors import SafetensorError

    pipe = entry.pipe
    if not hasattr(pipe, "load_lora_weights"):
        raise InputError(f"input.lora: {type(pipe).__name__} does not take LoRA weights")
    try:
        converted = entry.family.import_lora(path, pipe) if entry.family is not None else None
        if converted is not None:  # a format the family converts itself (ModelFamily.import_lora)
            pipe.load_lora_weights(converted, adapter_name=JOB_ADAPTER)
        else:
            pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=JOB_ADAPTER)
    except (ValueError, KeyError, RuntimeError, OSError, SafetensorError) as exc:
        raise _misfit(entry, path, exc) from exc
    if not tuner_layers(pipe):
        raise InputError(f"input.lora: no layer of the LoRA matches {entry.key.model}{_trained_for(entry, path)}")


def _misfit(entry: LoadedPipeline, path: Path, exc: BaseException) -> InputError:
    """One line: what the LoRA does not fit, the family its header names, the loader's first line
    (diffusers lists every unmatched key: thousands of characters)."""
    lines = str(exc).strip().splitlines()
    first = lines[0].rstrip(": ") if lines else type(exc).__name__
    first = first if len(first) <= 200 else first[:200] + "..."
    return InputError(f"input.lora: the LoRA does not fit {entry.key.model}{_trained_for(entry, path)}: {first}")


def _trained_for(entry: LoadedPipeline, path: Path) -> str:
    """`` (trained for <family>)`` when the file's header names another family than the model's."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            family = (handle.metadata() or {}).get("base_model_family")
    except (SafetensorError, OSError) as exc:
        log.debug("no header in the LoRA %s: %s", path.name, exc)
        return ""
    model_family = entry.family.name if entry.family is not None else None
    return f" (it was trained for {family})" if family and family != model_family else ""


@contextmanager
def fused_lora(entry: LoadedPipeline, path: Path | None, scale: float) -> Iterator[None]:
    """Run the body with the LoRA at ``path`` fused at ``scale``; restore the base afterwards."""
    if path is None:
        yield
        return
    backups: list[Backup] = []
    try:
        _load(entry, path)
        if entry.quantized:
            entry.pipe.set_adapters([JOB_ADAPTER], [scale])
            log.info("LoRA %s applied unfused at scale %s to %s", path.name, scale, entry.key)
            yield
            return
        backups = _backup(tuner_layers(entry.pipe))
        entry.pipe.fuse_lora(lora_scale=scale, adapter_names=[JOB_ADAPTER])
        entry.pipe.unload_lora_weights()
        log.info("LoRA %s fused at scale %s into %s", path.name, scale, entry.key)
        yield
    finally:
        _restore(entry, backups)
