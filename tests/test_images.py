"""The image gate: accepted formats, the pixel cap read from the header before any decode,
clear errors that never show a local path, and Pillow's own bomb limit never in the way."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
import warnings
import zlib
from functools import cache
from pathlib import Path

import pytest
from PIL import Image, ImageFile

from services.errors import InputError
from services.ingest.images import IMAGE_FORMATS, ImageInfo, check_image_bytes, check_image_file, open_image

BOMB_SIZE = (14900, 12000)  # issue 11: 509 KB on disk, +1.7 GB to scan
CAP = 2048 * 2048


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@cache
def pixel_bomb_png(width: int = BOMB_SIZE[0], height: int = BOMB_SIZE[1]) -> bytes:
    """A complete, valid RGB PNG of zero rows: about 500 KB for 14900x12000 (536 MB decoded)."""
    rows_per_block = 200
    block = bytes(1 + 3 * width) * rows_per_block  # filter byte 0 + black pixels, per row
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(block) for _ in range(height // rows_per_block))
    data += packer.compress(bytes(1 + 3 * width) * (height % rows_per_block)) + packer.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def encoded(fmt: str, size: tuple[int, int] = (32, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format=fmt)
    return buf.getvalue()


def test_the_bomb_is_small_and_valid() -> None:
    data = pixel_bomb_png()
    assert len(data) < 600_000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # what it is
        with Image.open(io.BytesIO(data)) as image:
            assert image.size == BOMB_SIZE
    idat = data[data.index(b"IDAT") + 4 :]
    assert zlib.decompressobj().decompress(idat, 1 << 20) == bytes(1 << 20)  # real rows, not just a header


@pytest.mark.parametrize("fmt", IMAGE_FORMATS)
def test_accepted_formats_decode(fmt: str) -> None:
    data = encoded(fmt)
    assert check_image_bytes(data, CAP, "x") == ImageInfo(format=fmt, width=32, height=16)
    with open_image(io.BytesIO(data), CAP, "x") as image:
        pixel = image.convert("RGB").getpixel((0, 0))
    assert isinstance(pixel, tuple)
    assert max(abs(a - b) for a, b in zip(pixel, (10, 200, 30), strict=True)) <= 4  # lossy formats round


def test_pixel_bomb_is_refused_from_its_header(monkeypatch: pytest.MonkeyPatch) -> None:
    loads: list[str] = []
    real_load = ImageFile.ImageFile.load

    def spy(self: ImageFile.ImageFile) -> object:
        loads.append(str(self.format))
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    with pytest.raises(InputError) as err:
        check_image_bytes(pixel_bomb_png(), CAP, "input.files[3]")
    assert str(err.value) == "input.files[3]: 14900x12000 is over 4194304 pixels (MAX_IMAGE_PIXELS)"
    assert loads == [], "refused before any decode"
    assert check_image_bytes(encoded("PNG"), CAP, "x").width == 32 and loads == ["PNG"]  # the spy sees decodes


def test_pixel_bomb_file_is_refused_without_the_memory_a_decode_needs(tmp_path: Path) -> None:
    """Peak RSS of a fresh process that refuses the bomb file, against the 536 MB it decodes to."""
    path = tmp_path / "bomb.png"
    path.write_bytes(pixel_bomb_png())
    script = (
        "import json, resource, sys\n"
        "from services.errors import InputError\n"
        "from services.ingest.images import check_image_file\n"
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "try:\n"
        f"    check_image_file(sys.argv[1], {CAP}, 'dataset_url')\n"
        "    message = None\n"
        "except InputError as exc:\n"
        "    message = str(exc)\n"
        "after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "print(json.dumps({'message': message, 'grew_kib': after - before}))\n"
    )
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, "-c", script, str(path)], cwd=root, capture_output=True, text=True, timeout=120, check=True
    )
    got = json.loads(done.stdout)
    decoded_kib = BOMB_SIZE[0] * BOMB_SIZE[1] * 3 // 1024
    assert got["message"] == "dataset_url: 14900x12000 is over 4194304 pixels (MAX_IMAGE_PIXELS)"
    assert got["grew_kib"] < decoded_kib // 20, f"peak RSS grew {got['grew_kib']} KiB; a decode needs {decoded_kib}"


def test_pillow_bomb_limit_is_not_the_limiter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever Pillow's process-wide limit says, ``MAX_IMAGE_PIXELS`` decides, without warnings."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # Image.open would raise DecompressionBombError
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_image_bytes(encoded("PNG", (64, 64)), 64 * 64, "x").width == 64
        with pytest.raises(InputError, match=r"^x: 64x65 is over 4096 pixels \(MAX_IMAGE_PIXELS\)$"):
            check_image_bytes(encoded("PNG", (64, 65)), 64 * 64, "x")


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"hello, I am a caption", r"^input\.files\[0\]: not an image \(accepted: PNG, JPEG, WEBP, GIF, BMP, TIFF\)$"),
        (b"", r"not an image"),
        (encoded("PNG")[:40], r"^input\.files\[0\]: not a decodable PNG image \("),
        (encoded("JPEG", (64, 64))[:300], r"^input\.files\[0\]: not a decodable JPEG image \("),
        (encoded("GIF", (64, 64))[:60], r"^input\.files\[0\]: not a decodable GIF image \("),
        (b"BM" + bytes(60), r"^input\.files\[0\]: not a decodable BMP image \("),
        (b"II*\x00" + bytes(20), r"^input\.files\[0\]: not a decodable TIFF image \("),
    ],
)
def test_broken_images_are_clear_input_errors(data: bytes, why: str) -> None:
    with pytest.raises(InputError, match=why):
        check_image_bytes(data, CAP, "input.files[0]")


def test_file_errors_name_the_label_not_the_path(tmp_path: Path) -> None:
    path = tmp_path / ".upload.3f2a.part"
    path.write_bytes(encoded("PNG")[:40])
    with pytest.raises(InputError) as err:
        check_image_file(path, CAP, "zip entry 'cat.png'")
    assert str(err.value).startswith("zip entry 'cat.png': not a decodable PNG image")
    assert str(tmp_path) not in str(err.value) and ".part" not in str(err.value)


def test_header_only_check_does_not_decode(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    path.write_bytes(encoded("PNG", (64, 64))[:-30])  # header intact, pixel data cut
    assert check_image_file(path, CAP, "x", decode=False) == ImageInfo("PNG", 64, 64)
    with pytest.raises(InputError, match="not a decodable PNG image"):
        check_image_file(path, CAP, "x")
