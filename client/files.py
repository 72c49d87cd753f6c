"""Output files and presigned uploads on the client's side.

The worker returns every file as ``{"type": "base64", "name", "mime", "size", "data"}`` or
``{"type": "redirect", "name", "mime", "size", "key", "url", "expires_in"}``; a redirect URL is
a presigned ``https://`` GET, or a ``file://`` path when the worker runs the local backend on
this machine. ``file://`` URLs are honoured only for the local server (``allow_file_urls``), so a
remote endpoint can never make the client read or write an arbitrary local path.

Nothing from a response is trusted: the name must be a plain local file name
(:mod:`client.names`), ``http(s)`` URLs must point at an allowed host (:mod:`client.hosts`) and
redirects may not leave it, and reading stops at the announced size (at most ``max_bytes``).
Files are written to a temporary name beside the target and renamed only when complete and of
the announced size; URLs appear in messages without their query string (the signature).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import re
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urljoin, urlsplit
from urllib.request import url2pathname

import requests
import urllib3

from client.errors import ClientError, DownloadError, UploadError
from client.hosts import HostPolicy, host_of
from client.names import local_name
from client.schema import OutputFile, PresignedUpload, output_file

CHUNK = 1024 * 1024
DEFAULT_MAX_DOWNLOAD_BYTES = 16 * 1024**3  # the largest output file the client saves
MAX_REDIRECTS = 5
REDIRECT_CODES = frozenset({301, 302, 303, 307, 308})
log = logging.getLogger("client")
_QUERY = re.compile(r"\?[^\s'\")]*")


def redact(text: str) -> str:
    """``text`` with URL query strings removed (requests' errors quote the full URL)."""
    return _QUERY.sub("?<redacted>", text)


def safe_url(url: str) -> str:
    """``url`` without query and fragment: presigned signatures stay out of messages."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}"


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


def write_atomic(target: Path, chunks: Iterable[bytes], expected: int | None = None) -> int:
    """Write ``chunks`` to ``target`` through a temporary file in the same folder; bytes written.

    With ``expected``, a different total raises :class:`DownloadError` and nothing is kept.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.part")  # "x": the umask's mode
    written = 0
    try:
        with temp.open("xb") as out:
            for chunk in chunks:
                out.write(chunk)
                written += len(chunk)
        if expected is not None and written != expected:
            raise DownloadError(f"{target.name}: got {written} bytes, the worker announced {expected}; not saved")
        temp.replace(target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()
        raise
    return written


def capped(
    read: Callable[[int], bytes], limit: int, what: str, error: type[ClientError] = DownloadError
) -> Iterator[bytes]:
    """Chunks from ``read(n)`` until it ends; more than ``limit`` bytes raises before they are yielded.

    Never asks for more than ``limit + 1`` bytes in all, so a lying body is not read through.
    """
    total = 0
    while chunk := read(min(CHUNK, limit - total + 1)):
        total += len(chunk)
        if total > limit:
            raise error(f"{what}: the body is larger than {limit} bytes: refused")
        yield chunk


def save_output_file(
    file: Mapping[str, Any],
    dest: str | Path,
    *,
    session: requests.Session | None = None,
    allow_file_urls: bool = False,
    timeout: float = 60.0,
    hosts: HostPolicy | None = None,
    max_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
) -> Path:
    """Save one output file to ``dest`` (a path, or an existing directory) and return the path.

    Base64 is decoded; a redirect is downloaded (``http(s)``, from a host ``hosts`` allows: by
    default AWS S3 only) or copied (``file://``, local server only). The size the worker
    announced is checked before the file is kept; nothing over ``max_bytes`` is read.
    """
    spec = output_file(file, "output file")
    target = destination(dest, spec.name)
    limit = max_bytes if spec.size is None else min(spec.size, max_bytes)
    if spec.size is not None and spec.size > max_bytes:
        raise DownloadError(f"{spec.name}: {spec.size} bytes is over the {max_bytes}-byte download limit")
    try:
        if spec.type == "base64":
            written = write_atomic(target, [_decode(spec, limit)], spec.size)
        else:
            policy = hosts or HostPolicy.build()
            written = _fetch(spec, target, session, allow_file_urls, timeout, policy, limit)
    except OSError as exc:
        raise DownloadError(f"{spec.name}: cannot write {target}: {exc}") from exc
    log.debug("%s: saved %d bytes to %s", spec.name, written, target)
    return target


def _decode(spec: OutputFile, limit: int) -> bytes:
    if len(spec.data) > 4 * (limit // 3 + 1):
        raise DownloadError(f"{spec.name}: the base64 data is larger than {limit} bytes: refused")
    try:
        return base64.b64decode(spec.data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise DownloadError(f"{spec.name}: the base64 data is not valid ({exc})") from exc


def _fetch(
    spec: OutputFile,
    target: Path,
    session: requests.Session | None,
    allow_file_urls: bool,
    timeout: float,
    hosts: HostPolicy,
    limit: int,
) -> int:
    url, name = spec.url, spec.name
    if urlsplit(url).scheme == "file":
        if not allow_file_urls:
            raise DownloadError(f"{name}: file:// URLs are only followed for a local server (--local)")
        try:
            source = file_url_path(url).open("rb")
        except (OSError, ValueError) as exc:
            raise DownloadError(f"{name}: cannot read {safe_url(url)}: {exc}") from exc
        with source:
            return write_atomic(target, capped(source.read, limit, name), spec.size)
    http = session or requests.Session()
    try:
        with _open(http, url, hosts, timeout, name) as response:
            announced = response.headers.get("Content-Length", "")
            if announced.isdigit() and int(announced) > limit:
                raise DownloadError(f"{name}: the server announces {announced} bytes, over {limit}: refused")
            body = capped(lambda n: response.raw.read(n, decode_content=True), limit, name)
            return write_atomic(target, body, spec.size)
    except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
        raise DownloadError(f"{name}: GET {safe_url(url)} failed: {type(exc).__name__}: {redact(str(exc))}") from exc


def _open(http: requests.Session, url: str, hosts: HostPolicy, timeout: float, name: str) -> requests.Response:
    """The 200 answer to ``GET url``, following redirects only on the same host."""
    for _ in range(MAX_REDIRECTS + 1):
        if problem := hosts.problem(url):
            raise DownloadError(f"{name}: refusing {safe_url(url)}: {problem}")
        response = http.get(url, stream=True, timeout=(10.0, timeout), allow_redirects=False)
        if response.status_code == 200:
            return response
        response.close()
        if response.status_code not in REDIRECT_CODES:
            raise DownloadError(
                f"{name}: GET {safe_url(url)} answered HTTP {response.status_code} "
                "(a presigned URL expires after expires_in seconds: ask for the file again)"
            )
        location = urljoin(url, response.headers.get("Location", ""))
        if host_of(location) != host_of(url) or urlsplit(location).scheme not in ("http", "https"):
            raise DownloadError(f"{name}: GET {safe_url(url)} redirects to {safe_url(location)}, another host: refused")
        url = location
    raise DownloadError(f"{name}: more than {MAX_REDIRECTS} redirects from {safe_url(url)}: refused")


def put_file(
    path: Path,
    upload: PresignedUpload,
    *,
    session: requests.Session | None = None,
    timeout: float = 60.0,
    hosts: HostPolicy | None = None,
) -> int:
    """Send ``path`` to a presigned upload on an allowed host (no redirects); bytes sent.

    Presigned uploads need the S3 backend: the worker's local backend refuses ``presign_uploads``.
    """
    url, method = upload.url, upload.method
    if problem := (hosts or HostPolicy.build()).problem(url):
        raise UploadError(f"{path.name}: refusing {safe_url(url)}: {problem}")
    http = session or requests.Session()
    try:
        with path.open("rb") as body:
            response = http.request(
                method, url, data=body, headers=upload.headers, timeout=(10.0, timeout), allow_redirects=False
            )
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
