"""SSRF-safe downloads, tested against real aiohttp servers on loopback.

Loopback stands in for both sides of the network: ``127.0.0.1`` is the private host an
attacker aims at, and, where a test needs a public host, ``127.0.0.2`` is declared public by
the ``fake_public`` fixture and host names are answered by an injected resolver (:class:`FakeDNS`).
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import io
import ipaddress
import logging
import re
import socket
import ssl
import struct
import threading
import traceback
import zipfile
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from PIL import Image

from config.settings import Settings, build_settings
from services.errors import InputError
from services.ingest import fetch
from services.ingest.fetch import Downloaded, download, redact_url
from services.ingest.urls import check_url_syntax
from tests.conftest import use_settings_env

PUBLIC_STAND_IN = ipaddress.ip_address("127.0.0.2")
SECRET = "X-Amz-Signature=c0ffee5ecret"  # pragma: allowlist secret (a test fake)
PAYLOAD = bytes(range(256)) * 4


def png_bytes(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, format="PNG")
    return buf.getvalue()


def forged_png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` but that holds almost no data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


def zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("a.txt", "alpha")
    return buf.getvalue()


class Server:
    """An aiohttp app with one route per behaviour; counts the requests it gets."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.base = ""
        self.stalled = asyncio.Event()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        self.hits[name] += 1
        bodies = {
            "file": PAYLOAD,
            "png": png_bytes(8, 8),
            "text.png": b"hello, I am not an image",
            "huge.png": png_bytes(100, 100),
            "forged.png": forged_png(3000, 3000),
            "bomb.png": forged_png(60000, 60000),
            "truncated.png": png_bytes(64, 64)[:80],
            "zip": zip_bytes(),
            "big": bytes(5000),
        }
        if name in bodies:
            return web.Response(body=bodies[name], content_type="application/octet-stream")
        if name == "chunked":
            resp = web.StreamResponse()
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            for _ in range(5):
                await resp.write(bytes(1000))
            await resp.write_eof()
            return resp
        if name == "short":
            resp = web.StreamResponse(headers={"Content-Length": "1000"})
            await resp.prepare(request)
            await resp.write(bytes(500))
            request.transport.close()
            return resp
        if name == "stall-headers":
            self.stalled.set()
            await asyncio.sleep(30)
        if name == "stall-body":
            resp = web.StreamResponse(headers={"Content-Length": "1000000"})
            await resp.prepare(request)
            await resp.write(bytes(100_000))
            self.stalled.set()
            await asyncio.sleep(30)
        if name == "trickle":
            resp = web.StreamResponse(headers={"Content-Length": "1000"})
            await resp.prepare(request)
            for _ in range(1000):  # a byte every 50 ms: never idle long enough for the read timeout
                await resp.write(b"x")
                await asyncio.sleep(0.05)
            return resp
        if name == "redirect":
            raise web.HTTPFound(request.query["to"])
        if name.startswith("chain-"):
            left = int(name.removeprefix("chain-"))
            raise web.HTTPFound(f"/chain-{left - 1}?{SECRET}" if left else f"/file?{SECRET}")
        if name.startswith("status-"):
            return web.Response(status=int(name.removeprefix("status-")))
        raise web.HTTPNotFound()


@asynccontextmanager
async def serve(host: str = "127.0.0.1") -> AsyncIterator[Server]:
    server = Server()
    app = web.Application()
    app.router.add_get("/{name}", server.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    server.base = f"http://{host}:{port}"
    try:
        yield server
    finally:
        await runner.cleanup()


class FakeDNS:
    """A resolver answering from a table; a list of answers per host is used in turn (the last repeats)."""

    def __init__(self, table: dict[str, list[list[str]]]) -> None:
        self.table = table
        self.calls: list[str] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        answers = self.table[host]
        return answers[min(self.calls.count(host), len(answers)) - 1]


@pytest.fixture
def fake_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Treat 127.0.0.2 as a public address, so a local server can play a public host."""
    real = fetch.address_problem

    def patched(ip: Any, *, allow_private: bool = False) -> str | None:
        return None if ip == PUBLIC_STAND_IN else real(ip, allow_private=allow_private)

    monkeypatch.setattr(fetch, "address_problem", patched)


def strict(**overrides: Any) -> Settings:
    base: dict[str, Any] = {"download_connect_timeout": 2, "download_read_timeout": 2, "max_image_pixels": 4096}
    return build_settings(**(base | overrides))


def lenient(**overrides: Any) -> Settings:
    return strict(allow_private_urls=True, **overrides)


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def fetch_error(make_url: Callable[[Server], str], settings: Settings, tmp_path: Path, **kwargs: Any) -> InputError:
    """Run a download against a fresh server and return the InputError it must raise."""

    async def go() -> InputError:
        async with serve() as server:
            with pytest.raises(InputError) as err:
                await download(make_url(server), tmp_path / "out.bin", settings, **kwargs)
            return err.value

    error = run(go())
    assert list(tmp_path.iterdir()) == [], "a failed download must leave no file"
    return error


# --- URL syntax ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "https://x.example/a.zip?sig=1",
        "http://127.0.0.1:8080/",
        "http://[::1]/a",
        "https://bücher.example/",
        "https://xn--bcher-kva.example/",
        "http://under_score.example/",
        "http://fqdn.example./",
        "http://" + "a" * 63 + ".example/",
    ],
)
def test_check_url_syntax_accepts(url: str) -> None:
    assert check_url_syntax(url) == url


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("", "non-empty"),
        ("ftp://x.example/a", "only http and https"),
        ("file:///etc/passwd", "only http and https"),
        ("gopher://x.example:70/", "only http and https"),
        ("//x.example/a", "relative URL"),
        ("https://user:pw@x.example/a", "credentials"),  # pragma: allowlist secret (a test fake)
        ("https://token@x.example/a", "credentials"),
        ("http://", "no host"),
        ("http://x.example:0/", "port"),
        ("http://x.example:99999/", "malformed"),
        ("http://x.example/a b", "whitespace"),
        ("http://x.example/\r\nHost: evil", "whitespace"),
        ("http://2130706433/", "dotted-quad"),
        ("http://127.1/", "dotted-quad"),
        ("http://0x7f.0.0.1/", "dotted-quad"),
        ("http://0177.0.0.1/", "dotted-quad"),
        ("http://x.example\\.evil/", "backslash"),
        ("https://x.example/" + "a" * 9000, "over the 8192-character limit"),
        # host names DNS cannot carry (the IDNA codec raised UnicodeError for these)
        ("http://a..b/x", "'a..b' has an empty label"),
        ("http://.a.example/", "has an empty label"),
        ("http://-a.com/", "label '-a' must be letters, digits"),
        ("http://a-.com/", "label 'a-' must be letters, digits"),
        ("http://" + "a" * 64 + ".com/", "has a label over 63 characters"),
        ("http://" + "abcdefghi." * 26 + "com/", "over the 253-character limit"),
        ("http://xn--zz.example/", "label 'xn--zz' is not valid punycode"),
        ("http://\u2488.example/", "has an empty label"),  # NFKC: '1.' then '.example'
        ("http://a%2e.example/", "must be letters, digits"),
    ],
)
def test_check_url_syntax_refuses(url: str, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_url_syntax(url)


@pytest.mark.parametrize(
    "url", ["http://a..b/x", "http://-a.com/", "http://" + "a" * 64 + ".com/", "http://xn--zz.ex/"]
)
def test_invalid_host_is_an_input_error_without_a_lookup(tmp_path: Path, url: str) -> None:
    """An InputError naming the URL before any lookup; never a UnicodeError from the IDNA codec."""
    looked_up: list[str] = []

    async def counting(host: str, port: int) -> list[str]:
        looked_up.append(host)
        return await fetch.system_resolver(host, port)

    with pytest.raises(InputError, match=rf"^url {re.escape(url)}: host ") as err:
        run(download(url, tmp_path / "x", strict(), resolver=counting))
    assert looked_up == []
    assert "UnicodeError" not in "".join(traceback.format_exception(err.value))


def test_redact_url_drops_query_fragment_and_credentials() -> None:
    assert redact_url(f"https://u:p@x.example:8443/a/b.zip?{SECRET}#frag") == "https://x.example:8443/a/b.zip"
    assert redact_url("http://[::1]/a") == "http://[::1]/a"


@pytest.mark.parametrize("url", ["ftp://x.example/a.zip", "file:///etc/passwd"])
def test_download_refuses_other_schemes(url: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="only http and https"):
        run(download(url, tmp_path / "x", lenient()))


def test_download_refuses_credentials(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="credentials") as err:
        url = "https://alice:hunter2@x.example/a.zip"  # pragma: allowlist secret (a test fake)
        run(download(url, tmp_path / "x", lenient()))
    assert "hunter2" not in str(err.value)


# --- address policy -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "why"),
    [
        ("127.0.0.1", "a loopback address"),
        ("10.0.0.5", "a private address"),
        ("172.16.3.4", "a private address"),
        ("192.168.1.1", "a private address"),
        ("100.64.0.1", "a non-public address"),
        ("169.254.1.1", "a link-local address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("100.100.100.200", "a cloud metadata address"),
        ("0.0.0.0", "an unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("240.0.0.1", "a reserved address"),
        ("255.255.255.255", "a reserved address"),
        ("192.0.2.1", "a private address"),
        ("::1", "a loopback address"),
        ("::", "an unspecified address"),
        ("fe80::1", "a link-local address"),
        ("fc00::1", "a private address"),
        ("fd00:ec2::254", "a cloud metadata address"),
        ("ff02::1", "a multicast address"),
        ("::ffff:127.0.0.1", "a loopback address"),
        ("::ffff:10.0.0.5", "a private address"),
        ("::ffff:169.254.169.254", "a cloud metadata address"),
        ("2002:7f00:1::", "a loopback address"),
        ("64:ff9b::a00:5", "a private address"),
        ("64:ff9b:1::1", "a reserved address"),
        ("::7f00:1", "a reserved address"),
        ("2001:db8::1", "a private address"),
    ],
)
def test_forbidden_addresses(address: str, why: str, tmp_path: Path) -> None:
    assert fetch.address_problem(ipaddress.ip_address(address)) == why
    dns = FakeDNS({"h.example": [[address]]})
    with pytest.raises(InputError, match=f"host resolves to {why}") as err:
        run(download("https://h.example/a.png", tmp_path / "x", strict(), resolver=dns))
    assert f"({address})" in str(err.value) or f"({ipaddress.ip_address(address)} = " in str(err.value)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "64:ff9b::808:808"])
def test_public_addresses_pass_the_policy(address: str) -> None:
    assert fetch.address_problem(ipaddress.ip_address(address)) is None


@pytest.mark.parametrize(
    "url", ["http://169.254.169.254/latest/meta-data/", "http://[::ffff:127.0.0.1]/", "http://[::1]:8080/"]
)
def test_ip_literal_hosts_are_checked(url: str, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"host is a (loopback|cloud metadata) address"):
        run(download(url, tmp_path / "x", strict()))


def test_every_resolved_address_must_be_public(tmp_path: Path) -> None:
    dns = FakeDNS({"h.example": [["8.8.8.8", "10.0.0.5"]]})
    with pytest.raises(InputError, match=r"private address \(10\.0\.0\.5\)"):
        run(download("https://h.example/a", tmp_path / "x", strict(), resolver=dns))


@pytest.mark.parametrize(
    "url", ["http://metadata.google.internal/computeMetadata/v1/", "http://169.254.169.254/", "http://[fd00:ec2::254]/"]
)
def test_metadata_refused_even_when_private_hosts_are_allowed(url: str, tmp_path: Path) -> None:
    dns = FakeDNS({})
    with pytest.raises(InputError, match="cloud metadata"):
        run(download(url, tmp_path / "x", lenient(), resolver=dns))
    assert dns.calls == []


def test_unknown_host(tmp_path: Path) -> None:
    async def nxdomain(host: str, port: int) -> list[str]:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    with pytest.raises(InputError, match=r"could not download https://nope\.example/a: host not found"):
        run(download(f"https://nope.example/a?{SECRET}", tmp_path / "x", strict(), resolver=nxdomain))


# --- loopback server: policy, redirects, rebinding, peer check ------------------------------------


def test_loopback_refused_by_default(tmp_path: Path) -> None:
    async def go() -> tuple[InputError, Server]:
        async with serve() as server:
            with pytest.raises(InputError) as err:
                await download(f"{server.base}/file", tmp_path / "x", strict())
            return err.value, server

    error, server = run(go())
    assert str(error) == f"url {server.base}/file: host is a loopback address (127.0.0.1)"
    assert server.hits == {}
    assert list(tmp_path.iterdir()) == []


def test_localhost_name_refused_by_default(tmp_path: Path) -> None:
    error = fetch_error(lambda s: s.base.replace("127.0.0.1", "localhost") + "/file", strict(), tmp_path)
    assert "host resolves to a loopback address" in str(error)


def test_allowed_with_allow_private_urls(tmp_path: Path) -> None:
    async def go() -> tuple[Downloaded, str]:
        async with serve() as server:
            got = await download(f"{server.base}/file?{SECRET}", tmp_path / "sub" / "f.bin", lenient())
            return got, server.base

    got, base = run(go())
    assert got == Downloaded(
        path=tmp_path / "sub" / "f.bin",
        size=len(PAYLOAD),
        sha256=hashlib.sha256(PAYLOAD).hexdigest(),
        content_type="application/octet-stream",
        final_url=f"{base}/file",
    )
    assert got.path.read_bytes() == PAYLOAD
    assert [p.name for p in got.path.parent.iterdir()] == ["f.bin"]


def test_redirect_to_private_host_refused(tmp_path: Path, fake_public: None) -> None:
    async def go() -> tuple[InputError, Server, Server]:
        async with serve("127.0.0.2") as public, serve("127.0.0.1") as private:
            port = public.base.rsplit(":", 1)[1]
            dns = FakeDNS({"public.example": [["127.0.0.2"]]})
            target = f"{private.base}/file"
            with pytest.raises(InputError) as err:
                await download(
                    f"http://public.example:{port}/redirect?to={target}", tmp_path / "x", strict(), resolver=dns
                )
            return err.value, public, private

    error, public, private = run(go())
    assert "(redirected to http://127.0.0.1:" in str(error)
    assert "host is a loopback address (127.0.0.1)" in str(error)
    assert public.hits["redirect"] == 1
    assert private.hits == {}
    assert list(tmp_path.iterdir()) == []


def test_redirect_to_name_resolving_private_refused(tmp_path: Path, fake_public: None) -> None:
    async def go() -> InputError:
        async with serve("127.0.0.2") as public:
            port = public.base.rsplit(":", 1)[1]
            dns = FakeDNS({"public.example": [["127.0.0.2"]], "internal.example": [["10.0.0.5"]]})
            with pytest.raises(InputError) as err:
                await download(
                    f"http://public.example:{port}/redirect?to=http://internal.example/x",
                    tmp_path / "x",
                    strict(),
                    resolver=dns,
                )
            return err.value

    assert "host resolves to a private address (10.0.0.5)" in str(run(go()))


def test_dns_rebinding_between_hops_refused(tmp_path: Path, fake_public: None) -> None:
    """The second hop to the same name is resolved again, and its new answer is checked."""

    async def go() -> tuple[InputError, list[str]]:
        async with serve("127.0.0.2") as public:
            port = public.base.rsplit(":", 1)[1]
            dns = FakeDNS({"rebind.example": [["127.0.0.2"], ["127.0.0.1"]]})
            with pytest.raises(InputError) as err:
                await download(
                    f"http://rebind.example:{port}/redirect?to=/file", tmp_path / "x", strict(), resolver=dns
                )
            return err.value, dns.calls

    error, calls = run(go())
    assert "host resolves to a loopback address (127.0.0.1)" in str(error)
    assert calls == ["rebind.example", "rebind.example"]


def test_connection_pinned_to_the_validated_answer(tmp_path: Path, fake_public: None) -> None:
    """One lookup per hop: a resolver that would answer 127.0.0.1 next time is never asked again."""

    async def go() -> tuple[Downloaded, list[str], Server]:
        async with serve("127.0.0.2") as public:
            port = public.base.rsplit(":", 1)[1]
            dns = FakeDNS({"rebind.example": [["127.0.0.2"], ["127.0.0.1"]]})
            got = await download(f"http://rebind.example:{port}/file", tmp_path / "f", strict(), resolver=dns)
            return got, dns.calls, public

    got, calls, public = run(go())
    assert got.size == len(PAYLOAD)
    assert calls == ["rebind.example"]
    assert public.hits["file"] == 1


class _Misrouted(fetch._PinnedResolver):
    """Simulates a connection that lands somewhere other than the validated address."""

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> Any:
        answer = await super().resolve(host, port, family)
        return [dict(item, host="127.0.0.1", family=socket.AF_INET) for item in answer]


@pytest.mark.parametrize(("validated", "settings"), [("93.184.216.34", strict()), ("127.0.0.2", lenient())])
def test_peer_address_checked_before_the_request_is_sent(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, validated: str, settings: Settings
) -> None:
    monkeypatch.setattr(fetch, "_PinnedResolver", _Misrouted)

    async def go() -> tuple[InputError, Server]:
        async with serve("127.0.0.1") as server:
            port = server.base.rsplit(":", 1)[1]
            dns = FakeDNS({"pub.example": [[validated]]})
            with pytest.raises(InputError) as err:
                await download(f"http://pub.example:{port}/file", tmp_path / "x", settings, resolver=dns)
            return err.value, server

    error, server = run(go())
    assert "connected to 127.0.0.1, which is not an address validated for the host" in str(error)
    assert server.hits == {}
    assert list(tmp_path.iterdir()) == []


def test_five_redirects_followed(tmp_path: Path) -> None:
    async def go() -> Downloaded:
        async with serve() as server:
            return await download(f"{server.base}/chain-4", tmp_path / "f", lenient())

    got = run(go())
    assert got.final_url.endswith("/file")
    assert got.path.read_bytes() == PAYLOAD


def test_more_than_five_redirects_refused(tmp_path: Path) -> None:
    error = fetch_error(lambda s: f"{s.base}/chain-5", lenient(), tmp_path)
    assert "more than 5 redirects" in str(error)


def test_redirect_to_other_scheme_refused(tmp_path: Path) -> None:
    error = fetch_error(lambda s: f"{s.base}/redirect?to=file:///etc/passwd", lenient(), tmp_path)
    assert "only http and https" in str(error)


# --- size, status, network failures ---------------------------------------------------------------


def test_size_cap_with_content_length(tmp_path: Path) -> None:
    error = fetch_error(lambda s: f"{s.base}/big", lenient(), tmp_path, max_bytes=1000)
    assert "body is 5000 bytes, over the 1000-byte limit" in str(error)


def test_size_cap_without_content_length(tmp_path: Path) -> None:
    error = fetch_error(lambda s: f"{s.base}/chunked", lenient(max_download_bytes=2500), tmp_path)
    assert "body is larger than the 2500-byte limit" in str(error)


def test_size_at_the_cap_is_accepted(tmp_path: Path) -> None:
    async def go() -> Downloaded:
        async with serve() as server:
            return await download(f"{server.base}/chunked", tmp_path / "f", lenient(max_download_bytes=5000))

    assert run(go()).size == 5000


@pytest.mark.parametrize("code", [404, 500])
def test_http_error_status(tmp_path: Path, code: int) -> None:
    error = fetch_error(lambda s: f"{s.base}/status-{code}", lenient(), tmp_path)
    assert str(error).endswith(f"/status-{code}: HTTP {code}")


@pytest.mark.parametrize("name", ["stall-headers", "stall-body"])
def test_read_timeout(tmp_path: Path, name: str) -> None:
    error = fetch_error(lambda s: f"{s.base}/{name}", lenient(download_read_timeout=0.3), tmp_path)
    assert f"/{name}: timed out after 0.3 s without data" in str(error)


def test_total_timeout_stops_a_trickling_server(tmp_path: Path) -> None:
    settings = lenient(download_read_timeout=5, download_total_timeout=0.5)
    error = fetch_error(lambda s: f"{s.base}/trickle", settings, tmp_path)
    assert "could not download within 0.5 s (DOWNLOAD_TOTAL_TIMEOUT)" in str(error)


def test_connect_timeout(tmp_path: Path) -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    filler = socket.create_connection(listener.getsockname())  # the accept queue is now full
    try:
        port = listener.getsockname()[1]
        settings = lenient(download_connect_timeout=0.3)
        with pytest.raises(InputError, match=re.escape("connection timed out after 0.3 s")) as err:
            run(download(f"http://127.0.0.1:{port}/f?{SECRET}", tmp_path / "x", settings))
    finally:
        filler.close()
        listener.close()
    assert list(tmp_path.iterdir()) == []
    # aiohttp's ConnectionTimeoutError quotes the full URL: it must not be chained in
    assert SECRET not in "".join(traceback.format_exception(err.value))


def test_dns_timeout(tmp_path: Path) -> None:
    async def stuck(host: str, port: int) -> list[str]:
        await asyncio.sleep(30)
        return []

    with pytest.raises(InputError, match=re.escape("DNS lookup of slow.example timed out after 0.3 s")):
        run(download("https://slow.example/a", tmp_path / "x", strict(download_connect_timeout=0.3), resolver=stuck))


class HungDNS:
    """``socket.getaddrinfo`` where names under ``.hang.test`` block their thread, as a lookup
    that never answers does, until :attr:`release` is set; other names go to the real one."""

    def __init__(self) -> None:
        self.real = socket.getaddrinfo
        self.release = threading.Event()
        self.lock = threading.Condition()
        self.blocked = 0
        self.peak = 0

    def wait_blocked(self, count: int, timeout: float = 60) -> None:
        """Until ``count`` lookups are stuck at once (``timeout``: a hang guard only)."""
        with self.lock:
            if not self.lock.wait_for(lambda: self.blocked >= count, timeout):
                raise AssertionError(f"only {self.blocked} of {count} lookups got stuck")

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if not (isinstance(host, str) and host.endswith(".hang.test")):
            return self.real(host, port, *args, **kwargs)
        with self.lock:
            self.blocked += 1
            self.peak = max(self.peak, self.blocked)
            self.lock.notify_all()
        try:
            self.release.wait(120)
        finally:
            with self.lock:
                self.blocked -= 1
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")


def test_hung_dns_cannot_starve_other_jobs(
    tmp_path: Path, local_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 11, finding 2: 256 URLs whose lookups never answer, while a 50-file upload runs
    through the handler on the local backend (which writes through the default executor)."""
    from rp_handler import handler
    from services.ingest.resolver import DNS_THREADS
    from services.storage import close_storages

    use_settings_env(monkeypatch, local_settings)
    hung = HungDNS()
    monkeypatch.setattr(socket, "getaddrinfo", hung)
    settings = strict(download_connect_timeout=1)
    files = [{"name": f"{i}.txt", "data": base64.b64encode(f"file {i}".encode()).decode()} for i in range(50)]

    async def upload(dataset: str) -> None:
        result = await handler(
            {"id": dataset, "input": {"action": "upload_training_files", "dataset": dataset, "files": files}}
        )
        assert "error" not in result and len(result["uploaded"]) == 50, result

    async def main() -> tuple[int, list[BaseException | Downloaded]]:
        try:
            await upload("warm")  # imports and storage set-up out of the way
            attack = asyncio.gather(
                *(download(f"http://h{i}.hang.test/a", tmp_path / f"x{i}", settings) for i in range(256)),
                return_exceptions=True,
            )
            await asyncio.to_thread(hung.wait_blocked, DNS_THREADS)  # the resolver's threads are all stuck
            async with asyncio.timeout(60):  # a hang guard only: the old code never finished
                await upload("victim")
            still_hung = hung.blocked
            return still_hung, await attack
        finally:
            hung.release.set()
            await close_storages()

    # Told, not timed: the victim's upload must end while every resolver thread is still stuck.
    still_hung, outcomes = asyncio.run(main())
    assert still_hung == DNS_THREADS, "the victim finished only once a stuck lookup let go"
    assert hung.peak == DNS_THREADS, "lookups never ran on more threads than the resolver has"
    for i, outcome in enumerate(outcomes):
        assert isinstance(outcome, InputError)
        assert f"DNS lookup of h{i}.hang.test timed out after 1 s" in str(outcome)


def test_connection_refused(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: connections are refused
        with pytest.raises(InputError, match=r"could not download http://127\.0\.0\.1:\d+/f: connection failed"):
            run(download(f"http://127.0.0.1:{port}/f", tmp_path / "x", lenient()))


def self_signed_context(tmp_path: Path, host: str) -> ssl.SSLContext:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(host)]), critical=False)
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    return context


def test_tls_is_still_verified_with_a_pinned_address(tmp_path: Path) -> None:
    """Pinning the address must not turn certificate checks off: an unknown CA is refused."""
    certs, out = tmp_path / "certs", tmp_path / "out"
    certs.mkdir()
    context = self_signed_context(certs, "secure.example")

    async def go() -> InputError:
        async def file(request: web.Request) -> web.Response:
            return web.Response(body=PAYLOAD)

        app = web.Application()
        app.router.add_get("/file", file)
        runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        dns = FakeDNS({"secure.example": [["127.0.0.1"]]})
        try:
            with pytest.raises(InputError) as err:
                await download(f"https://secure.example:{port}/file", out / "x", lenient(), resolver=dns)
            return err.value
        finally:
            await runner.cleanup()

    assert "TLS certificate verification failed" in str(run(go()))
    assert list(out.iterdir()) == []


def test_body_cut_short(tmp_path: Path) -> None:
    error = fetch_error(lambda s: f"{s.base}/short", lenient(), tmp_path)
    assert "closed before the whole body arrived" in str(error)


# --- content checks -------------------------------------------------------------------------


def test_image_accepted(tmp_path: Path) -> None:
    async def go() -> Downloaded:
        async with serve() as server:
            return await download(f"{server.base}/png", tmp_path / "i.png", lenient(), expect="image")

    got = run(go())
    with Image.open(got.path) as im:
        assert im.size == (8, 8)


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("text.png", "not an image"),
        ("huge.png", r"100x100 is over 4096 pixels \(MAX_IMAGE_PIXELS\)$"),
        ("forged.png", r"3000x3000 is over 4096 pixels \(MAX_IMAGE_PIXELS\)$"),
        ("bomb.png", r"60000x60000 is over 4096 pixels \(MAX_IMAGE_PIXELS\)$"),
        ("truncated.png", "not a decodable PNG image"),
        ("zip", "not an image"),
    ],
)
def test_bad_images_refused(tmp_path: Path, name: str, why: str) -> None:
    error = fetch_error(lambda s: f"{s.base}/{name}", lenient(), tmp_path, expect="image")
    assert re.match(rf"url http://127\.0\.0\.1:\d+/{re.escape(name)}: ", str(error))
    assert re.search(why, str(error))
    assert str(tmp_path) not in str(error) and ".part" not in str(error), "no local path in a message"


def test_zip_expected(tmp_path: Path) -> None:
    async def go() -> Downloaded:
        async with serve() as server:
            return await download(f"{server.base}/zip", tmp_path / "d.zip", lenient(), expect="zip")

    assert zipfile.is_zipfile(run(go()).path)
    error = fetch_error(lambda s: f"{s.base}/png", lenient(), tmp_path / "other", expect="zip")
    assert "not a zip file" in str(error)


# --- cancellation and secrecy -----------------------------------------------------------------


def test_cancellation_leaves_no_partial_file(tmp_path: Path) -> None:
    async def go() -> list[str]:
        async with serve() as server:
            settings = lenient(download_read_timeout=30)
            task = asyncio.create_task(download(f"{server.base}/stall-body", tmp_path / "x", settings))
            await asyncio.wait_for(server.stalled.wait(), 5)
            for _ in range(200):  # until the first bytes are on disk
                if any(tmp_path.glob("*.part")) and any(p.stat().st_size for p in tmp_path.glob("*.part")):
                    break
                await asyncio.sleep(0.01)
            seen = [p.name for p in tmp_path.iterdir() if p.stat().st_size > 0]
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            return seen

    seen = run(go())
    assert len(seen) == 1 and seen[0].endswith(".part"), "the download had started writing"

    assert list(tmp_path.iterdir()) == []


LEAK_CASES: dict[str, tuple[Callable[[Server], str], Settings, dict[str, Any]]] = {
    "loopback refused": (lambda s: f"{s.base}/file?{SECRET}", strict(), {}),
    "http error": (lambda s: f"{s.base}/status-403?{SECRET}", lenient(), {}),
    "read timeout": (lambda s: f"{s.base}/stall-headers?{SECRET}", lenient(download_read_timeout=0.3), {}),
    "size cap": (lambda s: f"{s.base}/big?{SECRET}", lenient(), {"max_bytes": 10}),
    "not an image": (lambda s: f"{s.base}/text.png?{SECRET}", lenient(), {"expect": "image"}),
    "cut short": (lambda s: f"{s.base}/short?{SECRET}", lenient(), {}),
    "too many redirects": (lambda s: f"{s.base}/chain-6?{SECRET}", lenient(), {}),
    "redirect refused": (
        lambda s: f"{s.base}/redirect?to=ftp://x.example/a%3F{SECRET}&{SECRET}",
        lenient(),
        {},
    ),
    "connection refused": (lambda s: f"http://127.0.0.1:9/x?{SECRET}", lenient(), {}),
}


@pytest.mark.parametrize("case", LEAK_CASES)
def test_errors_and_logs_never_contain_the_query(tmp_path: Path, caplog: pytest.LogCaptureFixture, case: str) -> None:
    make_url, settings, kwargs = LEAK_CASES[case]
    secret_value = SECRET.split("=", 1)[1]
    with caplog.at_level(logging.DEBUG, logger="services.ingest.fetch"):
        error = fetch_error(make_url, settings, tmp_path, **kwargs)
    text = "".join(traceback.format_exception(error))
    assert secret_value not in text
    assert secret_value not in caplog.text
    assert "could not download" in str(error) or str(error).startswith("url ")


def test_success_log_has_no_query(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def go() -> None:
        async with serve() as server:
            await download(f"{server.base}/chain-2?{SECRET}", tmp_path / "f", lenient())

    with caplog.at_level(logging.DEBUG, logger="services.ingest.fetch"):
        run(go())
    assert "downloaded http://127.0.0.1:" in caplog.text
    assert SECRET.split("=", 1)[1] not in caplog.text
