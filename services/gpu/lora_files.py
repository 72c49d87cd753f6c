"""LoRA files: the diffusers/peft ``.safetensors`` with metadata in its header, and the kohya copy.

The diffusers file is written by the pipeline's own ``save_lora_weights`` (so that
``load_lora_weights`` reads it back, alpha included, from diffusers' adapter metadata) and
then re-written with the worker's metadata added to the header. The kohya copy is converted
from that file (``convert_all_state_dict_to_peft`` then ``convert_state_dict_to_kohya``, as
REFERENCE.md says) with the real alpha, which the converter would otherwise set to the rank.
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


def save_diffusers_lora(
    entry: LoadedPipeline,
    layers: dict[str, torch.Tensor],
    adapter_config: dict[str, Any],
    path: Path,
    metadata: dict[str, str],
    dtype: torch.dtype,
) -> Path:
    """Write ``layers`` (diffusers naming, no prefix) as a pipeline-loadable LoRA at ``path``."""
    layers = {key: value.detach().to("cpu", dtype).contiguous() for key, value in layers.items()}
    adapter_config = {key: sorted(value) if isinstance(value, set) else value for key, value in adapter_config.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        type(entry.pipe).save_lora_weights(
            save_directory=scratch,
            unet_lora_layers=layers,
            weight_name=path.name,
            unet_lora_adapter_metadata=adapter_config,
        )
        written = Path(scratch) / path.name
        _rewrite_with_metadata(written, metadata)
        written.replace(path)
    return path


def export_kohya(diffusers_path: Path, kohya_path: Path, alpha: float, metadata: dict[str, str]) -> Path:
    """Convert the diffusers LoRA at ``diffusers_path`` to the kohya layout A1111/ComfyUI read."""
    import torch
    from diffusers.utils import convert_all_state_dict_to_peft, convert_state_dict_to_kohya
    from safetensors.torch import load_file, save_file

    state = load_file(str(diffusers_path))
    kohya = convert_state_dict_to_kohya(convert_all_state_dict_to_peft(state))
    dtype = next(iter(state.values())).dtype
    for key in kohya:
        if key.endswith(".alpha"):
            kohya[key] = torch.tensor(alpha, dtype=dtype)
    kohya = {key: value.contiguous() for key, value in kohya.items()}
    save_file(kohya, str(kohya_path), metadata=metadata)
    return kohya_path
