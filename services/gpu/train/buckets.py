"""Aspect-ratio buckets: every image keeps its aspect ratio and trains at the bucket of nearest
ratio with about the model's native area, sides in ``step`` pixel steps (64 on full-size models).

:class:`BatchPlan` draws the whole run's batches up front from the seed: each epoch shuffles the
images of every bucket, cuts them into full batches of one bucket (the last one topped up from
the same bucket's next shuffle), and shuffles the batch order. The plan and its cursor are
plain data (``dataclasses.asdict``), so a checkpoint can save and restore the loop's position.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

MAX_RATIO = 4.0  # the widest bucket, either way (1:4 .. 4:1)

Size = tuple[int, int]  # (width, height) in pixels


def bucket_sizes(side: int, step: int, max_ratio: float = MAX_RATIO) -> list[Size]:
    """Sizes with about ``side * side`` pixels, sides multiples of ``step``, ratio at most ``max_ratio``.

    Symmetric: every size comes with its transpose, so a portrait image finds a bucket as close
    to its ratio as the landscape one of the same ratio (stepping only the width would leave
    portraits with coarser heights: a 2:3 image lost 14 % of its height at 512 px).
    """
    area = side * side
    sizes: set[Size] = set()
    width = step
    while width <= side * max_ratio:
        height = max(step, round(area / width / step) * step)
        if max(width / height, height / width) <= max_ratio and width * height <= area * 1.1:
            sizes.update({(width, height), (height, width)})
        width += step
    sizes.add((side - side % step or step, side - side % step or step))
    return sorted(sizes)


def nearest_bucket(width: int, height: int, sizes: Sequence[Size]) -> Size:
    """The size whose aspect ratio is nearest to ``width / height`` (in log ratio; ties: larger area)."""
    ratio = math.log(width / height)
    return min(sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - ratio), -s[0] * s[1]))


def label(size: Size) -> str:
    return f"{size[0]}x{size[1]}"


@dataclass
class BatchPlan:
    """The run's micro-batches (lists of example indices, one bucket each) and the cursor."""

    batches: list[list[int]]
    cursor: int = 0
    counts: dict[str, int] = field(default_factory=dict)  # examples per bucket label

    @classmethod
    def draw(cls, buckets: Sequence[Size], batch_size: int, count: int, seed: int) -> BatchPlan:
        """``count`` full micro-batches over examples whose bucket is ``buckets[i]``."""
        rng = random.Random(seed)  # noqa: S311 (a reproducible shuffle, not a secret)
        members: dict[Size, list[int]] = {}
        for index, size in enumerate(buckets):
            members.setdefault(size, []).append(index)
        pending: dict[Size, list[int]] = {size: [] for size in members}
        batches: list[list[int]] = []
        while len(batches) < count:
            epoch: list[list[int]] = []
            for size in sorted(members):
                order = pending[size] + rng.sample(members[size], len(members[size]))
                while len(order) < batch_size:  # a bucket smaller than a batch repeats its images
                    order += rng.sample(members[size], len(members[size]))
                full = len(order) - len(order) % batch_size
                epoch += [order[i : i + batch_size] for i in range(0, full, batch_size)]
                pending[size] = order[full:]
            rng.shuffle(epoch)
            batches += epoch
        counts = Counter(label(size) for size in buckets)
        return cls(batches=batches[:count], counts=dict(sorted(counts.items())))

    def next(self) -> list[int]:
        batch = self.batches[self.cursor]
        self.cursor += 1
        return batch
