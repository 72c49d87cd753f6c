"""Peak GPU memory of a training step or a generation, from a :class:`ModelSpec` (pure).

Activations (what a training step keeps for backward, bf16, batch 1) follow per-block
coefficients calibrated on the meta device with the real full-width blocks
(:mod:`services.gpu.memory.measure`; ``tests/gpu/test_memory.py`` re-measures them at 256 and
512 px, with and without checkpointing, and holds the estimate within ``ACTIVATION_ERROR``):

- FLUX.1: every block keeps ``k * width`` bytes per token (image + T5 tokens), ``k`` = 48.5
  (double block), 42.15 (single block), 3.79 outside the blocks;
- Z-Image: 58.13 (refiner blocks, on the image or caption tokens), 62.13 (main blocks, both);
- SD/SDXL UNets: bytes per latent pixel plus a fixed part (the 77 text tokens), whole UNet.

With gradient checkpointing a block keeps only its input (``2 * width`` bytes per token) and one
block is recomputed at a time: ``outside + sum(inputs) + max(block)``. The backward's gradient
buffers add one block more in both cases.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.gpu.memory.specs import ModelSpec

GIB = 2**30
ACTIVATION_ERROR = 0.10  # the estimate is within 10 % of the meta measurement (tests)
NF4_BYTES = 0.5625  # 4 bits + one fp32 absmax per 64 weights
LORA_BYTES = 16  # fp32 weight, gradient and AdamW's two moments
DTYPE_SCALE = {"bf16": 1.0, "fp16": 1.0, "fp32": 2.0}

FLUX_DOUBLE, FLUX_SINGLE, FLUX_OUTSIDE = 48.5, 42.15, 3.79
ZIMAGE_REFINER, ZIMAGE_MAIN, ZIMAGE_OUTSIDE = 58.13, 62.13, 2.0
CKPT_INPUT = 2.0  # a block's input: one bf16 element of width per token
UNET_BLOCK = 0.03  # the largest checkpointed UNet block, a share of the whole (measured: 2 %)
# UNet (no checkpointing, checkpointing): bytes per latent pixel, fixed bytes; at base width 320
UNET = {
    "sdxl": ((366_148.0, 26_290_944.0), (37_514.0, 521_664.0)),
    "sd": ((206_273.9, 4_048_384.0), (52_080.0, 226_624.0)),
}
# The families with a calibrated activation model; any other gets no plan (explicit inputs only).
MODELLED_FAMILIES = ("flux", "zimage", *UNET)
# generation: transient bytes per token per width unit of one forward, and the VAE decode's
# per output pixel (to measure on a GPU; stated, not calibrated)
INFER_PER_TOKEN_WIDTH = 24.0
VAE_DECODE_PER_PIXEL = 1536.0


@dataclass(frozen=True)
class Blocks:
    """Kept bytes of one denoiser pass: outside the blocks, and per block (bf16, batch 1)."""

    outside: float
    blocks: list[float]
    inputs: list[float]
    backward: float = 0.0  # the backward's gradient buffers (one block)

    def kept(self, checkpointing: bool) -> float:
        if checkpointing:
            return self.outside + sum(self.inputs) + max(self.blocks, default=0.0)
        return self.outside + sum(self.blocks)


def image_tokens(spec: ModelSpec, height: int, width: int) -> int:
    return (height // 16) * (width // 16)


def _flux(spec: ModelSpec, height: int, width: int) -> Blocks:
    cfg = spec.config
    hidden = cfg.get("num_attention_heads", 24) * cfg.get("attention_head_dim", 128)
    tokens = image_tokens(spec, height, width) + spec.text_tokens
    per = tokens * hidden
    double, single = cfg.get("num_layers", 19), cfg.get("num_single_layers", 38)
    blocks = [FLUX_DOUBLE * per] * double + [FLUX_SINGLE * per] * single
    return Blocks(FLUX_OUTSIDE * per, blocks, [CKPT_INPUT * per] * (double + single), max(blocks, default=0.0))


def _zimage(spec: ModelSpec, height: int, width: int) -> Blocks:
    cfg = spec.config
    hidden, refiners, layers = cfg.get("dim", 3840), cfg.get("n_refiner_layers", 2), cfg.get("n_layers", 30)
    image, text = image_tokens(spec, height, width), spec.text_tokens
    sizes = [image] * refiners + [text] * refiners + [image + text] * layers
    coefs = [ZIMAGE_REFINER] * (2 * refiners) + [ZIMAGE_MAIN] * layers
    blocks = [k * n * hidden for k, n in zip(coefs, sizes, strict=True)]
    inputs = [CKPT_INPUT * n * hidden for n in sizes]
    return Blocks(ZIMAGE_OUTSIDE * (image + text) * hidden, blocks, inputs, max(blocks, default=0.0))


def _unet(spec: ModelSpec, height: int, width: int) -> Blocks:
    (plain, fixed), (ckpt, ckpt_fixed) = UNET[spec.family]
    scale = spec.config.get("block_out_channels", [320])[0] / 320
    pixels = (height // 8) * (width // 8)
    whole = (plain * pixels + fixed) * scale
    # checkpointed: outside + inputs + one block, as one figure; the block is its largest
    return Blocks(0.0, [whole], [(ckpt * pixels + ckpt_fixed) * scale - whole], UNET_BLOCK * whole)


def blocks(spec: ModelSpec, height: int, width: int) -> Blocks:
    """The kept-bytes model of ``spec``'s denoiser at ``height`` x ``width`` pixels."""
    if spec.family == "flux":
        return _flux(spec, height, width)
    if spec.family == "zimage":
        return _zimage(spec, height, width)
    return _unet(spec, height, width)


def activation_bytes(
    spec: ModelSpec, height: int, width: int, batch: int, checkpointing: bool, precision: str = "bf16"
) -> float:
    """Bytes kept for backward by one training micro-batch (without the backward's buffers)."""
    return blocks(spec, height, width).kept(checkpointing) * batch * DTYPE_SCALE[precision]


def inference_bytes(spec: ModelSpec, height: int, width: int, images: int) -> float:
    """The transient of one denoiser forward and of the VAE decode (generation)."""
    hidden = _width(spec.config)
    tokens = image_tokens(spec, height, width) + spec.text_tokens
    guidance = 2 if spec.family in ("sd", "sdxl") else 1  # classifier-free guidance doubles the batch
    forward = INFER_PER_TOKEN_WIDTH * tokens * hidden * images * guidance
    return forward + VAE_DECODE_PER_PIXEL * height * width


def _width(cfg: dict) -> int:
    """The denoiser's token width: Z-Image's ``dim``, FLUX.1's heads x head dim, a UNet's widest
    block (its attention runs at every width; the widest bounds the transient)."""
    if isinstance(cfg.get("dim"), int):
        return int(cfg["dim"])
    heads, head_dim = cfg.get("num_attention_heads"), cfg.get("attention_head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads * head_dim
    channels = cfg.get("block_out_channels")
    return int(max(channels)) if isinstance(channels, list | tuple) and channels else 1280
