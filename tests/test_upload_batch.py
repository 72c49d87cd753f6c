"""``upload_training_files``: concurrent, validated, idempotent, exact per-file report."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import select
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest

from config.settings import Settings
from services.ingest.batch_upload import upload_batch
from services.ingest.fetch import download
from services.storage import Storage
from services.storage.keys import file_name_problem
from tests.conftest import run_with_storage, s3_client
from tests.faultproxy import FaultProxy, Faults


async def upload_report(storage: Storage, files: list[dict[str, str]], dataset: str) -> dict[str, Any]:
    """The batch upload with this storage's UPLOAD_CONCURRENCY, as the job reports it."""
    concurrency = storage.settings.upload_concurrency  # type: ignore[attr-defined]
    return (await upload_batch(storage, files, dataset, concurrency=concurrency)).model_dump()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def make_files(count: int, size: int = 512) -> list[dict[str, str]]:
    return [{"name": f"img_{i:03d}.png", "data": b64(os.urandom(size))} for i in range(count)]


def test_batch_uploads_every_file_with_sha256(any_settings: Settings) -> None:
    files = make_files(40)

    async def scenario(storage: Storage) -> dict:
        report = await upload_report(storage, files, "cats")
        for item in report["uploaded"]:
            head = await storage.head(item["key"])
            assert head is not None
            assert head.sha256 == item["sha256"]
            original = next(f for f in files if f["name"] == item["name"])
            assert await storage.get_bytes(item["key"]) == base64.b64decode(original["data"])
        return report

    report = run_with_storage(any_settings, scenario)
    assert report["dataset"] == "cats"
    assert report["prefix"] == "datasets/cats/"
    assert len(report["uploaded"]) == 40
    assert report["skipped"] == []
    assert report["failed"] == []
    assert {u["key"] for u in report["uploaded"]} == {f"datasets/cats/{f['name']}" for f in files}
    first = next(u for u in report["uploaded"] if u["name"] == "img_000.png")
    assert first["sha256"] == hashlib.sha256(base64.b64decode(files[0]["data"])).hexdigest()
    assert first["size"] == 512


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("a/b.png", "path separators are not allowed"),
        ("a\\b.png", "path separators are not allowed"),
        ("..", "'..' is not allowed"),
        ("x..png", "'..' is not allowed"),
        ("bad\x07.png", "must not contain control characters (U+0007)"),
        ("x\u202egnp.exe", "must not contain invisible or format characters (U+202E)"),
        ("a\u2028b.png", "must not contain invisible or format characters (U+2028)"),
        ("zw\u200bj.png", "must not contain invisible or format characters (U+200B)"),
        ("s\ud800.png", "must not contain lone surrogate characters (U+D800)"),
        ("é" * 128 + ".png", "longer than 255 bytes"),
        ("", "must not be empty"),
    ],
)
def test_bad_names_are_refused_not_rewritten(name: str, reason: str) -> None:
    assert file_name_problem(name) == reason


def test_bad_files_fail_alone_and_every_file_is_reported_once(any_settings: Settings) -> None:
    files = [
        {"name": "good.png", "data": b64(b"good")},
        {"name": "sub/dir.png", "data": b64(b"x")},
        {"name": "notbase64.png", "data": "@@@not-base64@@@"},
        {"name": "good.png", "data": b64(b"dup")},
        {"name": "both.png", "data": b64(b"x"), "url": "https://example.com/x.png"},
        {"name": "neither.png"},
        {"name": "extra.png", "data": b64(b"x"), "colour": "red"},
        {"data": b64(b"no name")},
        "not an object",
        {"name": "also-good.txt", "data": b64(b"a caption")},
    ]

    report = run_with_storage(any_settings, lambda s: upload_report(s, files, "mixed"))
    assert [u["name"] for u in sorted(report["uploaded"], key=lambda u: u["name"])] == ["also-good.txt", "good.png"]
    failed = {f["error"].split(":")[0]: f for f in report["failed"]}
    assert len(report["failed"]) == 8
    assert failed["files[1].name"]["error"] == "files[1].name: path separators are not allowed"
    assert "not valid base64" in failed["files[2]"]["error"]
    assert "duplicate" in failed["files[3].name"]["error"]
    assert "exactly one of 'data' and 'url'" in failed["files[4]"]["error"]
    assert "exactly one of 'data' and 'url'" in failed["files[5]"]["error"]
    assert "Extra inputs are not permitted" in failed["files[6].colour"]["error"]
    assert "Field required" in failed["files[7].name"]["error"]
    assert "files[8]" in failed


def test_rerun_skips_what_is_already_there(any_settings: Settings) -> None:
    files = make_files(10)

    async def scenario(storage: Storage) -> tuple[dict, dict]:
        first = await upload_report(storage, files[:6], "again")
        changed = [*files[:5], {"name": files[5]["name"], "data": b64(b"changed")}, *files[6:]]
        second = await upload_report(storage, changed, "again")
        return first, second

    first, second = run_with_storage(any_settings, scenario)
    assert len(first["uploaded"]) == 6
    assert sorted(s["name"] for s in second["skipped"]) == [f["name"] for f in files[:5]]
    assert all(s["reason"] == "already stored with the same sha256" for s in second["skipped"])
    assert sorted(u["name"] for u in second["uploaded"]) == [f["name"] for f in files[5:]]


def test_storage_stopped_mid_batch_split_is_exact_and_rerun_completes(s3_settings: Settings, moto_server: str) -> None:
    """The proxy dies after 25 requests: what is reported uploaded is there byte for byte."""
    files = make_files(60, size=2048)
    expected = {f["name"]: base64.b64decode(f["data"]) for f in files}
    faults = Faults(fail_after=25)
    with FaultProxy(moto_server, faults) as proxy:
        settings = s3_settings.model_copy(update={"s3_endpoint_url": proxy.url, "upload_concurrency": 8})
        report = run_with_storage(settings, lambda s: upload_report(s, files, "cut"))
        names = [u["name"] for u in report["uploaded"]] + [f["name"] for f in report["failed"]]
        assert sorted(names) == sorted(expected)  # every file exactly once
        assert report["uploaded"]
        assert report["failed"]
        direct = s3_client(moto_server)
        for item in report["uploaded"]:
            body = direct.get_object(Bucket=s3_settings.s3_bucket, Key=item["key"])["Body"].read()
            assert body == expected[item["name"]]
        faults.fail_after = None
        # The outage tripped this storage's breaker; a new worker has its own, closed one.
        rerun = run_with_storage(settings, lambda s: upload_report(s, files, "cut"))
    assert rerun["failed"] == []
    assert {s["name"] for s in rerun["skipped"]} >= {u["name"] for u in report["uploaded"]}
    listing = direct.list_objects_v2(Bucket=s3_settings.s3_bucket, Prefix="datasets/cut/")
    assert listing["KeyCount"] == 60
    for obj in listing["Contents"]:
        body = direct.get_object(Bucket=s3_settings.s3_bucket, Key=obj["Key"])["Body"].read()
        assert body == expected[obj["Key"].rsplit("/", 1)[1]]


# --- slow-drip URLs hold only their own job (issue 11, finding 1) -----------------------------


class TrickleServer:
    """Answers every GET with a 200 whose body arrives at one byte a second; counts connections."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.active = 0
        self.most_active = 0
        self._lock = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> TrickleServer:
        self._listener.settimeout(0.1)
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._listener.close()
        for thread in self._threads:
            thread.join(5)

    def wait_active(self, count: int, timeout: float = 60) -> None:
        """Until ``count`` downloads are being answered at once (``timeout``: a hang guard only)."""
        with self._lock:
            if not self._lock.wait_for(lambda: self.active >= count, timeout):
                raise AssertionError(f"only {self.active} of {count} downloads started")

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._listener], [], [], 0.1)  # look at the stop flag 10x a second
                if not ready:
                    continue
                conn, _ = self._listener.accept()
            except (OSError, ValueError):  # ValueError: select on a closed listener
                return
            thread = threading.Thread(target=self._drip, args=(conn,), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _drip(self, conn: socket.socket) -> None:
        with self._lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
            self._lock.notify_all()
        try:
            with conn:
                conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: image/png\r\n\r\n")
                while not self._stop.wait(1.0):
                    conn.sendall(b"\x89")
        except OSError:
            return  # the client hung up: how the test ends the attack
        finally:
            with self._lock:
                self.active -= 1


def test_trickling_urls_do_not_hold_a_concurrent_small_upload(local_settings: Settings, tmp_path: Path) -> None:
    """32 URLs at 1 byte/s in one job: they download under that job's DOWNLOAD_CONCURRENCY and
    hold none of the worker-wide upload slots, so another job's small upload goes straight through.

    Told, not timed: the server says when the job's downloads are all being answered; the
    small upload must then finish while every one of them is still open (none ended, the
    attacking job still runs). The old code held the upload slots until DOWNLOAD_TOTAL_TIMEOUT,
    so the small upload waited for a download to end: the guard below (a hang guard only,
    far under that timeout) fails it, and so would the check that all downloads stayed open."""
    settings = local_settings.model_copy(update={"allow_private_urls": True})
    downloads = tmp_path / "downloads"

    async def fetch(url: str, name: str) -> Path:
        return (await download(url, downloads / uuid.uuid4().hex, settings, max_bytes=10_000)).path

    victim = [{"name": "victim.png", "data": b64(b"v" * 77)}]
    guard = settings.download_total_timeout / 5

    with TrickleServer() as server:
        attack = [{"name": f"slow_{i:02d}.bin", "url": f"http://127.0.0.1:{server.port}/{i}"} for i in range(32)]

        async def scenario(storage: Storage) -> tuple[dict[str, Any], int]:
            attacker = asyncio.create_task(
                upload_batch(
                    storage,
                    attack,
                    "attack",
                    concurrency=settings.upload_concurrency,
                    fetch=fetch,
                    download_concurrency=settings.download_concurrency,
                )
            )
            try:
                await asyncio.to_thread(server.wait_active, settings.download_concurrency)
                async with asyncio.timeout(guard):
                    report = await upload_report(storage, victim, "victim")
                still_open = server.active
                assert not attacker.done()
            finally:
                attacker.cancel()
                await asyncio.gather(attacker, return_exceptions=True)
            return report, still_open

        report, still_open = run_with_storage(settings, scenario)
        most_active = server.most_active
    assert [u["name"] for u in report["uploaded"]] == ["victim.png"]
    assert still_open == settings.download_concurrency  # no download ended before the upload did
    assert most_active == settings.download_concurrency  # the job's own bound, not the worker's slots


# --- files named as images are images (issue 10; README security section) ---------------------

PNG_1X1 = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg=="
)


def _png(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` with no pixels behind it (a pixel bomb's shape)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def test_files_named_as_images_are_decoded_before_they_are_stored(local_settings: Settings) -> None:
    files = [
        {"name": "good.png", "data": b64(PNG_1X1)},
        {"name": "bad.png", "data": b64(b"hi")},  # two bytes of text
        {"name": "cut.png", "data": b64(PNG_1X1[:40])},  # a PNG signature, then nothing decodable
        {"name": "bomb.png", "data": b64(_png(14900, 12000))},
        {"name": "notes.txt", "data": b64(b"hi")},  # not named as an image: stored as it is
    ]

    async def scenario(storage: Storage) -> dict[str, Any]:
        return (
            await upload_batch(storage, files, "img", concurrency=4, max_image_pixels=local_settings.max_image_pixels)
        ).model_dump()

    report = run_with_storage(local_settings, scenario)
    assert sorted(u["name"] for u in report["uploaded"]) == ["good.png", "notes.txt"]
    errors = {f["name"]: f["error"] for f in report["failed"]}
    assert errors["bad.png"].startswith("files[1]: not a decodable PNG image")
    assert errors["cut.png"].startswith("files[2]: not a decodable PNG image")
    assert errors["bomb.png"] == "files[3]: 14900x12000 is over 4194304 pixels (MAX_IMAGE_PIXELS)"
    assert not (local_settings.storage_dir / "datasets" / "img" / "bad.png").exists()
    assert all(str(local_settings.storage_dir) not in e and "/tmp" not in e for e in errors.values())


def test_a_bad_image_upload_through_test_input_names_the_file(tmp_path: Path) -> None:
    """The README's promise as a user meets it: ``python rp_handler.py --test_input``."""
    import json
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    job = {"action": "upload_training_files", "dataset": "d", "files": [{"name": "bad.png", "data": b64(b"hi")}]}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("S3_", "AWS_", "BUCKET_", "RUNPOD_"))}
    env.update({"STORAGE_DIR": str(tmp_path / "storage"), "PYTHONPATH": str(root)})
    completed = subprocess.run(
        [sys.executable, str(root / "rp_handler.py"), "--test_input", json.dumps({"input": job})],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    output = completed.stdout + completed.stderr
    assert "input.files[0]: not a decodable PNG image" in output
    assert "Traceback" not in output
    assert str(tmp_path / "storage") not in output.split("not a decodable", 1)[1].splitlines()[0]
    assert not (tmp_path / "storage" / "datasets" / "d" / "bad.png").exists()
