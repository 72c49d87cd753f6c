"""The one gate every decoded image goes through: format, pixel cap, then a full decode.

An image is refused, with an :class:`InputError` that starts with the caller's ``label``
(``url https://h/a.png``, ``zip entry 'cat.png'``: never a local path), when:

- its first bytes are not PNG, JPEG, WEBP, GIF, BMP or TIFF: ``not an image (accepted: ...)``;
- its header says more pixels than ``max_pixels``, checked before any pixel is decoded:
  ``14900x12000 is over 4194304 pixels (MAX_IMAGE_PIXELS)`` (a 500 KB PNG can claim that);
- the full decode fails: ``not a decodable PNG image (...)``.

The header is read by the format's own Pillow plugin, without ``Image.open``'s
decompression-bomb check, so ``MAX_IMAGE_PIXELS`` is the only limit, whatever Pillow's
process-wide ``Image.MAX_IMAGE_PIXELS`` says, and no Pillow warning is raised or needed.

These functions block (decoding is CPU work): call them through ``asyncio.to_thread``.

Example::

    info = check_image_file(path, settings.max_image_pixels, label="zip entry 'cat.png'")
    info.format, info.width, info.height
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from PIL import Image, ImageFile

from services.errors import InputError

IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF")
# The file names a dataset's images and captions go by (zip entries, stored objects, training folders).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSION = ".txt"


def skipped_in_datasets(parts: tuple[str, ...]) -> bool:
    """True for a path a dataset leaves out: any part starting with ``.`` (``.DS_Store``, macOS
    ``._`` resource forks) or a ``__MACOSX`` folder (what the macOS archiver adds to a zip)."""
    return any(part.startswith(".") or part == "__MACOSX" for part in parts)


# What Pillow raises for data it cannot decode (plugins raise SyntaxError for broken headers).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, TypeError, struct.error)


@dataclass(frozen=True, slots=True)
class ImageInfo:
    """A checked image: its format (one of :data:`IMAGE_FORMATS`) and size in pixels."""

    format: str
    width: int
    height: int


def sniff_format(head: bytes) -> str | None:
    """The accepted format whose signature ``head`` (the first 16 bytes or more) starts with."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if head.startswith(b"BM"):
        return "BMP"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return "TIFF"
    return None


def _read_header(fp: IO[bytes], fmt: str) -> ImageFile.ImageFile:
    """Parse ``fmt``'s header with the opener its Pillow plugin registers; decode nothing."""
    if fmt not in Image.OPEN:
        Image.init()  # the WEBP and TIFF plugins are not among the ones Pillow loads first
    factory = Image.OPEN[fmt][0]
    fp.seek(0)
    return factory(fp, "")


def _open_header(fp: IO[bytes], max_pixels: int, label: str) -> ImageFile.ImageFile:
    """The image in ``fp`` with its header read and its size within the cap; nothing decoded."""
    fp.seek(0)
    fmt = sniff_format(fp.read(16))
    if fmt is None:
        raise InputError(f"{label}: not an image (accepted: {', '.join(IMAGE_FORMATS)})")
    try:
        image = _read_header(fp, fmt)
    except _DECODE_ERRORS as exc:
        raise InputError(f"{label}: not a decodable {fmt} image ({exc or type(exc).__name__})") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise InputError(f"{label}: {width}x{height} is over {max_pixels} pixels (MAX_IMAGE_PIXELS)")
    if width < 1 or height < 1:
        image.close()
        raise InputError(f"{label}: not a decodable {fmt} image (size {width}x{height})")
    return image


def open_image(fp: IO[bytes], max_pixels: int, label: str) -> Image.Image:
    """Check and fully decode the image in ``fp``; return it loaded (the caller closes it).

    Raises :class:`InputError` (``{label}: ...``) as described in the module docstring.
    """
    image = _open_header(fp, max_pixels, label)
    try:
        image.load()
    except _DECODE_ERRORS as exc:
        image.close()
        raise InputError(f"{label}: not a decodable {image.format} image ({exc or type(exc).__name__})") from exc
    return image


def _info(fp: IO[bytes], max_pixels: int, label: str, decode: bool) -> ImageInfo:
    opened = open_image(fp, max_pixels, label) if decode else _open_header(fp, max_pixels, label)
    with opened as image:
        return ImageInfo(format=str(image.format), width=image.width, height=image.height)


def check_image_file(path: Path, max_pixels: int, label: str, *, decode: bool = True) -> ImageInfo:
    """Check the image file at ``path`` (``label`` names it in errors; never the path).

    ``decode=False`` stops after the header and the pixel cap (no pixel is decoded): for a
    file that a later step decodes through :func:`open_image` anyway.
    """
    with Path(path).open("rb") as fp:
        return _info(fp, max_pixels, label, decode)


def check_image_bytes(data: bytes, max_pixels: int, label: str, *, decode: bool = True) -> ImageInfo:
    """Check an image held in memory (an inline upload), as :func:`check_image_file` does."""
    return _info(io.BytesIO(data), max_pixels, label, decode)
