"""Encode PIL images into :class:`ImageFile` (PNG, JPEG or WebP)."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

from services.gpu.types import ImageFile

if TYPE_CHECKING:
    from PIL import Image

_FORMATS = {
    "png": ("PNG", "png", "image/png"),
    "jpeg": ("JPEG", "jpg", "image/jpeg"),
    "webp": ("WEBP", "webp", "image/webp"),
}


def encode_image(image: Image.Image, stem: str, fmt: str = "png", quality: int = 90) -> ImageFile:
    """``stem.<ext>`` encoded as ``fmt``; ``quality`` applies to JPEG and WebP."""
    pil_format, extension, mime = _FORMATS[fmt]
    buffer = io.BytesIO()
    if pil_format == "PNG":
        image.save(buffer, format="PNG")
    else:
        image.convert("RGB").save(buffer, format=pil_format, quality=quality)
    return ImageFile(name=f"{stem}.{extension}", mime=mime, data=buffer.getvalue())
