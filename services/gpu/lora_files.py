"""LoRA files: the diffusers/peft ``.safetensors`` with metadata in its header, and the kohya copy.

Alpha is folded into the weights: every ``lora_B`` (up) matrix is multiplied by
``alpha / rank`` and the file says ``lora_alpha = rank``, so a loader that ignores the header
(diffusers before 0.34 read alpha as the rank) applies the strength that was trained. The
diffusers file is written by the pipeline's own ``save_lora_weights`` with the family's
component keys (``unet.`` or ``transformer.``) and then re-written with the worker's metadata
added to the header. The kohya copy (families that offer it) is converted from that file
(``convert_all_state_dict_to_peft`` then ``convert_state_dict_to_kohya``, as REFERENCE.md says);
its ``.alpha`` tensors equal the rank, which is right for folded weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from services.gpu.models import LoadedPipeline


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


def save_diffusers_lora(
    entry: LoadedPipeline,
    layers: dict[str, torch.Tensor],
    adapter_config: dict[str, Any],
    path: Path,
    metadata: dict[str, str],
    dtype: torch.dtype,
) -> Path:
    """Write ``layers`` (diffusers naming, no prefix) as a pipeline-loadable LoRA at ``path``."""
    layers = {key: value.detach().to("cpu", torch_float(value)) for key, value in layers.items()}
    layers, adapter_config = fold_alpha(layers, adapter_config)
    layers = {key: value.to(dtype).contiguous() for key, value in layers.items()}
    adapter_config = {key: sorted(value) if isinstance(value, set) else value for key, value in adapter_config.items()}
    family = entry.family
    if family is None:
        raise ValueError(f"{entry.key} has no known model family to save a LoRA for")
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        type(entry.pipe).save_lora_weights(
            save_directory=scratch, weight_name=path.name, **family.save_kwargs(layers, adapter_config)
        )
        written = Path(scratch) / path.name
        _rewrite_with_metadata(written, metadata)
        written.replace(path)
    return path


def torch_float(value: torch.Tensor) -> torch.dtype:
    """fp32 for the arithmetic of folding (the file's dtype is applied after)."""
    import torch

    return torch.float32 if value.is_floating_point() else value.dtype


def export_kohya(diffusers_path: Path, kohya_path: Path, metadata: dict[str, str]) -> Path:
    """Convert the diffusers LoRA at ``diffusers_path`` to the kohya layout A1111/ComfyUI read."""
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    state = load_file(str(diffusers_path))
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(state))
    dtype = next(iter(state.values())).dtype
    kohya = {key: value.to(dtype).contiguous() for key, value in kohya.items()}
    save_file(kohya, str(kohya_path), metadata=metadata)
    return kohya_path
