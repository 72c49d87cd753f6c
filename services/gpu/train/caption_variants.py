"""Caption dropout and tag shuffling, with the text-embedding cache kept.

* ``caption_dropout`` (ai-toolkit's): each sample of a batch trains on the empty caption with
  this probability. The empty caption is one more text, encoded once with the others.
* ``shuffle_caption`` / ``keep_tokens`` (kohya's): a caption's comma-separated tags in a new
  order, the first ``keep_tokens`` in place. kohya reshuffles every step and so cannot cache the
  text embeddings; here every caption gets :data:`SHUFFLE_VARIANTS` fixed orders drawn from the
  seed up front, all encoded once (the cache costs that many encodes per caption), and each
  sample picks one. The same variants are used with ``cache_text_embeddings: false``, so the
  cache stays an optimisation and both settings train on the same texts.

Every draw is a pure function of the seed, the batch plan's cursor and the sample's place in
the batch: a run is deterministic for a seed and a resumed run draws what the uninterrupted one
would have (the cursor is in the checkpoint), with no RNG state of its own to save. Without
either option the texts are the unique captions and each image gets its own (the plain path).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from dataclasses import dataclass

from services.gpu.catalog import SHUFFLE_VARIANTS

_SCALE = float(1 << 53)


def shuffled_variants(caption: str, keep_tokens: int, seed: int, count: int = SHUFFLE_VARIANTS) -> list[str]:
    """Up to ``count`` distinct orders of ``caption``'s tags, the first ``keep_tokens`` kept."""
    tags = [tag.strip() for tag in caption.split(",") if tag.strip()]
    head, tail = tags[:keep_tokens], tags[keep_tokens:]
    rng = random.Random(f"{seed}\x00{caption}")  # noqa: S311 - a reproducible order, not a secret
    variants = []
    for _ in range(count):
        order = list(tail)
        rng.shuffle(order)
        variants.append(", ".join(head + order))
    return list(dict.fromkeys(variants))


def _uniforms(seed: int, draw: int, position: int) -> tuple[float, float]:
    digest = hashlib.blake2b(f"{seed}:{draw}:{position}".encode(), digest_size=16).digest()
    first, second = int.from_bytes(digest[:8], "big") >> 11, int.from_bytes(digest[8:], "big") >> 11
    return first / _SCALE, second / _SCALE


@dataclass(frozen=True)
class CaptionVariants:
    """The texts to encode and, per image, the ids of its variants (``empty``: the dropout text)."""

    texts: list[str]
    per_image: list[list[int]]
    dropout: float = 0.0
    seed: int = 0
    empty: int | None = None

    @classmethod
    def build(
        cls, captions: Sequence[str], dropout: float = 0.0, shuffle: bool = False, keep_tokens: int = 0, seed: int = 0
    ) -> CaptionVariants:
        texts: dict[str, int] = {}
        per_image = []
        for caption in captions:
            options = shuffled_variants(caption, keep_tokens, seed) if shuffle else [caption]
            per_image.append([texts.setdefault(text, len(texts)) for text in options])
        empty = texts.setdefault("", len(texts)) if dropout > 0 else None
        return cls(list(texts), per_image, dropout, seed, empty)

    def choose(self, index: Sequence[int], draw: int) -> list[int]:
        """The text id of each image of batch number ``draw``."""
        chosen = []
        for position, image in enumerate(index):
            options = self.per_image[image]
            if self.empty is None and len(options) == 1:
                chosen.append(options[0])
                continue
            drop, pick = _uniforms(self.seed, draw, position)
            if self.empty is not None and drop < self.dropout:
                chosen.append(self.empty)
            else:
                chosen.append(options[min(int(pick * len(options)), len(options) - 1)])
        return chosen
