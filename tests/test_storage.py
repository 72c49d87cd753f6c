"""Shared storage semantics, run against both backends (local files and S3 over HTTP)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest

from config.settings import Settings, build_settings
from services.errors import ObjectNotFound
from services.storage import Storage
from services.storage.keys import validate_key
from tests.conftest import run_with_storage, s3_client


def test_put_get_head_exists(any_settings: Settings) -> None:
    async def scenario(storage: Storage) -> None:
        info = await storage.put_bytes("a/b/hello.txt", b"hello", content_type="text/plain")
        assert info.size == 5
        assert info.sha256 == hashlib.sha256(b"hello").hexdigest()
        assert await storage.get_bytes("a/b/hello.txt") == b"hello"
        head = await storage.head("a/b/hello.txt")
        assert head is not None
        assert head.size == 5
        assert head.sha256 == info.sha256
        assert head.content_type == "text/plain"
        assert await storage.head("a/b/missing.txt") is None
        with pytest.raises(ObjectNotFound):
            await storage.get_bytes("a/b/missing.txt")

    run_with_storage(any_settings, scenario)


def test_put_file_and_stream_multipart(any_settings: Settings, tmp_path: Path) -> None:
    """Objects over the threshold go multipart on S3; the bytes and sha256 come back exact."""
    settings = any_settings.model_copy(
        update={"multipart_threshold": 5 * 1024 * 1024, "multipart_chunk_size": 5 * 1024 * 1024}
    )
    payload = os.urandom(11 * 1024 * 1024 + 123)
    source = tmp_path / "big.bin"
    source.write_bytes(payload)

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(payload), 1024 * 1024):
            yield payload[start : start + 1024 * 1024]

    async def scenario(storage: Storage) -> None:
        digest = hashlib.sha256(payload).hexdigest()
        from_file = await storage.put_file("big/file.bin", source)
        from_stream = await storage.put_stream("big/stream.bin", chunks())
        from_bytes = await storage.put_bytes("big/bytes.bin", payload)
        for info in (from_file, from_stream, from_bytes):
            assert info.size == len(payload)
            head = await storage.head(info.key)
            assert head is not None
            assert head.sha256 == digest
            assert await storage.get_bytes(info.key) == payload
        target = tmp_path / "down.bin"
        assert await storage.download_file("big/stream.bin", target) == len(payload)
        assert target.read_bytes() == payload

    run_with_storage(settings, scenario)


def test_list_is_paginated_and_prefixed(any_settings: Settings) -> None:
    async def scenario(storage: Storage) -> None:
        for i in range(7):
            await storage.put_bytes(f"list/p/{i:02d}.txt", b"x" * i)
        await storage.put_bytes("list/other.txt", b"o")
        page = await storage.list_page("list/p/", page_size=3)
        assert [o.key for o in page.objects] == ["list/p/00.txt", "list/p/01.txt", "list/p/02.txt"]
        assert page.next_token is not None
        every = await storage.list_all("list/p/")
        assert [o.key for o in every] == [f"list/p/{i:02d}.txt" for i in range(7)]
        assert [o.size for o in every] == list(range(7))
        assert len(await storage.list_all("list/")) == 8
        assert await storage.list_all("nothing-here/") == []

    run_with_storage(any_settings, scenario)


def test_delete_many_and_copy(any_settings: Settings) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.put_bytes("d/one", b"1", content_type="text/plain")
        await storage.put_bytes("d/two", b"2")
        copied = await storage.copy("d/one", "d/one-copy")
        assert copied.sha256 == hashlib.sha256(b"1").hexdigest()
        assert await storage.get_bytes("d/one-copy") == b"1"
        result = await storage.delete_many(["d/one", "d/two", "d/never-existed"])
        assert sorted(result.deleted) == ["d/never-existed", "d/one", "d/two"]
        assert result.errors == []
        assert [o.key for o in await storage.list_all("d/")] == ["d/one-copy"]
        with pytest.raises(ObjectNotFound):
            await storage.copy("d/one", "d/again")

    run_with_storage(any_settings, scenario)


def test_invalid_keys_are_refused_the_same_way(any_settings: Settings) -> None:
    async def scenario(storage: Storage) -> None:
        for key in ("/abs", "a/../b", "a//b", "a\\b", "", "a/\x01", "a/x\u202egnp.exe", "a/\ud800", "a/b\u2029"):
            with pytest.raises(ValueError, match="key"):
                await storage.put_bytes(key, b"x")
        # A trailing '/' names a folder (an S3 console marker, a directory on disk): a file on neither.
        await storage.put_bytes("folder/inside.txt", b"x")
        for key in ("folder/", "empty/"):
            with pytest.raises(ValueError, match="must not end with '/'"):
                await storage.put_bytes(key, b"x")
            with pytest.raises(ValueError, match="must not end with '/'"):
                await storage.head(key)
            with pytest.raises(ValueError, match="must not end with '/'"):
                await storage.get_bytes(key)
        assert [o.key for o in await storage.list_all("folder/")] == ["folder/inside.txt"]

    run_with_storage(any_settings, scenario)
    assert validate_key("datasets/x/y.png") == "datasets/x/y.png"


def test_presigned_get_and_put(s3_settings: Settings) -> None:
    """Presigned URLs work over plain HTTP, carry the configured expiry, and use SigV4."""

    async def scenario(storage: Storage) -> None:
        await storage.put_bytes("p/read.txt", b"read me")
        url = await storage.presign_get("p/read.txt", expires_in=120)
        query = parse_qs(urlparse(url).query)
        assert query["X-Amz-Expires"] == ["120"]
        assert query["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"]
        with urllib.request.urlopen(url) as response:  # noqa: S310 - loopback moto
            assert response.read() == b"read me"
        upload = await storage.presign_put("p/written.bin", content_type="application/octet-stream")
        assert upload.method == "PUT"
        assert upload.expires_in == s3_settings.presign_expires
        request = urllib.request.Request(upload.url, data=b"sent directly", method="PUT", headers=upload.headers)  # noqa: S310
        with urllib.request.urlopen(request) as response:  # noqa: S310
            assert response.status == 200
        assert await storage.get_bytes("p/written.bin") == b"sent directly"

    run_with_storage(s3_settings, scenario)


def test_local_presign_is_file_url_and_writes_are_atomic(local_settings: Settings) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.put_bytes("p/x.txt", b"x")
        url = await storage.presign_get("p/x.txt")
        assert url.startswith("file://")
        assert Path(urlparse(url).path).read_bytes() == b"x"
        root = local_settings.storage_dir.resolve()
        assert list((root / ".tmp").iterdir()) == []  # no temp file left behind
        assert [o.key for o in await storage.list_all()] == ["p/x.txt"]  # internals not listed

    run_with_storage(local_settings, scenario)


def test_s3_client_config_follows_settings(s3_settings: Settings) -> None:
    from services.storage.s3 import build_client_config

    config = build_client_config(s3_settings.model_copy(update={"upload_concurrency": 40, "s3_max_attempts": 7}))
    assert config.retries == {"mode": "standard", "total_max_attempts": 7}
    assert config.max_pool_connections == 80
    assert config.request_checksum_calculation == "when_required"
    assert config.response_checksum_validation == "when_required"
    assert config.signature_version == "s3v4"


def test_sha256_checksum_is_stored_on_s3(s3_settings: Settings, moto_server: str) -> None:
    async def scenario(storage: Storage) -> None:
        await storage.put_bytes("c/file.bin", b"checksummed")

    run_with_storage(s3_settings, scenario)
    head = s3_client(moto_server).head_object(Bucket=s3_settings.s3_bucket, Key="c/file.bin", ChecksumMode="ENABLED")
    assert head["Metadata"]["sha256"] == hashlib.sha256(b"checksummed").hexdigest()
    assert "ChecksumSHA256" in head


def test_runpod_bucket_aliases(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("S3_BUCKET", "b")
    monkeypatch.setenv("BUCKET_ENDPOINT_URL", "https://example.r2.cloudflarestorage.com")
    monkeypatch.setenv("BUCKET_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("BUCKET_SECRET_ACCESS_KEY", "s3cr3t-VALUE")
    settings = build_settings()
    assert settings.backend == "s3"
    assert settings.s3_endpoint_url == "https://example.r2.cloudflarestorage.com"
    assert settings.aws_secret_access_key is not None
    assert settings.aws_secret_access_key.get_secret_value() == "s3cr3t-VALUE"
    assert "s3cr3t-VALUE" not in repr(settings)


# --- local backend: bytes and sha256 commit as a pair; listing linear in the page (issue 11) ---


def test_local_concurrent_writes_never_leave_a_stale_sha256(local_settings: Settings) -> None:
    """Two writers of one key, 300 times: the sha256 that head reports is always that of the bytes.

    Same-size payloads, so size alone cannot tell the writers apart (the old check compared
    size and mtime and was fooled in 58 of 300 runs).
    """

    async def scenario(storage: Storage) -> list[int]:
        wrong = []
        for run in range(300):
            first, second = os.urandom(64), os.urandom(64)
            await asyncio.gather(storage.put_bytes("race/k.bin", first), storage.put_bytes("race/k.bin", second))
            info = await storage.head("race/k.bin")
            data = await storage.get_bytes("race/k.bin")
            assert info is not None and data in (first, second)
            if info.sha256 != hashlib.sha256(data).hexdigest():
                wrong.append(run)
        return wrong

    assert run_with_storage(local_settings, scenario) == []


def test_local_listing_stats_only_the_page(local_settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """A page of 10 from a 2,000-file dataset stats about 10 files, whichever page it is."""
    folder = local_settings.storage_dir / "datasets" / "big"
    folder.mkdir(parents=True)
    for i in range(2000):
        (folder / f"f{i:05d}.bin").write_bytes(b"x")
    (folder.parent / "big-other").mkdir()
    (folder.parent / "big-other" / "a.bin").write_bytes(b"y")  # sorts after "big/": not listed
    stats = []
    real_stat = os.stat

    def counting_stat(path: Any, *args: Any, **kwargs: Any) -> os.stat_result:
        stats.append(str(path))
        return real_stat(path, *args, **kwargs)

    async def scenario(storage: Storage) -> list[tuple[list[str], str | None, int]]:
        monkeypatch.setattr(os, "stat", counting_stat)
        pages = []
        for token in (None, "datasets/big/f00999.bin", "datasets/big/f01994.bin"):
            stats.clear()
            page = await storage.list_page("datasets/big/", page_size=10, token=token)
            pages.append(([o.key.rsplit("/", 1)[1] for o in page.objects], page.next_token, len(stats)))
        return pages

    first, middle, last = run_with_storage(local_settings, scenario)
    assert first[0] == [f"f{i:05d}.bin" for i in range(10)] and first[1] == "datasets/big/f00009.bin"
    assert middle[0] == [f"f{i:05d}.bin" for i in range(1000, 1010)]
    assert last[0] == [f"f{i:05d}.bin" for i in range(1995, 2000)] and last[1] is None
    assert all(count <= 10 + 3 for _, _, count in (first, middle, last))


def test_local_listing_is_in_s3_key_order(any_settings: Settings) -> None:
    """Folders sort as "<name>/": the same order on both backends, across pages."""
    keys = ["p/a.png", "p/a-b.png", "p/a/x.png", "p/a0.png", "p/a.b/y.png", "p/b", "p/\u00e9.png", "p/a/z/w.png"]

    async def scenario(storage: Storage) -> tuple[list[str], list[str]]:
        for key in keys:
            await storage.put_bytes(key, b"x")
        paged = []
        token = None
        while True:
            page = await storage.list_page("p/", page_size=3, token=token)
            paged += [o.key for o in page.objects]
            if (token := page.next_token) is None:
                return paged, [o.key for o in await storage.list_all("p/a")]

    paged, prefixed = run_with_storage(any_settings, scenario)
    assert paged == sorted(keys, key=lambda k: k.encode())
    assert prefixed == sorted((k for k in keys if k.startswith("p/a")), key=lambda k: k.encode())
