"""Training datasets: images plus optional same-name ``.txt`` captions, validated before any
model is loaded, then resized to their aspect-ratio bucket (:mod:`services.gpu.train.buckets`)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps

from config.settings import Settings
from services.errors import InputError
from services.ingest.images import CAPTION_EXTENSION, IMAGE_EXTENSIONS, check_image_file, skipped_in_datasets

log = logging.getLogger(__name__)

_MAX_NAMED = 10
DEFAULT_MAX_PIXELS: int = Settings.model_fields["max_image_pixels"].default
DEFAULT_MAX_CAPTION_CHARS: int = Settings.model_fields["max_caption_chars"].default


@dataclass(frozen=True)
class Example:
    """One training image and its final caption (trigger word included)."""

    path: Path
    caption: str


def _skipped(path: Path, root: Path) -> bool:
    return skipped_in_datasets(path.relative_to(root).parts)


def _image_problem(path: Path, root: Path, max_pixels: int) -> str | None:
    """None when the image is within ``max_pixels`` (checked before decoding) and decodes whole."""
    try:
        check_image_file(path, max_pixels, label=path.relative_to(root).as_posix())
    except InputError as exc:
        return str(exc)
    return None


def with_trigger(caption: str, trigger_word: str | None) -> str:
    """Prepend the trigger word unless the caption already holds it."""
    caption = " ".join(caption.split())
    if not trigger_word or trigger_word.lower() in caption.lower():
        return caption
    return f"{trigger_word}, {caption}" if caption else trigger_word


def _caption(image: Path, root: Path, fallback: str, max_chars: int) -> str:
    """The caption file's text (else ``fallback``); at most ``max_chars`` characters."""
    text_file = image.with_suffix(CAPTION_EXTENSION)
    if not text_file.is_file():
        return fallback
    name = text_file.relative_to(root).as_posix()
    too_long = f"input.dataset: caption {name} is over {max_chars} characters (MAX_CAPTION_CHARS); shorten it"
    if text_file.stat().st_size > 4 * max_chars + 64:  # UTF-8: at most 4 bytes a character (and padding)
        raise InputError(too_long)
    try:
        text = text_file.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as exc:
        raise InputError(f"input.dataset: caption {name} is not UTF-8 text") from exc
    if len(text) > max_chars:
        raise InputError(too_long)
    return text or fallback


def scan_dataset(
    root: Path,
    caption: str = "",
    trigger_word: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS,
) -> list[Example]:
    """Every decodable image under ``root`` with its caption; :class:`InputError` naming the
    files that do not decode or are over ``max_pixels``, a caption over ``max_caption_chars``,
    or saying that there is no image at all."""
    if not root.is_dir():
        raise InputError(f"input.dataset: {root.name} is not a folder of images")
    images: list[Path] = []
    ignored: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not _skipped(p, root)):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            images.append(path)
        elif path.suffix.lower() != CAPTION_EXTENSION:
            ignored.append(str(path.relative_to(root)))
    if ignored:
        log.warning(
            "dataset %s: ignoring %d files that are neither images nor captions: %s",
            root.name,
            len(ignored),
            ", ".join(ignored[:_MAX_NAMED]),
        )
    bad = [problem for path in images if (problem := _image_problem(path, root, max_pixels)) is not None]
    if bad:
        named = "; ".join(bad[:_MAX_NAMED])
        more = f" and {len(bad) - _MAX_NAMED} more" if len(bad) > _MAX_NAMED else ""
        raise InputError(f"input.dataset: {len(bad)} files are not decodable images: {named}{more}")
    if not images:
        raise InputError(
            f"input.dataset: no images found (accepted: {', '.join(IMAGE_EXTENSIONS)}, captions in .txt files; "
            "names starting with '.' and __MACOSX folders are skipped)"
        )
    return [
        Example(path, with_trigger(_caption(path, root, caption, max_caption_chars), trigger_word)) for path in images
    ]


def load_rgb(path: Path) -> Image.Image:
    """RGB, upright (EXIF), transparency flattened on white."""
    with Image.open(path) as source:
        image = ImageOps.exif_transpose(source)
        if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        return image.convert("RGB")


def fit(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize ``image`` to cover ``size`` (width, height) keeping its aspect ratio, then cut the
    few pixels left over evenly from both sides (its bucket has the nearest ratio)."""
    return ImageOps.fit(image, size, method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))
