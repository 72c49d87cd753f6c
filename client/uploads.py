"""Planning a dataset upload: which files go inline in ``upload_training_files`` batches and
which go straight to storage through ``presign_uploads``.

RunPod rejects a ``/run`` request over 10 MB, and base64 makes a file 4/3 as large, so a batch
is packed by the exact length of the JSON body it will be sent as (``json.dumps`` with the
default separators, as ``requests`` sends it). A file that alone would not fit is presigned.
Pure functions, no I/O but reading the files of one batch.
"""

from __future__ import annotations

import base64
import json
import mimetypes
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REQUEST_LIMIT_BYTES = 10_000_000  # RunPod's /run body limit ("10 MB"; the smaller reading)
DEFAULT_INLINE_BUDGET = 9_500_000  # JSON bytes per inline batch, with headroom under the limit
DEFAULT_MAX_FILES_PER_BATCH = 500  # the worker's MAX_FILES_PER_BATCH defaults to 1000
SINGLE_PUT_LIMIT = 5 * 1024**3  # S3's largest single PUT
MAX_NAME_BYTES = 255

# The trainer reads these (services/gpu/catalog.py); anything else in the folder is ignored.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSION = ".txt"


@dataclass(frozen=True)
class LocalFile:
    """One file of the folder to upload."""

    name: str
    path: Path
    size: int

    @property
    def content_type(self) -> str:
        return mimetypes.guess_type(self.name)[0] or "application/octet-stream"


@dataclass
class UploadPlan:
    """Inline batches (in order) and the files that go through presigned URLs."""

    batches: list[list[LocalFile]] = field(default_factory=list)
    presigned: list[LocalFile] = field(default_factory=list)


@dataclass
class UploadReport:
    """The fate of every file of the folder.

    ``uploaded`` and ``skipped`` (already stored with the same sha256) and ``failed`` come from
    the worker or the storage PUT; ``ignored`` lists what was not sent (not an image or caption,
    a folder, a hidden file). ``partial`` is set when the worker completed a batch with some
    files failed, and ``summaries`` holds its summaries.
    """

    dataset: str
    uploaded: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    ignored: list[dict[str, Any]] = field(default_factory=list)
    batches: int = 0
    presigned: int = 0
    partial: bool = False
    summaries: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no file failed."""
        return not self.failed and not self.partial

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def name_problem(name: str) -> str | None:
    """Why the worker would refuse ``name`` as a dataset file name (its own rules), or ``None``."""
    if not name:
        return "must not be empty"
    if "/" in name or "\\" in name:
        return "path separators are not allowed"
    if ".." in name:
        return "'..' is not allowed"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in name):
        return "control characters are not allowed"
    if len(name.encode("utf-8", "surrogateescape")) > MAX_NAME_BYTES:
        return f"longer than {MAX_NAME_BYTES} bytes"
    return None


def scan_folder(folder: Path) -> tuple[list[LocalFile], list[dict[str, Any]]]:
    """The images and captions directly inside ``folder`` (sorted), and what was ignored."""
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder")
    files: list[LocalFile] = []
    ignored: list[dict[str, Any]] = []
    for path in sorted(folder.iterdir(), key=lambda p: p.name):
        name = path.name
        if name.startswith("."):
            ignored.append({"name": name, "reason": "hidden file"})
        elif path.is_dir():
            ignored.append({"name": name, "reason": "folder (only files directly inside are uploaded)"})
        elif not path.is_file():
            ignored.append({"name": name, "reason": "not a regular file"})
        elif path.suffix.lower() not in (*IMAGE_EXTENSIONS, CAPTION_EXTENSION):
            ignored.append({"name": name, "reason": "not an image or a .txt caption"})
        else:
            files.append(LocalFile(name=name, path=path, size=path.stat().st_size))
    return files, ignored


def base64_length(size: int) -> int:
    """Length of the base64 text of ``size`` bytes."""
    return 4 * ((size + 2) // 3)


def envelope_length(dataset: str) -> int:
    """JSON length of an ``upload_training_files`` request with no files."""
    return len(json.dumps(batch_body(dataset, [])).encode())


def entry_length(name: str, size: int) -> int:
    """JSON length of one ``{"name": ..., "data": "<base64>"}`` entry."""
    return len(json.dumps({"name": name, "data": ""}).encode()) + base64_length(size)


def plan_upload(
    files: list[LocalFile],
    dataset: str,
    *,
    budget: int = DEFAULT_INLINE_BUDGET,
    max_files_per_batch: int = DEFAULT_MAX_FILES_PER_BATCH,
) -> UploadPlan:
    """Pack ``files`` in order into batches whose JSON body stays within ``budget`` bytes."""
    if budget > REQUEST_LIMIT_BYTES:
        raise ValueError(f"inline budget {budget} is over RunPod's {REQUEST_LIMIT_BYTES}-byte request limit")
    plan = UploadPlan()
    base = envelope_length(dataset)
    current: list[LocalFile] = []
    length = base
    for item in files:
        entry = entry_length(item.name, item.size)
        if base + entry > budget:
            plan.presigned.append(item)
            continue
        separator = 2 if current else 0  # ", " between list items
        if current and (length + separator + entry > budget or len(current) >= max_files_per_batch):
            plan.batches.append(current)
            current, length, separator = [], base, 0
        current.append(item)
        length += separator + entry
    if current:
        plan.batches.append(current)
    return plan


def batch_body(dataset: str, files: list[dict[str, str]]) -> dict[str, Any]:
    """The request body RunPod receives for one inline batch."""
    return {"input": {"action": "upload_training_files", "dataset": dataset, "files": files}}


def encode_batch(dataset: str, batch: list[LocalFile], budget: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read and encode a planned batch: ``(job input, failures)``.

    A file that cannot be read or changed size since the folder was scanned is left out and
    reported; the body is measured again, so it never passes ``budget``.
    """
    entries: list[dict[str, str]] = []
    failures: list[dict[str, Any]] = []
    for item in batch:
        try:
            data = item.path.read_bytes()
        except OSError as exc:
            failures.append({"name": item.name, "error": f"cannot read {item.path}: {exc.strerror or exc}"})
            continue
        if len(data) != item.size:
            failures.append({"name": item.name, "error": "changed size while uploading; run the upload again"})
            continue
        entries.append({"name": item.name, "data": base64.b64encode(data).decode("ascii")})
    body = batch_body(dataset, entries)
    measured = len(json.dumps(body).encode())
    if measured > budget:  # the plan is exact; this guards against a planning bug
        raise ValueError(f"planned batch is {measured} bytes of JSON, over the {budget}-byte budget")
    return body["input"], failures
