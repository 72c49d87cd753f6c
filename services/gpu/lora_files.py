"""LoRA files: one trained adapter written in each export format, with the worker's metadata.

Formats (which a family offers, and its default, are on the family: ``export_formats``):

* ``diffusers``: peft naming throughout (``<component>.<module>.lora_A.weight`` /
  ``lora_B.weight``, the ai-toolkit layout), written by the pipeline's own
  ``save_lora_weights`` so its ``lora_adapter_metadata`` header is diffusers'. The trainer's
  layers come through diffusers' ``convert_state_dict_to_diffusers``, which renames only the
  attention projections to the old ``lora.down``/``lora.up``; :func:`peft_naming` undoes that,
  so a file never mixes the two namings (kohya's FLUX converter drops modules of mixed files).
* ``kohya``: ``lora_unet_<module>.lora_down.weight`` / ``lora_up.weight`` / ``alpha``, made by
  :meth:`ModelFamily.export_lora` (SD/SDXL: diffusers module paths, as A1111, ComfyUI and
  diffusers' importer map them; FLUX.1: BFL module names with fused q/k/v).

Alpha is folded into the weights: every up matrix is multiplied by ``alpha / rank`` and the
file says alpha = rank (``lora_alpha``, or kohya's ``.alpha`` tensors), so a loader that
ignores the header (diffusers before 0.34 read alpha as the rank) applies the trained strength.
Every file says its format in the ``lora_format`` header key; only kohya files carry kohya's
``ss_network_module`` (:meth:`ModelFamily.format_metadata`).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.gpu.families.base import DIFFUSERS, FORMAT_KEY, KOHYA

if TYPE_CHECKING:
    import torch

    from services.gpu.families.base import ModelFamily
    from services.gpu.models import LoadedPipeline

__all__ = ["DIFFUSERS", "FORMAT_KEY", "KOHYA", "read_metadata", "save_lora"]


def read_metadata(path: Path) -> dict[str, str]:
    """The string metadata of a ``.safetensors`` header."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _rewrite_with_metadata(path: Path, extra: dict[str, str]) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (not a dict)
    metadata.update(extra)
    save_file(tensors, str(path), metadata=metadata)


def peft_naming(layers: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``lora.down``/``lora.up`` (diffusers' old attention naming) as peft's ``lora_A``/``lora_B``."""
    return {
        key.replace(".lora.down.", ".lora_A.").replace(".lora.up.", ".lora_B."): value for key, value in layers.items()
    }


def fold_alpha(
    layers: dict[str, torch.Tensor], adapter_config: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Scale the up matrices by ``alpha / rank`` and set ``lora_alpha`` to the rank."""
    rank, alpha = adapter_config["r"], adapter_config["lora_alpha"]
    if adapter_config.get("rank_pattern") or adapter_config.get("alpha_pattern"):
        raise ValueError("per-layer rank or alpha patterns are not folded")
    scale = alpha / rank
    folded = {key: value * scale if "lora_B" in key or "lora.up" in key else value for key, value in layers.items()}
    return folded, {**adapter_config, "lora_alpha": rank}


def torch_float(value: torch.Tensor) -> torch.dtype:
    """fp32 for the arithmetic of folding (the file's dtype is applied after)."""
    import torch

    return torch.float32 if value.is_floating_point() else value.dtype


def prepared_layers(
    layers: dict[str, torch.Tensor], adapter_config: dict[str, Any], dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The trained layers on the CPU in peft naming, alpha folded, in the file's ``dtype``."""
    layers = peft_naming({key: value.detach().to("cpu", torch_float(value)) for key, value in layers.items()})
    layers, adapter_config = fold_alpha(layers, adapter_config)
    layers = {key: value.to(dtype).contiguous() for key, value in layers.items()}
    adapter_config = {key: sorted(value) if isinstance(value, set) else value for key, value in adapter_config.items()}
    return layers, adapter_config


def _family(entry: LoadedPipeline) -> ModelFamily:
    if entry.family is None:
        raise ValueError(f"{entry.key} has no known model family to save a LoRA for")
    return entry.family


def save_lora(
    entry: LoadedPipeline,
    layers: dict[str, torch.Tensor],
    adapter_config: dict[str, Any],
    path: Path,
    metadata: dict[str, str],
    dtype: torch.dtype,
    fmt: str = DIFFUSERS,
) -> Path:
    """Write ``layers`` (the trainer's, no component prefix) as a LoRA file in ``fmt`` at ``path``."""
    from safetensors.torch import save_file

    family = _family(entry)
    layers, adapter_config = prepared_layers(layers, adapter_config, dtype)
    header = {**metadata, **family.format_metadata(fmt)}
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt != DIFFUSERS:
        tensors = family.export_lora(fmt, layers, entry.pipe)
        save_file({key: value.to(dtype).contiguous() for key, value in tensors.items()}, str(path), metadata=header)
        return path
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        type(entry.pipe).save_lora_weights(
            save_directory=scratch, weight_name=path.name, **family.save_kwargs(layers, adapter_config)
        )
        written = Path(scratch) / path.name
        _rewrite_with_metadata(written, header)
        written.replace(path)
    return path
