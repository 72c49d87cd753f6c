"""Output files and presigned uploads on the client's side.

The worker returns every file as ``{"type": "base64", "name", "mime", "size", "data"}`` or
``{"type": "redirect", "name", "mime", "size", "key", "url", "expires_in"}``; a redirect URL is
a presigned ``https://`` GET, or a ``file://`` path when the worker runs the local backend on
this machine. ``file://`` URLs are honoured only for the local server (``allow_file_urls``), so a
remote endpoint can never make the client read or write an arbitrary local path.

Files are written to a temporary name beside the target and renamed when complete, and
URLs appear in messages without their query string (the presigned signature).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import os
import re
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit
from urllib.request import url2pathname

import requests

from client.errors import DownloadError, UploadError

CHUNK = 1024 * 1024
_QUERY = re.compile(r"\?[^\s'\")]*")


def redact(text: str) -> str:
    """``text`` with URL query strings removed (requests' errors quote the full URL)."""
    return _QUERY.sub("?<redacted>", text)


def safe_url(url: str) -> str:
    """``url`` without query and fragment: presigned signatures stay out of messages."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


def local_name(name: str) -> str:
    """The last path component of a name the worker sent, usable as a local file name."""
    candidate = PurePosixPath(str(name).replace("\\", "/")).name
    if candidate in ("", ".", "..") or "\x00" in candidate:
        raise DownloadError(f"output file name {name!r} cannot be used as a local file name")
    return candidate


def destination(dest: str | Path, name: str) -> Path:
    """``dest`` itself, or ``dest/<name>`` when ``dest`` is a directory (existing, or ending in ``/``)."""
    path = Path(dest)
    if isinstance(dest, str) and dest.endswith(("/", os.sep)):
        path.mkdir(parents=True, exist_ok=True)
    return path / local_name(name) if path.is_dir() else path


def file_url_path(url: str) -> Path:
    """The local path of a ``file://`` URL (``file:///abs/path`` or ``file://localhost/...``)."""
    parts = urlsplit(url)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise ValueError(f"{safe_url(url)} is not a local file:// URL")
    return Path(url2pathname(unquote(parts.path)))


def write_atomic(target: Path, chunks: Iterable[bytes]) -> int:
    """Write ``chunks`` to ``target`` through a temporary file in the same folder; bytes written."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")  # "x": the umask's mode
    written = 0
    try:
        with temp.open("xb") as out:
            for chunk in chunks:
                out.write(chunk)
                written += len(chunk)
        temp.replace(target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    return written


def _read_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def save_output_file(
    file: Mapping[str, Any],
    dest: str | Path,
    *,
    session: requests.Session | None = None,
    allow_file_urls: bool = False,
    timeout: float = 60.0,
) -> Path:
    """Save one output file to ``dest`` (a path, or an existing directory) and return the path.

    Base64 is decoded; a redirect is downloaded (``http(s)``) or copied (``file://``, local
    server only). The size the worker announced is checked.
    """
    kind = file.get("type")
    name = str(file.get("name") or "output")
    target = destination(dest, name)
    try:
        if kind == "base64":
            try:
                data = base64.b64decode(str(file.get("data", "")), validate=True)
            except (binascii.Error, ValueError) as exc:
                raise DownloadError(f"{name}: the base64 data is not valid ({exc})") from exc
            written = write_atomic(target, [data])
        elif kind == "redirect":
            written = _fetch(str(file.get("url", "")), target, session, allow_file_urls, timeout, name)
        else:
            raise DownloadError(f"{name}: unknown output file type {kind!r} (expected base64 or redirect)")
    except OSError as exc:
        raise DownloadError(f"{name}: cannot write {target}: {exc}") from exc
    expected = file.get("size")
    if isinstance(expected, int) and expected != written:
        raise DownloadError(f"{name}: got {written} bytes, the worker announced {expected}; saved at {target}")
    return target


def _fetch(
    url: str, target: Path, session: requests.Session | None, allow_file_urls: bool, timeout: float, name: str
) -> int:
    scheme = urlsplit(url).scheme
    if scheme == "file":
        if not allow_file_urls:
            raise DownloadError(f"{name}: file:// URLs are only followed for a local server (--local)")
        try:
            source = file_url_path(url)
            return write_atomic(target, _read_chunks(source))
        except (OSError, ValueError) as exc:
            raise DownloadError(f"{name}: cannot read {safe_url(url)}: {exc}") from exc
    if scheme not in ("http", "https"):
        raise DownloadError(f"{name}: unsupported URL scheme {scheme!r}")
    http = session or requests.Session()
    try:
        with http.get(url, stream=True, timeout=(10.0, timeout)) as response:
            if response.status_code != 200:
                raise DownloadError(
                    f"{name}: GET {safe_url(url)} answered HTTP {response.status_code} "
                    "(a presigned URL expires after expires_in seconds: ask for the file again)"
                )
            return write_atomic(target, response.iter_content(CHUNK))
    except requests.RequestException as exc:
        raise DownloadError(f"{name}: GET {safe_url(url)} failed: {type(exc).__name__}: {redact(str(exc))}") from exc


def put_file(
    path: Path,
    upload: Mapping[str, Any],
    *,
    session: requests.Session | None = None,
    timeout: float = 60.0,
) -> int:
    """Send ``path`` to a presigned upload ``{"url", "method", "headers"}``; bytes sent.

    Presigned uploads need the S3 backend: the worker's local backend refuses ``presign_uploads``.
    """
    url = str(upload.get("url", ""))
    method = str(upload.get("method") or "PUT").upper()
    headers = {str(k): str(v) for k, v in (upload.get("headers") or {}).items()}
    scheme = urlsplit(url).scheme
    if scheme not in ("http", "https"):
        raise UploadError(f"{path.name}: unsupported upload URL scheme {scheme!r}")
    http = session or requests.Session()
    try:
        with path.open("rb") as body:
            response = http.request(method, url, data=body, headers=headers, timeout=(10.0, timeout))
    except requests.RequestException as exc:  # before OSError: requests' errors subclass it
        raise UploadError(
            f"{path.name}: {method} {safe_url(url)} failed: {type(exc).__name__}: {redact(str(exc))}"
        ) from exc
    except OSError as exc:
        raise UploadError(f"{path.name}: cannot read it: {exc}") from exc
    if response.status_code not in (200, 201, 204):
        detail = redact(response.text.strip().replace("\n", " ")[:300])
        raise UploadError(f"{path.name}: {method} {safe_url(url)} answered HTTP {response.status_code}: {detail}")
    return path.stat().st_size
