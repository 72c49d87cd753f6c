"""Captions as text: what a model returned, cleaned or refused; trigger, prefix and suffix placed.

Pure functions, no torch: the cleaning is unit-tested on fake model outputs.
"""

from __future__ import annotations

import re
import unicodedata

# Control, format (zero-width, bidi), separators, surrogates, private use and unassigned: never
# caption text; U+FFFD is what a decoder writes for bytes it could not read.
_DROPPED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
_MARKUP = re.compile(r"</?s>|<pad>|<unk>|<\|[^|>]{1,32}\|>|<[A-Z_]{2,32}>|<image>")
_MIN_LETTERS = 2
_GARBLED_SHARE = 0.3  # more dropped characters than this share of the text: refused


class CaptionRefused(ValueError):
    """The model's caption for one image is unusable (the message says why)."""


def clean_caption(raw: str, max_chars: int) -> str:
    """The model's text as one clean line of at most ``max_chars`` characters (cut at a word
    boundary), or :class:`CaptionRefused` when nothing readable is left or most of it was noise."""
    text = _MARKUP.sub(" ", raw)
    kept = [c for c in text if c in "\t\n\r" or (c != "\ufffd" and unicodedata.category(c) not in _DROPPED_CATEGORIES)]
    dropped = len(text) - len(kept)
    line = " ".join("".join(kept).split())
    if dropped and dropped > _GARBLED_SHARE * max(len(text.strip()), 1):
        raise CaptionRefused(f"garbled: {dropped} of {len(text)} characters are control or undecodable characters")
    if sum(c.isalpha() for c in line) < _MIN_LETTERS:
        raise CaptionRefused("empty: the model returned no words" if not line else f"no words in {line[:40]!r}")
    return shorten(line, max_chars)


def shorten(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` at the last word boundary (a hard cut for one long word),
    without a dangling comma."""
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars + 1]
    space = cut.rfind(" ")
    cut = cut[:space] if space > max_chars // 2 else text[:max_chars]
    return cut.rstrip(" ,;:-")


def compose(caption: str, trigger_word: str | None, placement: str, prefix: str, suffix: str, max_chars: int) -> str:
    """``[trigger, ][prefix ]caption[ suffix][, trigger]`` within ``max_chars``: the generated
    part is shortened first, so the trigger, prefix and suffix always survive."""
    trigger = trigger_word if trigger_word and placement != "none" else ""
    if trigger and trigger.lower() in f"{prefix} {caption} {suffix}".lower():
        trigger = ""  # the caption already names it
    fixed = sum(len(part) + 2 for part in (prefix, suffix, trigger) if part)
    body = shorten(caption, max(max_chars - fixed, 1))
    text = " ".join(part for part in (prefix, body, suffix) if part)
    if trigger:
        text = f"{trigger}, {text}" if placement == "start" else f"{text}, {trigger}"
    return text
