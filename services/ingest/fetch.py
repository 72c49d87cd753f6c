"""SSRF-safe, size-capped downloads for URL inputs.

:func:`download` fetches an ``http(s)`` URL into a file and refuses anything that could reach
the worker's own network: every host is resolved once, every address it resolves to must be
public, the connection is pinned to those addresses (no second DNS lookup that a rebinding
server could answer differently), the address actually connected is checked before the
request is sent, and redirects are followed by hand (at most :data:`MAX_REDIRECTS`) with the
same checks on every hop. The body is streamed to a temporary file beside ``dest`` under a
byte cap and renamed into place only when complete and valid.

Host names are checked for DNS syntax before any lookup (:func:`check_url_syntax`) and
resolved on the resolver's own threads (:mod:`services.ingest.resolver`), never on the event
loop's default executor, so a lookup that never answers cannot stall other work.

Query strings (presigned URLs carry their signature there) never appear in an error or a log
line: messages name the URL through :func:`redact_url`.

Example::

    got = await download(job.url, workspace / "input.png", settings, expect="image")
    got.path, got.size, got.sha256
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urljoin, urlsplit, urlunsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from config.settings import Settings
from services.errors import InputError
from services.ingest.addresses import (
    METADATA_HOSTS,
    IPAddress,
    address_problem,
    ip_or_none,
    show_address,
)
from services.ingest.images import check_image_file
from services.ingest.resolver import BoundedResolver
from services.ingest.urls import check_url_syntax

logger = logging.getLogger(__name__)

MAX_REDIRECTS = 5
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})

Resolver = Callable[[str, int], Awaitable[Sequence[str]]]
"""``async (host, port) -> addresses``: how :func:`download` looks a host up (tests inject one)."""


@dataclass(frozen=True, slots=True)
class Downloaded:
    """A completed download. ``final_url`` is the last hop, without its query string."""

    path: Path
    size: int
    sha256: str
    content_type: str | None
    final_url: str


def redact_url(url: str) -> str:
    """``url`` without query string, fragment or credentials: safe for errors and logs."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit((parts.scheme, netloc, parts.path, "", ""))
    except ValueError:
        return "<unparseable url>"


system_resolver: Resolver = BoundedResolver()
"""The default lookup: the system resolver on threads of its own (:mod:`services.ingest.resolver`)."""


@dataclass(frozen=True, slots=True)
class _Target:
    """One validated hop: the URL to request and the addresses its host may be reached at."""

    url: URL
    host: str
    addresses: tuple[IPAddress, ...]


class _PinnedResolver(AbstractResolver):
    """Answers aiohttp's lookup with the already validated addresses and nothing else."""

    def __init__(self, host: str, addresses: Sequence[IPAddress]) -> None:
        self._host = host
        self._addresses = tuple(addresses)

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        if host != self._host:
            raise OSError(f"host {host!r} was not validated")
        return [
            ResolveResult(
                hostname=host,
                host=str(ip),
                port=port,
                family=socket.AF_INET if ip.version == 4 else socket.AF_INET6,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )
            for ip in self._addresses
        ]

    async def close(self) -> None:
        """Nothing to release."""


class _PeerRefused(Exception):
    """The socket connected to an address that was not validated (raised before any request)."""

    def __init__(self, peer: str) -> None:
        super().__init__(peer)
        self.peer = peer


class _CheckedConnector(aiohttp.TCPConnector):
    """A connector that checks the connected peer address before the request goes out."""

    def __init__(self, target: _Target, allow_private: bool, **kwargs: Any) -> None:
        resolver = _PinnedResolver(target.host, target.addresses)
        super().__init__(resolver=resolver, use_dns_cache=False, force_close=True, limit=1, **kwargs)
        self._allowed = frozenset(target.addresses)
        self._allow_private = allow_private

    async def connect(self, req: Any, traces: Any, timeout: Any) -> Any:
        conn = await super().connect(req, traces, timeout)
        peername = conn.transport.get_extra_info("peername") if conn.transport else None
        peer = str(peername[0]) if peername else "an unknown address"
        ip = ip_or_none(peer)
        if ip is None or ip not in self._allowed or address_problem(ip, allow_private=self._allow_private):
            conn.close()
            raise _PeerRefused(peer)
        return conn


def _where(original: str, current: str) -> str:
    """The URL named in messages: the original, plus the hop when a redirect led elsewhere."""
    first = redact_url(original)
    return first if current == original else f"{first} (redirected to {redact_url(current)})"


async def _validate(url: str, original: str, settings: Settings, resolver: Resolver) -> _Target:
    """Check one hop's URL and resolve its host; return the target or raise :class:`InputError`."""
    where = _where(original, url)
    try:
        check_url_syntax(url)
    except ValueError as exc:
        raise InputError(f"url {where}: {exc}") from None
    try:
        parsed = URL(url)
    except ValueError as exc:
        raise InputError(f"url {where}: URL is malformed") from exc
    host = parsed.raw_host or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if host.lower().rstrip(".") in METADATA_HOSTS:
        raise InputError(f"url {where}: host is a cloud metadata endpoint")
    literal = ip_or_none(host)
    if literal is not None:
        addresses = [literal]
    else:
        try:
            async with asyncio.timeout(settings.download_connect_timeout):
                answer = await resolver(host, port)
        except TimeoutError:
            raise InputError(
                f"could not download {where}: DNS lookup of {host} timed out after "
                f"{settings.download_connect_timeout:g} s (DOWNLOAD_CONNECT_TIMEOUT)"
            ) from None
        except (OSError, UnicodeError) as exc:  # socket.gaierror; UnicodeError from the IDNA codec
            logger.warning("DNS lookup failed for %s: %s", redact_url(url), type(exc).__name__)
            raise InputError(f"could not download {where}: host not found") from None
        found = [ip_or_none(str(a)) for a in answer]
        addresses = [ip for ip in found if ip is not None]
        if len(addresses) != len(found):
            raise InputError(f"url {where}: the resolver returned an invalid address")
        if not addresses:
            raise InputError(f"could not download {where}: host not found")
    for ip in addresses:
        why = address_problem(ip, allow_private=settings.allow_private_urls)
        if why:
            verb = "is" if literal is not None else "resolves to"
            raise InputError(f"url {where}: host {verb} {why} ({show_address(ip)})")
    return _Target(url=parsed, host=host, addresses=tuple(addresses))


def _network_message(exc: BaseException, settings: Settings) -> str:
    """A short, URL-free description of a network failure."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return f"connection timed out after {settings.download_connect_timeout:g} s"
    if isinstance(exc, aiohttp.SocketTimeoutError | TimeoutError):
        return f"timed out after {settings.download_read_timeout:g} s without data"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return "TLS certificate verification failed"
    if isinstance(exc, aiohttp.ClientSSLError):
        return "TLS handshake failed"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed ({exc.os_error.strerror or type(exc.os_error).__name__})"
    if isinstance(exc, aiohttp.ClientPayloadError):
        return "the connection closed before the whole body arrived"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    return f"network error ({type(exc).__name__})"


def _leaks(exc: BaseException, queries: Sequence[str]) -> bool:
    """Whether ``exc`` or anything it chains mentions one of the ``queries``."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = f"{current!s} {current!r}"
        if any(q in text for q in queries):
            return True
        current = current.__cause__ or current.__context__
    return False


async def _stream(resp: aiohttp.ClientResponse, tmp: Path, cap: int, where: str) -> tuple[int, str]:
    """Write the body to ``tmp`` under the byte cap; return (size, sha256)."""
    declared = resp.content_length
    if declared is not None and declared > cap:
        raise InputError(f"url {where}: body is {declared} bytes, over the {cap}-byte limit")
    digest = hashlib.sha256()
    size = 0
    with tmp.open("xb") as out:
        async for chunk in resp.content.iter_any():  # as it arrives, so a partial file is real
            size += len(chunk)
            if size > cap:
                raise InputError(f"url {where}: body is larger than the {cap}-byte limit")
            digest.update(chunk)
            out.write(chunk)
    return size, digest.hexdigest()


async def _fetch(
    url: str, tmp: Path, cap: int, settings: Settings, resolver: Resolver
) -> tuple[int, str, str | None, str]:
    """Follow redirects by hand, validating each hop; stream the final body into ``tmp``."""
    timeout = aiohttp.ClientTimeout(
        total=None,
        connect=settings.download_connect_timeout,
        sock_connect=settings.download_connect_timeout,
        sock_read=settings.download_read_timeout,
    )
    headers = {"Accept-Encoding": "identity", "User-Agent": "runpod-lora-worker"}
    current = url
    queries: list[str] = []
    for _hop in range(MAX_REDIRECTS + 1):
        target = await _validate(current, url, settings, resolver)
        queries += [q for q in (urlsplit(current).query, target.url.raw_query_string) if q]
        where = _where(url, current)
        connector = _CheckedConnector(target, settings.allow_private_urls)
        try:
            async with (
                aiohttp.ClientSession(
                    connector=connector, timeout=timeout, trust_env=False, auto_decompress=False
                ) as session,
                session.get(target.url, allow_redirects=False, headers=headers) as resp,
            ):
                if resp.status in REDIRECT_STATUSES:
                    location = resp.headers.get("Location")
                    if not location:
                        raise InputError(f"url {where}: HTTP {resp.status} redirect without a Location")
                    current = urljoin(current, location)
                    continue
                if resp.status != 200:
                    raise InputError(f"could not download {where}: HTTP {resp.status}")
                size, sha256 = await _stream(resp, tmp, cap, where)
                return size, sha256, resp.headers.get("Content-Type"), current
        except _PeerRefused as exc:
            raise InputError(
                f"url {where}: connected to {exc.peer}, which is not an address validated for the host"
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.warning("download of %s failed: %s", where, type(exc).__name__)
            message = f"could not download {where}: {_network_message(exc, settings)}"
            if _leaks(exc, queries):
                raise InputError(message) from None
            raise InputError(message) from exc
    raise InputError(f"url {redact_url(url)}: more than {MAX_REDIRECTS} redirects")


def _check_zip(path: Path, where: str) -> None:
    with path.open("rb") as f:
        if f.read(4) != b"PK\x03\x04":
            raise InputError(f"url {where}: not a zip file")


async def download(
    url: str,
    dest: Path,
    settings: Settings,
    *,
    expect: Literal["image", "zip", "any"] = "any",
    max_bytes: int | None = None,
    resolver: Resolver | None = None,
) -> Downloaded:
    """Download ``url`` to ``dest`` with the SSRF checks in the module docstring.

    ``max_bytes`` overrides ``settings.max_download_bytes``. ``expect="image"`` accepts
    PNG, JPEG, WEBP, GIF and BMP that decode within ``settings.max_image_pixels``
    (:mod:`services.ingest.images`); ``expect="zip"`` checks the zip signature (extract with
    :mod:`services.ingest.zipsafe`). ``resolver`` replaces :data:`system_resolver` (tests simulate
    DNS answers with it); each lookup is bounded by ``settings.download_connect_timeout``.
    Every refusal or failure raises :class:`InputError`; nothing is left at ``dest`` or
    beside it unless the download completed and passed its checks, even on cancellation.
    """
    cap = settings.max_download_bytes if max_bytes is None else max_bytes
    if cap < 1:
        raise ValueError("max_bytes must be at least 1")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.{secrets.token_hex(6)}.part"
    try:
        try:
            async with asyncio.timeout(settings.download_total_timeout):  # a trickling server cannot hold a job
                size, sha256, content_type, final = await _fetch(url, tmp, cap, settings, resolver or system_resolver)
        except TimeoutError:
            raise InputError(
                f"url {redact_url(url)}: could not download within {settings.download_total_timeout:g} s "
                "(DOWNLOAD_TOTAL_TIMEOUT)"
            ) from None
        where = _where(url, final)
        if expect == "image":
            await asyncio.to_thread(check_image_file, tmp, settings.max_image_pixels, f"url {where}")
        elif expect == "zip":
            _check_zip(tmp, where)
        os.replace(tmp, dest)
    except BaseException:  # cancellation included: never leave a partial file behind
        tmp.unlink(missing_ok=True)
        raise
    logger.info("downloaded %s: %d bytes, sha256 %s", where, size, sha256)
    return Downloaded(path=dest, size=size, sha256=sha256, content_type=content_type, final_url=redact_url(final))
