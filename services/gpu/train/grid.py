"""The sample grid of a training run: one PNG, a row per step, a column per sample prompt.

Rows come from the snapshots (``save_every``) this run rendered, plus the final samples; each
row starts with a label column holding its step. Cells are the samples scaled to at most
``MAX_CELL`` pixels a side; past ``MAX_ROWS`` rows every other row is dropped (and later
snapshots are taken at the doubled stride), so a long run's grid stays bounded. The final row
is always kept.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import TYPE_CHECKING

from services.gpu.encode import encode_image
from services.gpu.types import ImageFile

if TYPE_CHECKING:
    from PIL import Image

MAX_CELL = 256
MAX_ROWS = 16
LABEL_WIDTH = 64
GRID_NAME = "samples-grid"


class SampleGrid:
    """Collects rows of samples (:meth:`add`) and draws them (:meth:`render`)."""

    def __init__(self, prompts: int, resolution: int, max_rows: int = MAX_ROWS) -> None:
        self.columns = prompts
        self.cell = min(resolution, MAX_CELL)
        self.max_rows = max(2, max_rows)
        self.rows: list[tuple[int, list[Image.Image]]] = []
        self.stride = 1  # keep every stride-th snapshot row
        self.seen = 0

    def add(self, step: int, samples: Sequence[ImageFile]) -> None:
        """A snapshot's samples (encoded images, one per prompt)."""
        self.seen += 1
        if (self.seen - 1) % self.stride:
            return
        self.rows.append((step, [self._cell(sample) for sample in samples]))
        if len(self.rows) >= self.max_rows:  # leave room for the final row
            self.rows = self.rows[::2]
            self.stride *= 2

    def _cell(self, sample: ImageFile) -> Image.Image:
        from PIL import Image

        with Image.open(io.BytesIO(sample.data)) as image:
            cell = image.convert("RGB")
        cell.thumbnail((self.cell, self.cell))
        return cell

    def render(self, final_step: int, final: Sequence[ImageFile]) -> ImageFile:
        """The grid with ``final`` as its last row, as ``samples-grid.png``."""
        from PIL import Image, ImageDraw

        rows = [*self.rows, (final_step, [self._cell(sample) for sample in final])]
        grid = Image.new("RGB", (LABEL_WIDTH + self.columns * self.cell, len(rows) * self.cell), "white")
        draw = ImageDraw.Draw(grid)
        for row, (step, cells) in enumerate(rows):
            top = row * self.cell
            draw.text((4, top + 4), f"step {step}", fill="black")
            for column, cell in enumerate(cells):
                grid.paste(cell, (LABEL_WIDTH + column * self.cell, top))
        return encode_image(grid, GRID_NAME, "png")
