"""The original checkpoint layout of each family's denoiser, which ComfyUI, A1111/Forge and
kohya sd-scripts patch: LDM/SGM for SD/SDXL, BFL for FLUX.1, Tongyi's for Z-Image.

``layout(family, denoiser)`` maps every diffusers weight to ``(original key, first row, rows)``
(fused originals hold several diffusers weights, stacked by rows). Each map is checked against
diffusers' own single-file converters (``diffusers.loaders.single_file_utils``): a synthetic
original-layout dict built from the map must convert back to exactly the model's keys and
shapes (and, where the converter takes any width, to the very tensors), so the map is the
converters' inverse rather than a copy of any UI's code.
"""

from __future__ import annotations

import re
from typing import Any

Slot = tuple[str, int, int]  # original key, first row, rows

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3"}
RESNET |= {"time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _ldm_name(key: str, config: Any) -> str:
    per = config["layers_per_block"] + 1
    top = next((v + key[len(k) :] for k, v in UNET_TOP.items() if key.startswith(k + ".")), None)
    if top is not None:
        return top
    if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", key):
        side, block, kind, layer, rest = m.groups()
        index = per * int(block) + int(layer) + (1 if side == "down" else 0)
        blocks = "input_blocks" if side == "down" else "output_blocks"
        if kind == "resnets":
            name, tail = rest.split(".", 1)
            return f"{blocks}.{index}.0.{RESNET[name]}.{tail}"
        return f"{blocks}.{index}.1.{rest}"
    if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", key):
        return f"input_blocks.{per * (int(m[1]) + 1)}.0.op.{m[2]}"
    if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.(.+)", key):
        cross = "CrossAttn" in config["up_block_types"][int(m[1])]
        return f"output_blocks.{per * int(m[1]) + per - 1}.{2 if cross else 1}.{m[2]}"
    if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)\.(.+)", key):
        return f"middle_block.{2 * int(m[1])}.{RESNET[m[2]]}.{m[3]}"
    raise KeyError(key)


def unet_layout(unet: Any) -> dict[str, Slot]:
    return {k: (_ldm_name(k, unet.config), 0, v.shape[0]) for k, v in unet.state_dict().items()}


FLUX_DOUBLE = {
    "norm1.linear": "img_mod.lin",
    "norm1_context.linear": "txt_mod.lin",
    "attn.norm_q.weight": "img_attn.norm.query_norm.scale",
    "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
    "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
    "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale",
    "ff.net.0.proj": "img_mlp.0",
    "ff.net.2": "img_mlp.2",
    "ff_context.net.0.proj": "txt_mlp.0",
    "ff_context.net.2": "txt_mlp.2",
    "attn.to_out.0": "img_attn.proj",
    "attn.to_add_out": "txt_attn.proj",
}
FLUX_SINGLE = {
    "norm.linear": "modulation.lin",
    "attn.norm_q.weight": "norm.query_norm.scale",
    "attn.norm_k.weight": "norm.key_norm.scale",
    "proj_out": "linear2",
}
FLUX_TOP = {
    "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
    "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
    "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
    "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
    "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
    "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
    "context_embedder": "txt_in",
    "x_embedder": "img_in",
    "proj_out": "final_layer.linear",
    "norm_out.linear": "final_layer.adaLN_modulation.1",
}


def _renamed(rest: str, table: dict[str, str]) -> str | None:
    for old, new in table.items():
        if rest == old or rest.startswith(old + "."):
            return new + rest[len(old) :]
    return None


def _flux_slot(key: str, width: int) -> Slot:
    fused_rows = {"to_q": 0, "to_k": 1, "to_v": 2, "add_q_proj": 0, "add_k_proj": 1, "add_v_proj": 2}
    if m := re.fullmatch(r"transformer_blocks\.(\d+)\.(.+)", key):
        block, rest = f"double_blocks.{m[1]}.", m[2]
        if f := re.fullmatch(r"attn\.(to_[qkv]|add_[qkv]_proj)\.(\w+)", rest):
            stream = "img" if f[1].startswith("to_") else "txt"
            return f"{block}{stream}_attn.qkv.{f[2]}", fused_rows[f[1]] * width, width
        return block + _renamed(rest, FLUX_DOUBLE), 0, -1
    if m := re.fullmatch(r"single_transformer_blocks\.(\d+)\.(.+)", key):
        block, rest = f"single_blocks.{m[1]}.", m[2]
        if f := re.fullmatch(r"attn\.(to_[qkv])\.(\w+)", rest):
            return f"{block}linear1.{f[2]}", fused_rows[f[1]] * width, width
        if f := re.fullmatch(r"proj_mlp\.(\w+)", rest):
            return f"{block}linear1.{f[1]}", 3 * width, 4 * width
        return block + _renamed(rest, FLUX_SINGLE), 0, -1
    return _renamed(key, FLUX_TOP), 0, -1


def flux_layout(transformer: Any) -> dict[str, Slot]:
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    out = {}
    for key, value in transformer.state_dict().items():
        name, start, rows = _flux_slot(key, width)
        out[key] = (name, start, value.shape[0] if rows < 0 else rows)
    return out


ZIMAGE_RENAMES = {
    "all_final_layer.2-1.": "final_layer.",
    "all_x_embedder.2-1.": "x_embedder.",
    ".attention.to_out.0.": ".attention.out.",
    ".attention.norm_k.": ".attention.k_norm.",
    ".attention.norm_q.": ".attention.q_norm.",
}


def zimage_layout(transformer: Any) -> dict[str, Slot]:
    out = {}
    for key, value in transformer.state_dict().items():
        name = key
        for new, old in ZIMAGE_RENAMES.items():
            name = name.replace(new, old)
        if m := re.fullmatch(r"(.+\.attention)\.to_([qkv])\.(\w+)", name):
            out[key] = (f"{m[1]}.qkv.{m[3]}", "qkv".index(m[2]) * value.shape[0], value.shape[0])
        else:
            out[key] = (name, 0, value.shape[0])
    return out


def original_shapes(layout: dict[str, Slot], model_state: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Each original key's shape: its slots' rows stacked, the rest of the shape as the parts'."""
    rows: dict[str, int] = {}
    tails: dict[str, tuple[int, ...]] = {}
    for key, (name, start, count) in layout.items():
        rows[name] = max(rows.get(name, 0), start + count)
        tails[name] = tuple(model_state[key].shape[1:])
    return {name: (rows[name], *tails[name]) for name in rows}
