"""A 4-bit (NF4) frozen base for LoRA training on smaller GPUs, with bitsandbytes.

Why bitsandbytes NF4: it is the QLoRA format that peft trains LoRA layers over directly
(``peft.tuners.lora.bnb``), the one diffusers' own FLUX.1 QLoRA recipe uses, and its wheel
installs and runs on the CPU too, so CI tests the whole path. A FLUX.1-dev transformer is about
6.5 GB in NF4 instead of 24 GB in bf16. The quantization happens here on the CPU copy of the
denoiser (every ``nn.Linear`` whose sides are multiples of 32 becomes a ``Linear4bit``: that
is every large layer of a real model, and what bitsandbytes' CPU kernels pack; the few small
embedding layers stay in the pipeline's dtype); the weights are packed on the device the
denoiser runs on (bitsandbytes' CUDA kernel on a GPU: seconds for a 12 B transformer, where
the CPU takes minutes, and the layout the CUDA matmul reads); the text encoders and the VAE
stay in the pipeline's dtype. A quantized pipeline is cached
under its own key and never has a LoRA fused into it.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from services.errors import InputError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

QUANT_PREFIX = "nf4-"  # PipelineKey.dtype of a pipeline whose denoiser is NF4


def _bitsandbytes() -> Any:
    try:
        import bitsandbytes
    except ImportError as exc:
        raise InputError("input.quantize_base: nf4 needs the bitsandbytes package (pip install bitsandbytes)") from exc
    return bitsandbytes


def quantize_linear_layers(module: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device) -> int:
    """Replace every ``nn.Linear`` under ``module`` by an NF4 ``Linear4bit`` (in place) and move
    ``module`` to ``device``, where the weights are packed. Returns how many layers."""
    import torch

    bnb = _bitsandbytes()
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear or child.in_features % 32 or child.out_features % 32:
                continue
            layer = bnb.nn.Linear4bit(
                child.in_features,
                child.out_features,
                bias=child.bias is not None,
                compute_dtype=compute_dtype,
                quant_type="nf4",
                device="meta",
            )
            layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
            # bitsandbytes 0.50 repacks the weight for AVX512-bf16 CPUs on an eval-mode forward
            # and forgets that it did, so the next forward fails; keep its portable CPU kernel.
            layer.support_avx512bf16_for_cpu = False
            if child.bias is not None:
                layer.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, name, layer)
            count += 1
    module.to(device)  # Params4bit packs itself on its first move, on that device
    return count


def is_quantized(key_dtype: str) -> bool:
    return key_dtype.startswith(QUANT_PREFIX)
