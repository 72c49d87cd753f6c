"""Safe zip extraction: what goes through, what is refused, and that failures leave nothing."""

from __future__ import annotations

import io
import re
import stat
import warnings
import zipfile
from pathlib import Path

import pytest

from config.settings import Settings, build_settings
from services.errors import InputError
from services.ingest import zipsafe
from services.ingest.zipsafe import extract_zip


@pytest.fixture
def settings() -> Settings:
    return build_settings(max_zip_entries=10, max_zip_uncompressed_bytes=8 * 1024 * 1024, max_zip_ratio=100)


def make_zip(
    path: Path, entries: list[tuple[str | zipfile.ZipInfo, bytes]], compression: int = zipfile.ZIP_DEFLATED
) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # zipfile warns on duplicate names
        with zipfile.ZipFile(path, "w", compression=compression) as zf:
            for name, data in entries:
                zf.writestr(name, data)
    return path


def patch_bytes(path: Path, old: bytes, new: bytes) -> None:
    data = path.read_bytes()
    assert old in data
    path.write_bytes(data.replace(old, new))


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_normal_zip_keeps_relative_paths_and_skips_folders(tmp_path: Path, settings: Settings) -> None:
    archive = make_zip(
        tmp_path / "ok.zip",
        [("a.txt", b"alpha"), ("sub/", b""), ("sub/b.bin", bytes(range(256))), ("./c/d.txt", b"delta")],
    )
    dest = tmp_path / "out"
    got = extract_zip(archive, dest, settings)
    root = dest.resolve()
    assert got == [root / "a.txt", root / "sub" / "b.bin", root / "c" / "d.txt"]
    assert (root / "a.txt").read_bytes() == b"alpha"
    assert (root / "sub" / "b.bin").read_bytes() == bytes(range(256))
    assert (root / "c" / "d.txt").read_bytes() == b"delta"
    assert files_under(dest) == ["a.txt", "c", "c/d.txt", "sub", "sub/b.bin"]


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../evil.txt", "'..'"),
        ("a/../../evil.txt", "'..'"),
        ("/etc/evil.txt", "absolute path"),
        ("C:/evil.txt", "drive letter"),
        ("c:evil.txt", "drive letter"),
        ("..\\evil.txt", "backslash"),
        ("a\\b.txt", "backslash"),
        ("../", "'..'"),
    ],
)
def test_unsafe_names_are_refused_before_anything_is_written(
    tmp_path: Path, settings: Settings, name: str, why: str
) -> None:
    archive = make_zip(tmp_path / "bad.zip", [("first.txt", b"fine"), (name, b"payload")])
    dest = tmp_path / "out"
    with pytest.raises(InputError, match=why) as err:
        extract_zip(archive, dest, settings)
    assert repr(name) in str(err.value)
    assert files_under(dest) == []
    assert not (tmp_path / "evil.txt").exists()


def test_nul_byte_in_name_is_refused(tmp_path: Path, settings: Settings) -> None:
    archive = make_zip(tmp_path / "nul.zip", [("aXZb.txt", b"payload")])
    patch_bytes(archive, b"aXZb.txt", b"a\x00Zb.txt")
    with pytest.raises(InputError, match="NUL byte"):
        extract_zip(archive, tmp_path / "out", settings)


def test_symlink_entry_is_refused(tmp_path: Path, settings: Settings) -> None:
    link = zipfile.ZipInfo("link")
    link.external_attr = (stat.S_IFLNK | 0o777) << 16
    archive = make_zip(tmp_path / "link.zip", [(link, b"/etc/passwd")])
    with pytest.raises(InputError, match="'link': symbolic links"):
        extract_zip(archive, tmp_path / "out", settings)
    assert files_under(tmp_path / "out") == []


def test_special_file_entry_is_refused(tmp_path: Path, settings: Settings) -> None:
    fifo = zipfile.ZipInfo("pipe")
    fifo.external_attr = (stat.S_IFIFO | 0o644) << 16
    archive = make_zip(tmp_path / "fifo.zip", [(fifo, b"")])
    with pytest.raises(InputError, match="'pipe': not a regular file"):
        extract_zip(archive, tmp_path / "out", settings)


def test_too_many_entries(tmp_path: Path) -> None:
    settings = build_settings(max_zip_entries=3)
    archive = make_zip(tmp_path / "many.zip", [(f"f{i}.txt", b"x") for i in range(4)])
    with pytest.raises(InputError, match="4 entries, over the 3-entry limit"):
        extract_zip(archive, tmp_path / "out", settings)


def test_bomb_by_compression_ratio(tmp_path: Path, settings: Settings) -> None:
    archive = make_zip(tmp_path / "bomb.zip", [("zeros.bin", bytes(4 * 1024 * 1024))])
    with pytest.raises(InputError, match=r"'zeros.bin': compression ratio \d+:1 is over the 100:1 limit"):
        extract_zip(archive, tmp_path / "out", settings)
    assert files_under(tmp_path / "out") == []


def test_small_entries_may_compress_well(tmp_path: Path, settings: Settings) -> None:
    archive = make_zip(tmp_path / "small.zip", [("zeros.bin", bytes(64 * 1024))])
    assert len(extract_zip(archive, tmp_path / "out", settings)) == 1


def test_bomb_by_total_size(tmp_path: Path) -> None:
    settings = build_settings(max_zip_uncompressed_bytes=1000)
    archive = make_zip(
        tmp_path / "big.zip", [("a.bin", bytes(600)), ("b.bin", bytes(600))], compression=zipfile.ZIP_STORED
    )
    with pytest.raises(InputError, match=re.escape("'b.bin': total uncompressed size is over the 1000-byte limit")):
        extract_zip(archive, tmp_path / "out", settings)
    assert files_under(tmp_path / "out") == []


def test_streaming_counts_bytes_actually_produced(settings: Settings) -> None:
    info = zipfile.ZipInfo("liar.bin")
    info.file_size, info.compress_size = 10, 10
    with pytest.raises(InputError, match=re.escape("'liar.bin': larger than its header says")):
        zipsafe._copy_entry(io.BytesIO(bytes(100)), io.BytesIO(), info, 10_000, settings)
    info.file_size = 10_000
    with pytest.raises(InputError, match=re.escape("'liar.bin': total uncompressed size")):
        zipsafe._copy_entry(io.BytesIO(bytes(100)), io.BytesIO(), info, 50, settings)


def test_lying_size_header_is_refused(tmp_path: Path, settings: Settings) -> None:
    archive = tmp_path / "liar.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("liar.bin", bytes(5000))
    data = bytearray(archive.read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 24 : central + 28] = (100).to_bytes(4, "little")  # uncompressed size: 5000 -> 100
    archive.write_bytes(bytes(data))
    with pytest.raises(InputError, match=re.escape("'liar.bin'")):
        extract_zip(archive, tmp_path / "out", settings)
    assert files_under(tmp_path / "out") == []


def test_encrypted_entry_is_refused(tmp_path: Path, settings: Settings) -> None:
    archive = make_zip(tmp_path / "enc.zip", [("secret.txt", b"data")], compression=zipfile.ZIP_STORED)
    data = bytearray(archive.read_bytes())
    local, central = data.index(b"PK\x03\x04"), data.index(b"PK\x01\x02")
    data[local + 6] |= 0x1  # general purpose flag bit 0: encrypted
    data[central + 8] |= 0x1
    archive.write_bytes(bytes(data))
    with pytest.raises(InputError, match=re.escape("'secret.txt': encrypted")):
        extract_zip(archive, tmp_path / "out", settings)


@pytest.mark.parametrize(
    ("names", "why"),
    [
        (["a.txt", "a.txt"], "'a.txt': duplicate of entry 'a.txt'"),
        (["d/a.txt", "d/./a.txt"], "'d/./a.txt': duplicate of entry 'd/a.txt'"),
        (["x", "x/y.txt"], "'x/y.txt': a file and a folder share this path"),
        (["x/y.txt", "x"], "'x': a file and a folder share this path"),
    ],
)
def test_duplicate_and_clashing_names(tmp_path: Path, settings: Settings, names: list[str], why: str) -> None:
    archive = make_zip(tmp_path / "dup.zip", [(n, b"v") for n in names])
    with pytest.raises(InputError, match=why):
        extract_zip(archive, tmp_path / "out", settings)
    assert files_under(tmp_path / "out") == []


def test_not_a_zip(tmp_path: Path, settings: Settings) -> None:
    bogus = tmp_path / "bogus.zip"
    bogus.write_bytes(b"this is text")
    with pytest.raises(InputError, match="zip file: corrupt or not a zip"):
        extract_zip(bogus, tmp_path / "out", settings)


def test_failure_midway_removes_what_was_extracted_and_keeps_what_was_there(tmp_path: Path, settings: Settings) -> None:
    archive = make_zip(
        tmp_path / "crc.zip",
        [("good/one.txt", b"first file"), ("two.txt", b"hello world")],
        compression=zipfile.ZIP_STORED,
    )
    patch_bytes(archive, b"hello world", b"hellO world")  # the CRC no longer matches
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match=re.escape("'two.txt': corrupt")):
        extract_zip(archive, dest, settings)
    assert files_under(dest) == ["keep.txt"]
    assert (dest / "keep.txt").read_text() == "mine"


def test_existing_file_is_not_overwritten(tmp_path: Path, settings: Settings) -> None:
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "a.txt").write_text("mine")
    archive = make_zip(tmp_path / "a.zip", [("a.txt", b"theirs")])
    with pytest.raises(InputError, match=re.escape("'a.txt': something already exists")):
        extract_zip(archive, dest, settings)
    assert (dest / "a.txt").read_text() == "mine"


def test_link_already_in_dest_is_not_followed(tmp_path: Path, settings: Settings) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / "link").symlink_to(outside, target_is_directory=True)
    archive = make_zip(tmp_path / "l.zip", [("link/x.txt", b"payload")])
    with pytest.raises(InputError, match=re.escape("'link/x.txt': path leaves the extraction folder")):
        extract_zip(archive, dest, settings)
    assert list(outside.iterdir()) == []


@pytest.mark.parametrize(
    ("compression", "cause"),
    [(zipfile.ZIP_DEFLATED, "zlib.error"), (zipfile.ZIP_BZIP2, "OSError"), (zipfile.ZIP_LZMA, "LZMAError")],
)
def test_corrupt_member_data_is_an_input_error_naming_the_member(
    tmp_path: Path, settings: Settings, compression: int, cause: str
) -> None:
    """Issue 11, finding 10: bzip2 and lzma decoders raise OSError and LZMAError, not zlib.error."""
    data = bytes(range(256)) * 40
    archive = make_zip(tmp_path / "z.zip", [("ok.txt", b"fine"), ("bad.bin", data)], compression)
    raw = bytearray(archive.read_bytes())
    start = raw.index(b"bad.bin") + len("bad.bin") + 8  # into the member's compressed data
    raw[start : start + 32] = bytes(b ^ 0x5A for b in raw[start : start + 32])
    archive.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"^zip entry 'bad\.bin': corrupt or not a zip \(") as err:
        extract_zip(archive, tmp_path / "out", settings)
    assert type(err.value.__cause__).__name__ == {"zlib.error": "error"}.get(cause, cause)
    assert files_under(tmp_path / "out") == []


def test_image_members_over_the_pixel_cap_are_refused_before_any_decode(
    tmp_path: Path, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import ImageFile

    from tests.test_images import pixel_bomb_png

    loads: list[object] = []

    def spy(self: ImageFile.ImageFile) -> None:
        loads.append(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    big = build_settings(max_zip_uncompressed_bytes=8 * 1024 * 1024, max_zip_ratio=100, max_image_pixels=2048 * 2048)
    archive = make_zip(tmp_path / "d.zip", [("a.txt", b"a caption"), ("imgs/Bomb.PNG", pixel_bomb_png())])
    with pytest.raises(InputError) as err:
        extract_zip(archive, tmp_path / "out", big)
    assert str(err.value) == "zip entry 'imgs/Bomb.PNG': 14900x12000 is over 4194304 pixels (MAX_IMAGE_PIXELS)"
    assert loads == []
    assert files_under(tmp_path / "out") == []


def test_image_members_must_be_images_and_other_members_are_not_read(tmp_path: Path, settings: Settings) -> None:
    import io as _io

    from PIL import Image

    buf = _io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="JPEG")
    good = make_zip(tmp_path / "g.zip", [("a.jpg", buf.getvalue()), ("a.txt", b"BM not a bitmap"), ("b.bin", b"x")])
    assert len(extract_zip(good, tmp_path / "g", settings)) == 3
    bad = make_zip(tmp_path / "b.zip", [("a.txt", b"caption"), ("a.png", b"a caption in disguise")])
    with pytest.raises(InputError, match=r"^zip entry 'a\.png': not an image \(accepted: PNG, JPEG"):
        extract_zip(bad, tmp_path / "b", settings)
    assert files_under(tmp_path / "b") == []


def test_a_zip_made_on_macos_extracts_without_its_metadata(tmp_path: Path, settings: Settings) -> None:
    """Catches a dataset zip refused for what the macOS archiver adds (``__MACOSX/._x.png`` resource
    forks are not images): hidden and ``__MACOSX`` entries are skipped, as the dataset scan skips them."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (4, 4), (10, 200, 30)).save(buffer, "PNG")
    fork = b"\x00\x05\x16\x07 not an image"
    archive = make_zip(
        tmp_path / "mac.zip",
        [("ok.png", buffer.getvalue()), ("__MACOSX/._ok.png", fork), ("._ok.png", fork), (".DS_Store", b"x")],
    )
    dest = tmp_path / "out"
    assert extract_zip(archive, dest, settings) == [dest.resolve() / "ok.png"]
    assert files_under(dest) == ["ok.png"]
