"""FLUX.1 LoRA keys in Black Forest Labs' layout, as kohya sd-scripts writes them.

BFL's checkpoint fuses what diffusers keeps apart: ``double_blocks.N.img_attn.qkv`` is the
image stream's q, k and v, ``txt_attn.qkv`` the text stream's, and ``single_blocks.N.linear1``
is q, k, v and the MLP's input projection stacked by rows. A LoRA on a fused module stacks the
parts' down matrices (rank = the parts' ranks added) and puts their up matrices on the
diagonal of a block matrix whose other entries are zero, so it changes each part's rows by
exactly that part's ``up @ down``. Parts not trained (``proj_mlp`` under ``attention`` targets)
get zero rows. :func:`to_bfl` and :func:`from_bfl` convert both ways using the model's own widths
(diffusers' importer assumes FLUX.1's full-size 3072/12288 split of ``linear1``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from services.gpu.families.base import Tensors

PREFIX = "lora_unet_"
Part = tuple[str, int]  # diffusers module path, its output width


def bfl_modules(config: Any) -> dict[str, list[Part]]:
    """Every LoRA-able BFL module of a FLUX.1 transformer: its diffusers parts, in row order."""
    width = int(config.num_attention_heads * config.attention_head_dim)
    mlp = 4 * width
    table: dict[str, list[Part]] = {}
    for i in range(int(config.num_layers)):
        d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
        table[b + "img_attn.qkv"] = [(d + f"attn.to_{p}", width) for p in "qkv"]
        table[b + "txt_attn.qkv"] = [(d + f"attn.add_{p}_proj", width) for p in "qkv"]
        table[b + "img_attn.proj"] = [(d + "attn.to_out.0", width)]
        table[b + "txt_attn.proj"] = [(d + "attn.to_add_out", width)]
        table[b + "img_mlp.0"] = [(d + "ff.net.0.proj", mlp)]
        table[b + "img_mlp.2"] = [(d + "ff.net.2", width)]
        table[b + "txt_mlp.0"] = [(d + "ff_context.net.0.proj", mlp)]
        table[b + "txt_mlp.2"] = [(d + "ff_context.net.2", width)]
        table[b + "img_mod.lin"] = [(d + "norm1.linear", 6 * width)]
        table[b + "txt_mod.lin"] = [(d + "norm1_context.linear", 6 * width)]
    for i in range(int(config.num_single_layers)):
        d, b = f"single_transformer_blocks.{i}.", f"single_blocks.{i}."
        table[b + "linear1"] = [*((d + f"attn.to_{p}", width) for p in "qkv"), (d + "proj_mlp", mlp)]
        table[b + "linear2"] = [(d + "proj_out", width)]
        table[b + "modulation.lin"] = [(d + "norm.linear", 3 * width)]
    return table


def kohya_name(bfl_module: str) -> str:
    """``double_blocks.0.img_attn.qkv`` -> ``lora_unet_double_blocks_0_img_attn_qkv``."""
    return PREFIX + bfl_module.replace(".", "_")


def _fused(parts: list[Part], layers: Tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """Stacked down matrices and the block-diagonal up matrix of the trained parts."""
    import torch

    downs = [layers[f"{module}.lora_A.weight"] for module, _ in parts if f"{module}.lora_A.weight" in layers]
    down = torch.cat(downs, dim=0)
    up = torch.zeros(sum(width for _, width in parts), down.shape[0], dtype=down.dtype)
    row = col = 0
    for module, width in parts:
        if f"{module}.lora_A.weight" in layers:
            part = layers[f"{module}.lora_B.weight"]
            up[row : row + width, col : col + part.shape[1]] = part
            col += part.shape[1]
        row += width
    return down, up


def to_bfl(layers: Tensors, config: Any) -> Tensors:
    """peft-named layers (alpha folded) as a kohya/BFL file; every layer must find its module."""
    import torch

    out: Tensors = {}
    used: set[str] = set()
    for bfl, parts in bfl_modules(config).items():
        trained = [module for module, _ in parts if f"{module}.lora_A.weight" in layers]
        if not trained:
            continue
        down, up = _fused(parts, layers)
        name = kohya_name(bfl)
        out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        out[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        used.update(f"{module}.lora_{ab}.weight" for module in trained for ab in "AB")
    left = sorted(set(layers) - used)
    if left:
        raise ValueError(f"no BFL module for LoRA layers {left[:3]} (of {len(left)})")
    return out


def _split(parts: list[Part], down: torch.Tensor, up: torch.Tensor) -> Tensors:
    """The inverse of :func:`_fused`: exact where ``up`` is block-diagonal over the trained parts,
    else every trained part keeps the whole down matrix and its rows of ``up`` (the same delta)."""
    starts = [sum(width for _, width in parts[:j]) for j in range(len(parts))]
    rows = [up[start : start + width] for start, (_, width) in zip(starts, parts, strict=True)]
    trained = [j for j, block in enumerate(rows) if bool(block.any())] or list(range(len(parts)))
    rank = down.shape[0] // len(trained)
    diagonal = down.shape[0] % len(trained) == 0 and all(
        not bool(rows[j][:, : n * rank].any()) and not bool(rows[j][:, (n + 1) * rank :].any())
        for n, j in enumerate(trained)
    )
    out: Tensors = {}
    for n, j in enumerate(trained):
        module = parts[j][0]
        if diagonal:
            out[f"{module}.lora_A.weight"] = down[n * rank : (n + 1) * rank].contiguous()
            out[f"{module}.lora_B.weight"] = rows[j][:, n * rank : (n + 1) * rank].contiguous()
        else:
            out[f"{module}.lora_A.weight"], out[f"{module}.lora_B.weight"] = down.clone(), rows[j].contiguous()
    return out


def from_bfl(state: Tensors, config: Any) -> Tensors | None:
    """A kohya/BFL file as ``transformer.``-prefixed peft layers (its ``.alpha`` folded into the
    up matrices); None when a key is not one of :func:`bfl_modules` (diffusers' importer then)."""
    by_name = {kohya_name(bfl): parts for bfl, parts in bfl_modules(config).items()}
    names = {key.split(".", 1)[0] for key in state}
    if not names or any(name not in by_name for name in names):
        return None
    out: Tensors = {}
    for name in sorted(names):
        down, up = state[f"{name}.lora_down.weight"].float(), state[f"{name}.lora_up.weight"].float()
        alpha = state.get(f"{name}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        split = _split(by_name[name], down, up * scale)
        out.update({f"transformer.{key}": value for key, value in split.items()})
    return out
