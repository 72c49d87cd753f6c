"""Shared pieces of the tiny built-in models, built in code with no hub access.

Each family module builds its own tiny pipeline (``ModelFamily.build_tiny``) from these
pieces. Weights come from a fixed seed on a forked CPU generator, so every process builds the
same model. Tokenizers are built offline from a byte-level vocabulary and no merges (every
character is one token): CLIP's (the 256 byte characters, the same with ``</w>``, plus the
start and end tokens: 514 entries), a T5 tokenizer and a Qwen-style one with a chat template.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

TINY_SEED = 20_240_601
TINY_SIZE = 32  # pixels; latents are 16x16 (the tiny VAE downsamples by 2)
TEXT_HIDDEN = 16
MAX_TOKENS = 77
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def byte_characters() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (the alphabet of byte-level BPE)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = list(printable)
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return [chr(code) for _, code in sorted(zip(printable, codes, strict=True))]


def byte_level_vocab() -> dict[str, int]:
    """The 514-entry CLIP vocabulary: byte characters, the same with ``</w>``, start and end."""
    chars = byte_characters()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: index for index, token in enumerate(tokens)}


def clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with no merges (one token per character), 77 tokens long, built offline."""
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=byte_level_vocab(), merges=[], model_max_length=MAX_TOKENS)


def _byte_bpe(specials: list[str], unknown: str | None) -> Any:
    """A ``tokenizers`` byte-level BPE with no merges: ``specials`` first, then the 256 bytes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: index for index, token in enumerate(specials)}
    for char in byte_characters():
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unknown))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def t5_tokenizer() -> PreTrainedTokenizerFast:
    """A T5 tokenizer (pad 0, end 1, unknown 2; ``</s>`` appended) over single bytes."""
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    tokenizer = _byte_bpe(["<pad>", "</s>", "<unk>"], "<unk>")
    tokenizer.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    specials = {"pad_token": "<pad>", "eos_token": "</s>", "unk_token": "<unk>"}  # token names, not secrets
    return T5TokenizerFast(tokenizer_object=tokenizer, **specials)


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """A Qwen2-style tokenizer over single bytes, with a minimal chat template."""
    from transformers import Qwen2TokenizerFast

    tokenizer = _byte_bpe(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], None)
    specials = {"pad_token": "<|endoftext|>", "eos_token": "<|im_end|>", "unk_token": None, "bos_token": None}
    return Qwen2TokenizerFast(tokenizer_object=tokenizer, chat_template=CHAT_TEMPLATE, **specials)


def clip_config(tokenizer: CLIPTokenizer, **extra: Any) -> Any:
    """A two-layer, 16-wide CLIP text encoder config."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=32,
        num_attention_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **extra,
    )


def vae(**extra: Any) -> Any:
    """A two-level AutoencoderKL (downsamples by 2), 4 latent channels; ``extra`` overrides."""
    from diffusers import AutoencoderKL

    config: dict[str, Any] = {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "block_out_channels": (8, 16),
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": TINY_SIZE,
    }
    config.update(extra)
    return AutoencoderKL(**config)


def flow_vae() -> Any:
    """The tiny VAE with a FLUX.1-like latent shift and scale (and no quant convs)."""
    return vae(use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
