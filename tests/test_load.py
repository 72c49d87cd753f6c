"""Load and cancellation through ``rp_handler.handler`` against S3 (moto).

* 20 upload jobs of 50 files at once on one event loop: every file lands exactly once with
  the right bytes, and the memory the run takes above its inputs is bounded by the upload
  concurrency (the worker-wide ``batch_upload.upload_slots``), not by the number of jobs.
* A job cancelled in the middle of its batch (RunPod's per-job stop cancels the handler's
  task) leaves no workspace and no open multipart upload, everything in the bucket is
  whole, and a rerun completes the batch.

The memory test runs moto in a separate process: moto keeps every object in memory, and
in this process tracemalloc would count the bucket as the worker's.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import hashlib
import random
import subprocess
import sys
import threading
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from config.settings import build_settings
from tests.conftest import TEST_SECRET, run_jobs, s3_client, use_settings_env
from tests.faultproxy import FaultProxy, Faults, free_port
from tests.procwatch import OutputWatcher

FILES_PER_JOB = 50


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def moto_process() -> Iterator[str]:
    """moto's S3 server in its own process (its memory stays out of tracemalloc's count)."""
    port = free_port()
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output = OutputWatcher(process)
        output.wait_for("Running on", timeout=60)  # werkzeug's line once it listens
        output.discard()  # its request log is read and dropped: no memory counted here
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(10)


def _use_s3(monkeypatch: pytest.MonkeyPatch, endpoint: str, bucket: str, tmp_path: Path, **extra: Any) -> None:
    """Point the handler's settings at ``bucket``; ``extra`` are more variables to set."""
    settings = build_settings(
        s3_bucket=bucket,
        s3_endpoint_url=endpoint,
        s3_region="us-east-1",
        aws_access_key_id="testing-key-id",
        aws_secret_access_key=TEST_SECRET,
        storage_dir=tmp_path / "unused-storage",
    )
    use_settings_env(monkeypatch, settings)
    monkeypatch.setenv("WORK_DIR", str(tmp_path / "work"))
    for name, value in extra.items():
        monkeypatch.setenv(name, str(value))


def _upload_jobs(tag: str, jobs: int, seed: int) -> tuple[list[dict[str, Any]], dict[str, tuple[str, str]]]:
    """``jobs`` upload jobs of 50 files of 8-32 KiB; returns them and key -> (sha256, md5) expected."""
    rng = random.Random(seed)
    built: list[dict[str, Any]] = []
    expected: dict[str, tuple[str, str]] = {}
    for j in range(jobs):
        files = []
        for i in range(FILES_PER_JOB):
            data = rng.randbytes(rng.randint(8 * 1024, 32 * 1024))
            files.append({"name": f"{i:02d}.bin", "data": b64(data)})
            digests = (hashlib.sha256(data).hexdigest(), hashlib.md5(data, usedforsecurity=False).hexdigest())
            expected[f"datasets/{tag}-{j}/{i:02d}.bin"] = digests
        built.append(
            {"id": f"{tag}-{j}", "input": {"action": "upload_training_files", "dataset": f"{tag}-{j}", "files": files}}
        )
    return built, expected


def _bucket_hashes(endpoint: str, bucket: str, prefix: str) -> dict[str, str]:
    """key -> sha256 of the bytes actually stored (read back over HTTP)."""
    client = s3_client(endpoint)
    keys = [
        obj["Key"]
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        for obj in page.get("Contents", [])
    ]

    def digest(key: str) -> str:
        return hashlib.sha256(client.get_object(Bucket=bucket, Key=key)["Body"].read()).hexdigest()

    with ThreadPoolExecutor(8) as pool:
        hashes = dict(zip(keys, pool.map(digest, keys), strict=True))
    assert len(hashes) == len(keys), "a key was listed twice"
    return hashes


def test_twenty_upload_jobs_at_once(moto_process: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rp_handler import handler
    from services.storage import close_storages

    bucket = "load-test"
    s3_client(moto_process).create_bucket(Bucket=bucket)
    _use_s3(monkeypatch, moto_process, bucket, tmp_path)
    loop = asyncio.new_event_loop()

    async def gather(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(handler(job) for job in jobs)))

    def run(jobs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return loop.run_until_complete(gather(jobs))

    def measure(tag: str, count: int) -> tuple[int, list[dict[str, Any]], dict[str, tuple[str, str]]]:
        jobs, expected = _upload_jobs(tag, count, seed=count)
        gc.collect()
        baseline = tracemalloc.get_traced_memory()[0]  # the inputs are in memory already
        tracemalloc.reset_peak()
        results = run(jobs)
        peak = tracemalloc.get_traced_memory()[1] - baseline
        return peak, results, expected

    tracemalloc.start()
    try:
        warm_up, _ = _upload_jobs("warm", 1, seed=0)
        [warm] = run(warm_up)  # opens the shared client: its one-off cost is not the batch's
        assert "error" not in warm
        peak_5, results_5, _ = measure("five", 5)
        peak_20, results_20, expected = measure("twenty", 20)
    finally:
        tracemalloc.stop()
        loop.run_until_complete(close_storages())
        loop.close()

    for result in results_5 + results_20:
        assert "error" not in result, result.get("error")
        assert len(result["uploaded"]) == FILES_PER_JOB
        assert result["skipped"] == result["failed"] == []
    reported = {u["key"]: u["sha256"] for r in results_20 for u in r["uploaded"]}
    assert reported == {key: sha256 for key, (sha256, _) in expected.items()}

    # The listing's ETag of a single-part object is the MD5 of the bytes the server stored:
    # one LIST checks all 1000 objects; a sample is read back and hashed with sha256 as well.
    client = s3_client(moto_process)
    listed = [
        obj
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="datasets/twenty-")
        for obj in page.get("Contents", [])
    ]
    assert len(listed) == 20 * FILES_PER_JOB
    assert {o["Key"]: o["ETag"].strip('"') for o in listed} == {k: md5 for k, (_, md5) in expected.items()}
    for key in random.Random(1).sample(sorted(expected), 40):
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        assert hashlib.sha256(body).hexdigest() == expected[key][0]
    assert list((tmp_path / "work").iterdir()) == []

    # What grows from 5 to 20 jobs is bookkeeping (the validated request and the report entry,
    # about 2 KB a file), never the files: 750 more files of 20 KiB on average held at once
    # would add 15 MiB. Decoded files in flight are bounded by UPLOAD_CONCURRENCY.
    growth_per_file = (peak_20 - peak_5) / (15 * FILES_PER_JOB)
    sizes = f"peak above inputs: 5 jobs {peak_5 / 2**20:.2f} MiB, 20 jobs {peak_20 / 2**20:.2f} MiB"
    assert growth_per_file < 5 * 1024, sizes
    assert peak_20 < 2.5 * peak_5, sizes


class WatchingProxy(FaultProxy):
    """A FaultProxy that flags when it takes on a CreateMultipartUpload request (counted in
    flight, before forwarding it: :meth:`quiesce` then waits for its delivery)."""

    def __init__(self, upstream: str, faults: Faults) -> None:
        super().__init__(upstream, faults)
        self.create_seen = threading.Event()

    def _decide(self, method: str, path_qs: str) -> str:
        decision = super()._decide(method, path_qs)
        query = parse_qs(urlsplit(path_qs).query, keep_blank_values=True)
        if method == "POST" and "uploads" in query and decision == "forward":
            self.create_seen.set()
        return decision


async def _cancel_when(job: dict[str, Any], ready: Callable[[], object]) -> None:
    """Run ``job`` through the handler and cancel it once ``ready()`` (blocking: it waits on
    the proxy's count or event) returns; the job must end cancelled."""
    from rp_handler import handler
    from services.storage import close_storages

    task = asyncio.create_task(handler(job))
    waiter = asyncio.ensure_future(asyncio.to_thread(ready))
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
        assert not task.done(), f"the job ended before it could be cancelled: {task.result()}"
        await waiter
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task  # nothing reported: RunPod gets no result from a cancelled job
    finally:
        await asyncio.gather(waiter, return_exceptions=True)
        await close_storages()


def _upload_job(dataset: str, payloads: dict[str, bytes]) -> dict[str, Any]:
    files = [{"name": name, "data": b64(data)} for name, data in sorted(payloads.items())]
    return {"id": f"cancel-{dataset}", "input": {"action": "upload_training_files", "dataset": dataset, "files": files}}


def test_cancelled_job_leaves_a_clean_bucket_and_a_rerun_completes(
    moto_server: str, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rng = random.Random(40)
    payloads = {f"{i:02d}.bin": rng.randbytes(16 * 1024) for i in range(40)}
    expected = {f"datasets/cancel/{name}": hashlib.sha256(data).hexdigest() for name, data in payloads.items()}
    job = _upload_job("cancel", payloads)

    with FaultProxy(moto_server, Faults(latency=0.1)) as proxy:
        _use_s3(monkeypatch, moto_server, bucket, tmp_path, S3_ENDPOINT_URL=proxy.url)
        # The LIST and a first wave of PUTs have reached the proxy: the cancel lands mid-batch.
        asyncio.run(_cancel_when(job, lambda: proxy.wait_forwarded(8)))
        assert list((tmp_path / "work").iterdir()) == [], "the job workspace was left behind"

        proxy.quiesce()  # what was on its way has landed; nothing more gets through
        settled = _bucket_hashes(moto_server, bucket, "datasets/cancel/")
        assert len(settled) < len(expected), "nothing was left to do after the cancel"
        for key, digest in settled.items():
            assert digest == expected[key], f"{key} holds bytes that were not sent"

        proxy.faults.latency = 0.0
        proxy.faults.down = False
        [rerun] = run_jobs(job)
    assert "error" not in rerun, rerun.get("error")
    assert rerun["failed"] == []
    assert len(rerun["uploaded"]) + len(rerun["skipped"]) == len(expected)
    assert {s["key"] for s in rerun["skipped"]} == set(settled)
    assert _bucket_hashes(moto_server, bucket, "datasets/cancel/") == expected


def test_cancel_while_a_multipart_upload_is_being_created_leaves_none_open(
    moto_server: str, bucket: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    payloads = {"big.bin": random.Random(41).randbytes(6 * 1024 * 1024)}  # two parts of 5 MiB
    job = _upload_job("create", payloads)
    with WatchingProxy(moto_server, Faults(latency=0.1)) as proxy:
        _use_s3(
            monkeypatch,
            moto_server,
            bucket,
            tmp_path,
            S3_ENDPOINT_URL=proxy.url,
            MULTIPART_THRESHOLD=5 * 1024 * 1024,
            MULTIPART_CHUNK_SIZE=5 * 1024 * 1024,
        )
        asyncio.run(_cancel_when(job, lambda: proxy.create_seen.wait(60)))  # the create is still on its way
        proxy.quiesce()  # the proxy delivered it: the server now holds the upload, unless aborted
    assert list((tmp_path / "work").iterdir()) == []
    assert s3_client(moto_server).list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
