"""The captioning model: a vision-language model that transformers ships natively, loaded
offline, with one generate call per batch of images.

``CAPTION_MODEL`` names it: a Hugging Face repo id found in the local cache / RunPod cached
models (never downloaded), an absolute directory, or ``builtin:tiny-florence2`` (random
weights built in code: nonsense captions, for the CPU tests). Two prompt styles, one loader
(``AutoProcessor`` + ``AutoModelForImageTextToText``):

* Florence-2 (``model_type`` florence2; the default, ``florence-community/Florence-2-base``):
  a task token, ``<CAPTION>`` (short) or ``<DETAILED_CAPTION>`` (detailed); encoder-decoder,
  so the output is the caption alone;
* any chat VLM (Qwen2.5-VL, Qwen3-VL, ...): an instruction in the processor's chat template,
  padded on the left, the prompt cut from the output.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.errors import InputError

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from config.settings import Settings

log = logging.getLogger(__name__)

TINY_CAPTIONER = "builtin:tiny-florence2"
BUILTIN_CAPTIONERS = (TINY_CAPTIONER,)
FLORENCE_TASKS = {"short": "<CAPTION>", "detailed": "<DETAILED_CAPTION>"}
CHAT_PROMPTS = {
    "short": "Describe this image in one sentence for a text-to-image training caption.",
    "detailed": "Describe this image in detail (subject, clothing, pose, background, lighting, style) "
    "in one paragraph for a text-to-image training caption.",
}
NEW_TOKENS = {"short": 48, "detailed": 192}
_TINY_SIDE = 32
_TINY_IMAGE_TOKENS = 17  # (32 / 4 / 2)^2 spatial tokens + 1 temporal


@dataclass
class Captioner:
    """A loaded VLM and its processor; :meth:`caption` returns the raw text per image."""

    name: str
    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype
    florence: bool

    def caption(self, images: list[Image.Image], detail: str) -> list[str]:
        import torch

        if self.florence:
            inputs = self.processor(text=[FLORENCE_TASKS[detail]] * len(images), images=images, return_tensors="pt")
        else:
            inputs = self.processor(
                text=[self._chat_prompt(detail)] * len(images), images=images, padding=True, return_tensors="pt"
            )
        inputs = {
            k: v.to(self.device, self.dtype) if v.is_floating_point() else v.to(self.device) for k, v in inputs.items()
        }
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=NEW_TOKENS[detail], do_sample=False, num_beams=1)
        if not self.florence:
            out = out[:, inputs["input_ids"].shape[1] :]
        return list(self.processor.batch_decode(out, skip_special_tokens=True))

    def _chat_prompt(self, detail: str) -> str:
        content = [{"type": "image"}, {"type": "text", "text": CHAT_PROMPTS[detail]}]
        messages = [{"role": "user", "content": content}]
        return str(self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))

    def release(self) -> None:
        """Drop the weights and give their GPU memory back (before training loads its model)."""
        import gc

        import torch

        self.model = self.processor = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def load_captioner(name: str, settings: Settings, device: torch.device, dtype: torch.dtype) -> Captioner:
    """The captioner ``name`` on ``device``; :class:`InputError` when it is not available offline."""
    if name in BUILTIN_CAPTIONERS:
        model, processor = build_tiny_florence2()
        return Captioner(name, model.to(device, dtype).eval(), processor, device, dtype, florence=True)
    folder = _model_folder(name, settings)
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # bars would flood the worker's logs

    try:
        processor = AutoProcessor.from_pretrained(folder, local_files_only=True)
        model = AutoModelForImageTextToText.from_pretrained(folder, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise InputError(f"CAPTION_MODEL {name}: cannot load it from {folder}: {exc}") from exc
    florence = getattr(model.config, "model_type", "") == "florence2"
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is not None and not florence:
        tokenizer.padding_side = "left"  # batched generation of a decoder-only model
    log.info("captioner %s loaded from %s (%s)", name, folder, type(model).__name__)
    return Captioner(name, model.to(device).eval(), processor, device, dtype, florence=florence)


def _model_folder(name: str, settings: Settings) -> Path:
    """An absolute directory as it is; a repo id's newest snapshot in the hub caches."""
    from services.gpu.models import hf_cache_dirs

    if name.startswith("/"):
        if not (Path(name) / "config.json").is_file():
            raise InputError(f"CAPTION_MODEL {name}: no config.json there")
        return Path(name)
    folder = "models--" + name.replace("/", "--")
    searched = hf_cache_dirs(settings)
    for cache in searched:
        found = sorted((cache / folder / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime)
        if found:
            return found[-1].parent
    raise InputError(
        f"CAPTION_MODEL {name} is not in the local Hugging Face cache (looked in "
        f"{', '.join(str(p) for p in searched)}); this worker never downloads models: bake it into the image, "
        "use RunPod cached models, or set CAPTION_MODEL=builtin:tiny-florence2 for tests"
    )


def build_tiny_florence2() -> tuple[Any, Any]:
    """A two-stage, 16-wide Florence-2 with random weights (fixed seed) and a byte-level
    tokenizer, built offline: its captions are nonsense, its code path the real one."""
    import torch
    from transformers import (
        CLIPImageProcessorPil,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
        PreTrainedTokenizerFast,
    )

    from services.gpu.families.tiny import TINY_SEED, _byte_bpe

    specials = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}
    backend = _byte_bpe([*specials.values(), "<image>"], "<unk>")
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, extra_special_tokens={"image_token": "<image>"}, **specials
    )
    side = {"height": _TINY_SIDE, "width": _TINY_SIDE}
    images = CLIPImageProcessorPil(size=side, crop_size=side, do_center_crop=False, image_seq_length=_TINY_IMAGE_TOKENS)
    vision = {
        "depths": [1, 1],
        "patch_size": [7, 3],
        "patch_stride": [4, 2],
        "patch_padding": [3, 1],
        "patch_prenorm": [False, True],
        "embed_dim": [8, 16],
        "num_heads": [1, 2],
        "num_groups": [1, 2],
        "window_size": 2,
        "projection_dim": 16,
        "max_position_embeddings": 8,
        "max_temporal_embeddings": 2,
    }
    text = {
        "model_type": "bart",
        "vocab_size": len(tokenizer),
        "d_model": 16,
        "encoder_layers": 1,
        "decoder_layers": 1,
        "encoder_attention_heads": 2,
        "decoder_attention_heads": 2,
        "encoder_ffn_dim": 32,
        "decoder_ffn_dim": 32,
        "max_position_embeddings": 256,
        "bos_token_id": 0,
        "pad_token_id": 1,
        "eos_token_id": 2,
        "decoder_start_token_id": 2,
        "forced_eos_token_id": 2,
    }
    config = Florence2Config(vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = Florence2ForConditionalGeneration(config)
    return model.eval(), Florence2Processor(image_processor=images, tokenizer=tokenizer)
