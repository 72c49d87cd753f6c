"""Safe extraction of dataset zips.

:func:`extract_zip` extracts regular files only, keeping their relative paths under ``dest``.
It refuses, naming the entry: absolute paths, drive letters, ``..`` components, backslashes
and NUL bytes in names, links and other special files, encrypted entries, duplicate names
and file/folder clashes; and it caps the entry count, the total uncompressed size (from the
headers first, then counted while decompressing, since headers can lie) and the compression
ratio (zip bombs). Members named as images (the dataset's image extensions) must be images
whose header is within ``MAX_IMAGE_PIXELS`` (:mod:`services.ingest.images`; nothing is decoded
here, the dataset scan decodes them). A member whose data does not decompress (corrupt
deflate, bzip2 or lzma data) is refused by name. On any failure whatever it extracted is
removed again.

It is blocking (decompression is CPU work): call it through ``asyncio.to_thread`` from async code.
"""

from __future__ import annotations

import logging
import lzma
import re
import stat
import zipfile
import zlib
from pathlib import Path, PurePosixPath
from typing import IO

from config.settings import Settings
from services.errors import InputError
from services.ingest.images import IMAGE_EXTENSIONS, check_image_file, skipped_in_datasets

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
# Small entries compress legitimately well (a 1 KiB run of zeros is 100:1 and more); the ratio
# cap only applies once an entry has produced this much, so it catches bombs, not tiny files.
RATIO_FLOOR_BYTES = 1024 * 1024
_DRIVE = re.compile(r"^[A-Za-z]:")
_ENCRYPTED = 0x1 | 0x40  # general purpose flags: traditional and strong encryption


def _entry_parts(info: zipfile.ZipInfo) -> tuple[str, ...]:
    """The entry's relative path components; raise :class:`InputError` for an unsafe name."""
    name = info.orig_filename  # zipfile cuts ``filename`` at a NUL byte; check what is stored
    if "\x00" in name:
        raise InputError(f"zip entry {name!r}: name contains a NUL byte")
    if "\\" in name:
        raise InputError(f"zip entry {name!r}: name contains a backslash")
    if name.startswith("/"):
        raise InputError(f"zip entry {name!r}: absolute path")
    if _DRIVE.match(name):
        raise InputError(f"zip entry {name!r}: path starts with a drive letter")
    parts = tuple(p for p in name.split("/") if p not in ("", "."))
    if ".." in parts:
        raise InputError(f"zip entry {name!r}: path contains '..'")
    if not parts:
        raise InputError(f"zip entry {name!r}: empty path")
    return parts


def _check_entry(info: zipfile.ZipInfo) -> None:
    """Refuse encrypted entries, links and anything else that is not a file or a folder."""
    name = info.orig_filename
    if info.flag_bits & _ENCRYPTED:
        raise InputError(f"zip entry {name!r}: encrypted entries are not accepted")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise InputError(f"zip entry {name!r}: symbolic links are not accepted")
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
        raise InputError(f"zip entry {name!r}: not a regular file")


def _plan(infos: list[zipfile.ZipInfo], settings: Settings) -> list[tuple[zipfile.ZipInfo, PurePosixPath]]:
    """Validate every entry before writing anything; return the files to extract."""
    if len(infos) > settings.max_zip_entries:
        raise InputError(f"zip has {len(infos)} entries, over the {settings.max_zip_entries}-entry limit")
    files: dict[PurePosixPath, str] = {}
    folders: set[PurePosixPath] = set()
    plan = []
    declared = 0
    for info in infos:
        parts = _entry_parts(info)
        _check_entry(info)
        rel = PurePosixPath(*parts)
        name = info.orig_filename
        parents = set(rel.parents) - {PurePosixPath(".")}
        if info.is_dir() or stat.S_ISDIR(info.external_attr >> 16):
            if rel in files:
                raise InputError(f"zip entry {name!r}: clashes with file {files[rel]!r}")
            folders.add(rel)
            folders.update(parents)
            continue
        if rel in files:
            raise InputError(f"zip entry {name!r}: duplicate of entry {files[rel]!r}")
        if rel in folders or any(p in files for p in parents):
            raise InputError(f"zip entry {name!r}: a file and a folder share this path")
        files[rel] = name
        folders.update(parents)
        declared += info.file_size
        if declared > settings.max_zip_uncompressed_bytes:
            raise InputError(
                f"zip entry {name!r}: total uncompressed size is over the "
                f"{settings.max_zip_uncompressed_bytes}-byte limit"
            )
        if info.file_size >= RATIO_FLOOR_BYTES and info.file_size > settings.max_zip_ratio * max(info.compress_size, 1):
            raise InputError(
                f"zip entry {name!r}: compression ratio {info.file_size / max(info.compress_size, 1):.0f}:1 "
                f"is over the {settings.max_zip_ratio:g}:1 limit"
            )
        plan.append((info, rel))
    return plan


def _copy_entry(src: IO[bytes], out: IO[bytes], info: zipfile.ZipInfo, budget: int, settings: Settings) -> int:
    """Copy one entry's data, enforcing the caps on the bytes actually produced; return the count."""
    name = info.orig_filename
    written = 0
    while chunk := src.read(CHUNK_BYTES):
        written += len(chunk)
        if written > budget:
            raise InputError(
                f"zip entry {name!r}: total uncompressed size is over the "
                f"{settings.max_zip_uncompressed_bytes}-byte limit"
            )
        if written > info.file_size:
            raise InputError(f"zip entry {name!r}: larger than its header says")
        if written >= RATIO_FLOOR_BYTES and written > settings.max_zip_ratio * max(info.compress_size, 1):
            raise InputError(f"zip entry {name!r}: compression ratio is over the {settings.max_zip_ratio:g}:1 limit")
        out.write(chunk)
    return written


def _open_target(root: Path, target: Path, created: list[Path], name: str) -> IO[bytes]:
    """Create the folders above ``target`` and the file itself (exclusively), recording in
    ``created`` only what was made here, so a cleanup never touches what was there before."""
    try:
        for folder in reversed(target.parents):
            if folder.is_relative_to(root) and folder != root and not folder.exists():
                folder.mkdir()
                created.append(folder)
        if not target.parent.resolve().is_relative_to(root):  # a link that was already in dest
            raise InputError(f"zip entry {name!r}: path leaves the extraction folder")
        out = target.open("xb")
    except (FileExistsError, NotADirectoryError) as exc:
        raise InputError(f"zip entry {name!r}: something already exists at that path") from exc
    created.append(target)
    return out


def _remove(created: list[Path]) -> None:
    """Remove what an extraction created, newest first (folders only when empty)."""
    for path in reversed(created):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove %s after a failed extraction: %s", path, exc)


def extract_zip(path: Path, dest: Path, settings: Settings) -> list[Path]:
    """Extract the regular files of the zip at ``path`` under ``dest``; return their absolute paths.

    Raises :class:`InputError` naming the offending entry; on failure nothing it wrote remains.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    created: list[Path] = []
    extracted: list[Path] = []
    name = ""
    try:
        with zipfile.ZipFile(path) as zf:
            budget = settings.max_zip_uncompressed_bytes
            for info, rel in _plan(zf.infolist(), settings):
                name = info.orig_filename
                if skipped_in_datasets(rel.parts):  # macOS metadata, hidden files: never part of a dataset
                    logger.info("zip entry %r skipped (a hidden or __MACOSX file)", name)
                    continue
                target = root.joinpath(*rel.parts)
                with _open_target(root, target, created, name) as out, zf.open(info) as src:
                    budget -= _copy_entry(src, out, info, budget, settings)
                if target.suffix.lower() in IMAGE_EXTENSIONS:  # the pixel cap, before anything decodes it
                    check_image_file(target, settings.max_image_pixels, f"zip entry {name!r}", decode=False)
                extracted.append(target)
    except (zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError) as exc:
        _remove(created)
        where = f"zip entry {name!r}" if name else "zip file"
        raise InputError(f"{where}: corrupt or not a zip ({exc})") from exc
    except OSError as exc:  # bz2 reports corrupt data as an OSError without an errno
        _remove(created)
        if exc.errno is not None:  # a failed write (disk full...): not the caller's input
            raise
        raise InputError(f"zip entry {name!r}: corrupt or not a zip ({exc})") from exc
    except NotImplementedError as exc:  # e.g. an unsupported compression method
        _remove(created)
        raise InputError(f"zip entry {name!r}: {exc}") from exc
    except BaseException:
        _remove(created)
        raise
    logger.info("extracted %d files from %s", len(extracted), path.name)
    return extracted
