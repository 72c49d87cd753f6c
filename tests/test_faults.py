"""Fault suite: flaky storage, a full outage, and cancelled jobs lose nothing and leave nothing.

A :class:`~tests.faultproxy.FaultProxy` sits between ``RealStorageService`` and moto where
the network matters; what was stored is always checked straight against moto (direct boto3
client) by hashing the bytes read back. Cancellation is made deterministic by holding a
multipart upload open at a known point (after its first part) instead of racing a timer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import random
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pybreaker
import pytest

import services.storage.s3 as s3_module
from config.settings import Settings, build_settings
from services.errors import StorageUnavailable
from services.ingest.batch_upload import upload_batch
from services.storage import LocalStorageService, Storage
from services.storage.breaker import S3Breaker
from tests.conftest import TEST_KEY_ID, TEST_SECRET, run_with_storage, s3_client
from tests.fakeclock import FakeClock
from tests.faultproxy import FaultProxy, Faults, StalledServer

MIB = 1024 * 1024
MULTIPART = {"multipart_threshold": 5 * MIB, "multipart_chunk_size": 5 * MIB}


async def upload_report(storage: Storage, files: list[dict[str, str]], dataset: str) -> dict[str, Any]:
    """The batch upload with this storage's UPLOAD_CONCURRENCY, as the job reports it."""
    concurrency = storage.settings.upload_concurrency  # type: ignore[attr-defined]
    return (await upload_batch(storage, files, dataset, concurrency=concurrency)).model_dump()


def make_files(count: int, sizes: tuple[int, int], seed: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    return {f"img_{i:03d}.bin": rng.randbytes(rng.randint(*sizes)) for i in range(count)}


def inline(files: dict[str, bytes]) -> list[dict[str, str]]:
    return [{"name": name, "data": base64.b64encode(data).decode()} for name, data in files.items()]


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def stored(endpoint: str, bucket: str, prefix: str) -> dict[str, bytes]:
    """Every object under ``prefix`` as moto holds it (name -> bytes), read directly."""
    client = s3_client(endpoint)
    found: dict[str, bytes] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
            found[obj["Key"].removeprefix(prefix)] = body
    return found


def open_uploads(endpoint: str, bucket: str) -> list[str]:
    """Keys of multipart uploads moto still holds open."""
    return [u["Key"] for u in s3_client(endpoint).list_multipart_uploads(Bucket=bucket).get("Uploads", [])]


def assert_exact(found: dict[str, bytes], files: dict[str, bytes]) -> None:
    """Every file there once, byte for byte (compared by sha256 to keep failures short)."""
    assert sorted(found) == sorted(files)
    assert {name: sha(body) for name, body in found.items()} == {name: sha(data) for name, data in files.items()}


# --- flaky storage ----------------------------------------------------------------------------


def test_flaky_storage_batch_loses_and_duplicates_nothing(s3_settings: Settings, moto_server: str, bucket: str) -> None:
    """25 ms latency, 10 % 503 SlowDown, 5 % connection resets, default settings: nothing lost.

    botocore's retries (S3_MAX_ATTEMPTS=3) absorb almost all of it; the few requests that fail
    three times in a row (about 0.11**3 each) get the batch's own per-file retries. The breaker
    does not trip: a success resets its count of consecutive failures.
    """
    files = make_files(200, (1024, 4096), seed=1)
    faults = Faults(latency=0.025, error_rate=0.10, reset_rate=0.05)
    with FaultProxy(moto_server, faults, seed=7) as proxy:
        settings = s3_settings.model_copy(update={"s3_endpoint_url": proxy.url})  # default S3_MAX_ATTEMPTS

        async def scenario(storage: Storage) -> tuple[dict[str, Any], str]:
            report = await upload_report(storage, inline(files), "flaky")
            return report, storage.breaker.state  # type: ignore[attr-defined]

        report, breaker_state = run_with_storage(settings, scenario)
        injected = (proxy.injected_errors, proxy.injected_resets)
    assert injected[0] >= 5
    assert injected[1] >= 3  # the faults really happened
    assert report["failed"] == []
    assert report["skipped"] == []
    names = [u["name"] for u in report["uploaded"]]
    assert sorted(names) == sorted(files)  # each file reported once
    assert {u["name"]: u["sha256"] for u in report["uploaded"]} == {n: sha(d) for n, d in files.items()}
    assert_exact(stored(moto_server, bucket, "datasets/flaky/"), files)
    direct = s3_client(moto_server)
    head = direct.head_object(Bucket=bucket, Key="datasets/flaky/img_000.bin")
    assert head["Metadata"]["sha256"] == sha(files["img_000.bin"])
    assert breaker_state == pybreaker.STATE_CLOSED


# --- outage -----------------------------------------------------------------------------------


def test_outage_opens_breaker_fails_fast_without_io_and_recovers(s3_settings: Settings, moto_server: str) -> None:
    """Down: open after S3_BREAKER_FAIL_MAX failures; then no request leaves; back: closes.

    The breaker runs on a fake clock: the reset timeout passes when the test says so.
    """
    faults = Faults(down=True)
    files = make_files(20, (512, 1024), seed=2)
    with FaultProxy(moto_server, faults) as proxy:
        settings = s3_settings.model_copy(
            update={"s3_endpoint_url": proxy.url, "s3_max_attempts": 1, "s3_breaker_reset_timeout": 1.5}
        )
        fail_max = settings.s3_breaker_fail_max

        async def scenario(storage: Storage) -> dict[str, Any]:
            clock = FakeClock()
            breaker = storage.breaker = S3Breaker(fail_max, settings.s3_breaker_reset_timeout, clock=clock)  # type: ignore[attr-defined]
            for attempt in range(1, fail_max + 1):
                assert breaker.state == pybreaker.STATE_CLOSED
                with pytest.raises(StorageUnavailable):
                    await storage.head(f"probe/{attempt}")
            assert breaker.state == pybreaker.STATE_OPEN
            # aiohttp resends an idempotent request once when the connection drops, so the
            # proxy saw fail_max to 2 x fail_max requests for fail_max failed operations.
            seen = proxy.requests
            assert fail_max <= seen <= 2 * fail_max

            calls: list[Callable[[], Awaitable[object]]] = [
                lambda: storage.head("k"),
                lambda: storage.put_bytes("k", b"x"),
                lambda: storage.get_bytes("k"),
                lambda: storage.list_page("datasets/"),
            ]
            for i in range(20):
                with pytest.raises(StorageUnavailable, match=r"circuit open, retry in \d+ s"):
                    await calls[i % len(calls)]()
            batch = await upload_report(storage, inline(files), "outage")
            assert proxy.requests == seen  # nothing reached the network while open
            assert batch["uploaded"] == []
            assert len(batch["failed"]) == len(files)
            assert all("circuit open" in f["error"] for f in batch["failed"])

            faults.down = False
            clock.advance(settings.s3_breaker_reset_timeout)
            assert await storage.head("probe/after") is None  # the half-open trial: a 404 is healthy
            assert breaker.state == pybreaker.STATE_CLOSED
            assert proxy.requests == seen + 1
            return await upload_report(storage, inline(files), "outage")

        rerun = run_with_storage(settings, scenario)
    assert rerun["failed"] == []
    assert len(rerun["uploaded"]) == len(files)
    assert_exact(stored(moto_server, settings.s3_bucket or "", "datasets/outage/"), files)


# --- a store that accepts connections and never answers (issue 11, finding 3) ----------------


def _stalled_settings(url: str, tmp_path: Path, **overrides: Any) -> Settings:
    """Default settings except where the store is (and what a test overrides)."""
    return build_settings(
        s3_bucket="stalled",
        s3_endpoint_url=url,
        s3_region="us-east-1",
        aws_access_key_id=TEST_KEY_ID,
        aws_secret_access_key=TEST_SECRET,
        storage_dir=tmp_path / "unused",
        **overrides,
    )


def test_stalled_store_fails_a_small_upload_within_the_operation_deadline(tmp_path: Path) -> None:
    """Defaults: the listing that starts the batch runs out of S3_OPERATION_TIMEOUT, and the
    batch then sends nothing (no per-file HEAD/PUT retries against a dead store).

    Told, not timed: the store counts the connections it accepted. One connection, one failure
    counted by the breaker and an error naming the deadline's value mean the batch spent one
    operation deadline; the old code (retries per file and per call, 730 s) opened more."""
    files = make_files(1, (77, 77), seed=5)
    with StalledServer() as store:
        settings = _stalled_settings(store.url, tmp_path)

        async def scenario(storage: Storage) -> tuple[dict[str, Any], int]:
            async with asyncio.timeout(10 * settings.s3_operation_timeout):  # a hang guard only
                report = await upload_report(storage, inline(files), "stalled")
            return report, storage.breaker.fail_counter  # type: ignore[attr-defined]

        report, failures = run_with_storage(settings, scenario)
        connections = store.connections
    assert settings.s3_operation_timeout < 30  # "well under a minute" by default
    assert report["uploaded"] == []
    [failed] = report["failed"]
    assert f"no answer within {settings.s3_operation_timeout:g} s (S3_OPERATION_TIMEOUT)" in failed["error"]
    assert "nothing was sent" in failed["error"]
    assert failures == 1  # the timeout counted toward the breaker
    assert connections == 1  # one request, then nothing: no retry ran past the deadline


def test_stalled_store_opens_the_breaker_then_jobs_fail_fast(tmp_path: Path) -> None:
    """Timeouts count: after S3_BREAKER_FAIL_MAX stalled calls the circuit opens and the next
    upload fails at once without opening a connection."""
    files = make_files(3, (64, 128), seed=6)
    with StalledServer() as store:
        settings = _stalled_settings(store.url, tmp_path, s3_operation_timeout=0.3)

        async def scenario(storage: Storage) -> tuple[list[dict[str, Any]], int, int]:
            reports = [
                await upload_report(storage, inline(files), f"s{i}") for i in range(settings.s3_breaker_fail_max)
            ]
            assert storage.breaker.state == pybreaker.STATE_OPEN  # type: ignore[attr-defined]
            seen = store.connections
            reports.append(await upload_report(storage, inline(files), "after"))
            return reports, seen, store.connections

        reports, seen, after = run_with_storage(settings, scenario)
    assert after == seen  # the open circuit sent nothing
    assert all(len(r["failed"]) == len(files) for r in reports)
    assert all("circuit open" in f["error"] for f in reports[-1]["failed"])


# --- cancellation -----------------------------------------------------------------------------


class HoldAfterFirstChunk:
    """Wraps a chunk source: chosen uploads stop after their first chunk until cancelled.

    Multipart sends the first part and then waits on the next chunk, so the upload is
    open on S3 at a known point and the cancel lands in the middle of it, every run.
    """

    def __init__(self, source: Callable[..., AsyncIterator[bytes]], let_through: int = 0) -> None:
        self.source = source
        self.let_through = let_through
        self.calls = 0
        self.held = 0
        self.holding = asyncio.Event()
        self.enabled = True

    def __call__(self, *args: Any) -> AsyncIterator[bytes]:
        self.calls += 1
        hold = self.enabled and self.calls > self.let_through
        return self._chunks(self.source(*args), hold)

    async def _chunks(self, chunks: AsyncIterable[bytes], hold: bool) -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield chunk
            if hold:
                self.held += 1
                self.holding.set()
                await asyncio.Event().wait()  # until cancelled


async def wait_for_open_upload(endpoint: str, bucket: str, at_least: int = 1) -> list[str]:
    """Poll moto until ``at_least`` multipart uploads are open (the first part went out)."""
    for _ in range(500):
        keys = await asyncio.to_thread(open_uploads, endpoint, bucket)
        if len(keys) >= at_least:
            return keys
        await asyncio.sleep(0.01)
    raise AssertionError(f"no {at_least} open multipart uploads after 5 s")


def test_cancelled_batch_aborts_multipart_and_rerun_completes(
    s3_settings: Settings, moto_server: str, bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """task.cancel() mid-batch (RunPod's per-job stop): no open upload, nothing half-written."""
    files = make_files(5, (6 * MIB, 6 * MIB), seed=3)  # over the 5 MiB threshold: two parts each
    settings = s3_settings.model_copy(update={**MULTIPART, "upload_concurrency": 3})
    hold = HoldAfterFirstChunk(s3_module.memory_chunks, let_through=1)
    monkeypatch.setattr(s3_module, "memory_chunks", hold)
    prefix = "datasets/cancel/"

    async def scenario(storage: Storage) -> tuple[list[str], dict[str, Any]]:
        job = asyncio.create_task(upload_report(storage, inline(files), "cancel"))
        await asyncio.wait_for(hold.holding.wait(), 30)
        open_before = await wait_for_open_upload(moto_server, bucket)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job
        assert await asyncio.to_thread(open_uploads, moto_server, bucket) == []
        hold.enabled = False
        partial = await asyncio.to_thread(stored, moto_server, bucket, prefix)
        assert len(partial) < len(files)
        for name, body in partial.items():  # what is there is whole
            assert sha(body) == sha(files[name])
        rerun = await upload_report(storage, inline(files), "cancel")
        return open_before, {"rerun": rerun, "before": sorted(partial)}

    open_before, result = run_with_storage(settings, scenario)
    assert open_before  # the cancel did land in the middle of a multipart upload
    assert hold.held >= 1
    assert open_uploads(moto_server, bucket) == []
    rerun = result["rerun"]
    assert rerun["failed"] == []
    assert sorted(s["name"] for s in rerun["skipped"]) == result["before"]
    assert sorted(u["name"] for u in rerun["uploaded"]) == sorted(set(files) - set(result["before"]))
    assert_exact(stored(moto_server, bucket, prefix), files)


def test_cancelled_put_file_and_put_stream_abort_multipart(
    s3_settings: Settings, moto_server: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    payload = random.Random(4).randbytes(12 * MIB)
    source = tmp_path / "big.bin"
    source.write_bytes(payload)
    hold = HoldAfterFirstChunk(s3_module.read_file_chunks)
    monkeypatch.setattr(s3_module, "read_file_chunks", hold)
    stream_holding = asyncio.Event()

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, 7 * MIB, MIB):  # past the threshold: multipart has started
            yield payload[start : start + MIB]
        stream_holding.set()
        await asyncio.Event().wait()  # a client that stalls; the job is then cancelled

    async def cancel_midway(storage: Storage, upload: Awaitable[object], holding: asyncio.Event, key: str) -> None:
        task = asyncio.ensure_future(upload)
        await asyncio.wait_for(holding.wait(), 30)
        assert key in await wait_for_open_upload(moto_server, bucket)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await asyncio.to_thread(open_uploads, moto_server, bucket) == []
        assert await storage.head(key) is None

    async def scenario(storage: Storage) -> None:
        await cancel_midway(storage, storage.put_file("big/file.bin", source), hold.holding, "big/file.bin")
        await cancel_midway(storage, storage.put_stream("big/stream.bin", stream()), stream_holding, "big/stream.bin")

    run_with_storage(s3_settings.model_copy(update=MULTIPART), scenario)
    assert s3_client(moto_server).list_objects_v2(Bucket=bucket).get("KeyCount") == 0


def test_cancelled_local_batch_and_stream_leave_no_temp_files(local_settings: Settings) -> None:
    """Local backend: a cancelled batch or stream leaves nothing in .tmp and no partial object."""
    files = make_files(40, (16 * 1024, 64 * 1024), seed=5)
    settings = local_settings.model_copy(update={"upload_concurrency": 4})
    tmp_dir = settings.storage_dir.resolve() / ".tmp"

    async def first_attempt(storage: Storage) -> None:
        assert isinstance(storage, LocalStorageService)
        original = storage.put_bytes
        done = asyncio.Event()
        count = 0

        async def counted(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            info = await original(*args, **kwargs)
            count += 1
            if count == 3:
                done.set()
            return info

        storage.put_bytes = counted  # type: ignore[method-assign]
        job = asyncio.create_task(upload_report(storage, inline(files), "local"))
        await asyncio.wait_for(done.wait(), 30)
        job.cancel()
        with pytest.raises(asyncio.CancelledError):
            await job

        writing = asyncio.Event()

        async def stream() -> AsyncIterator[bytes]:
            yield b"a" * 1024
            writing.set()
            await asyncio.Event().wait()

        task = asyncio.create_task(storage.put_stream("streams/cut.bin", stream()))
        await asyncio.wait_for(writing.wait(), 30)
        assert list(tmp_dir.iterdir())  # the temp file exists while the stream is open
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await storage.head("streams/cut.bin") is None

    # asyncio.run returns once the worker threads finished: a write in flight has landed or gone.
    run_with_storage(settings, first_attempt)
    assert list(tmp_dir.iterdir()) == []
    dataset = settings.storage_dir / "datasets" / "local"
    partial = {p.name: p.read_bytes() for p in dataset.iterdir()}
    assert 3 <= len(partial) < len(files)
    assert all(sha(body) == sha(files[name]) for name, body in partial.items())

    rerun = run_with_storage(settings, lambda s: upload_report(s, inline(files), "local"))
    assert rerun["failed"] == []
    assert sorted(s["name"] for s in rerun["skipped"]) == sorted(partial)
    assert_exact({p.name: p.read_bytes() for p in dataset.iterdir()}, files)
    assert list(tmp_dir.iterdir()) == []
