"""The real configs of each family's full-size models, written in code (no weights, no hub).

Each component is ``(library, class name, config)``; :func:`build_empty` builds it on the meta
device (no memory, no weights) so its parameters can be counted exactly, and
:func:`build_components` builds a whole model with random weights on a device, which
:meth:`ModelFamily.build_full` puts into its pipeline (``bench/gpu.py`` measures those). The planner itself
reads the counts from :mod:`services.gpu.memory.specs` (constants, so it needs no torch);
``tests/gpu/test_memory.py`` checks that they equal what these configs build.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

Component = tuple[str, str, dict[str, Any]]

FLUX_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 16,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "shift_factor": 0.1159,
    "scaling_factor": 0.3611,
}
SD_VAE: dict[str, Any] = {
    **FLUX_VAE,
    "latent_channels": 4,
    "use_quant_conv": True,
    "use_post_quant_conv": True,
    "shift_factor": None,
    "scaling_factor": 0.18215,
}
SDXL_VAE: dict[str, Any] = {**SD_VAE, "scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024}
CLIP_L: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
CLIP_BIG_G: dict[str, Any] = {
    **CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
T5_XXL: dict[str, Any] = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "vocab_size": 32128,
    "feed_forward_proj": "gated-gelu",
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
}
QWEN3_4B: dict[str, Any] = {
    "hidden_size": 2560,
    "intermediate_size": 9728,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "max_position_embeddings": 40960,
    "tie_word_embeddings": True,
}
FLUX_DEV: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
ZIMAGE: dict[str, Any] = {
    "all_patch_size": [2],
    "all_f_patch_size": [1],
    "in_channels": 16,
    "dim": 3840,
    "n_layers": 30,
    "n_refiner_layers": 2,
    "n_heads": 30,
    "n_kv_heads": 30,
    "norm_eps": 1e-5,
    "qk_norm": True,
    "cap_feat_dim": 2560,
    "rope_theta": 256.0,
    "t_scale": 1000.0,
    "axes_dims": [32, 48, 48],
    "axes_lens": [1024, 512, 512],
}
SDXL_UNET: dict[str, Any] = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "cross_attention_dim": 2048,
    "transformer_layers_per_block": [1, 2, 10],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
SD15_UNET: dict[str, Any] = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}

DENOISER = {
    "flux": "FluxTransformer2DModel",
    "zimage": "ZImageTransformer2DModel",
    "sdxl": "UNet2DConditionModel",
    "sd": "UNet2DConditionModel",
}

# model -> component name -> (library, class, config)
MODELS: dict[str, dict[str, Component]] = {
    "flux-dev": {
        "transformer": ("diffusers", DENOISER["flux"], FLUX_DEV),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L),
        "text_encoder_2": ("transformers", "T5EncoderModel", T5_XXL),
        "vae": ("diffusers", "AutoencoderKL", FLUX_VAE),
    },
    "flux-schnell": {
        "transformer": ("diffusers", DENOISER["flux"], {**FLUX_DEV, "guidance_embeds": False}),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L),
        "text_encoder_2": ("transformers", "T5EncoderModel", T5_XXL),
        "vae": ("diffusers", "AutoencoderKL", FLUX_VAE),
    },
    "zimage-turbo": {
        "transformer": ("diffusers", DENOISER["zimage"], ZIMAGE),
        "text_encoder": ("transformers", "Qwen3Model", QWEN3_4B),
        "vae": ("diffusers", "AutoencoderKL", FLUX_VAE),
    },
    "sdxl": {
        "unet": ("diffusers", DENOISER["sdxl"], SDXL_UNET),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L),
        "text_encoder_2": ("transformers", "CLIPTextModelWithProjection", CLIP_BIG_G),
        "vae": ("diffusers", "AutoencoderKL", SDXL_VAE),
    },
    "sd15": {
        "unet": ("diffusers", DENOISER["sd"], SD15_UNET),
        "text_encoder": ("transformers", "CLIPTextModel", CLIP_L),
        "vae": ("diffusers", "AutoencoderKL", SD_VAE),
    },
}

_TRANSFORMERS_CONFIGS = {
    "CLIPTextModel": "CLIPTextConfig",
    "CLIPTextModelWithProjection": "CLIPTextConfig",
    "T5EncoderModel": "T5Config",
    "Qwen3Model": "Qwen3Config",
}


def build_empty(library: str, cls_name: str, config: dict[str, Any]) -> torch.nn.Module:
    """The component on the meta device: its real module tree, no weights and no memory."""
    import torch

    with torch.device("meta"):
        return _build(library, cls_name, config)


def build_components(model: str, device: torch.device, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """Every component of ``model`` (a key of :data:`MODELS`) at full size with random weights,
    initialised directly on ``device`` in ``dtype`` (seconds on a GPU, not minutes on the CPU)."""
    import torch

    previous = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return {name: _build(*spec) for name, spec in MODELS[model].items()}
    finally:
        torch.set_default_dtype(previous)


def _build(library: str, cls_name: str, config: dict[str, Any]) -> torch.nn.Module:
    import diffusers
    import transformers

    if library == "diffusers":
        return getattr(diffusers, cls_name).from_config(config)
    config_cls = getattr(transformers, _TRANSFORMERS_CONFIGS[cls_name])
    return getattr(transformers, cls_name)(config_cls(**config))


def count_parameters(module: torch.nn.Module) -> int:
    """Parameters of ``module`` (shared ones once)."""
    return sum(p.numel() for p in module.parameters())


def lora_parameters_per_rank(denoiser: torch.nn.Module, names: list[str], scope: tuple[str, ...] = ()) -> int:
    """LoRA parameters at rank 1 on every ``nn.Linear`` whose name ends in one of ``names``
    (under ``scope`` when given): ``in + out`` per layer."""
    import torch

    total = 0
    for name, module in denoiser.named_modules():
        if not isinstance(module, torch.nn.Linear) or (scope and not name.startswith(scope)):
            continue
        if any(name == s or name.endswith(f".{s}") for s in names):
            total += module.in_features + module.out_features
    return total
