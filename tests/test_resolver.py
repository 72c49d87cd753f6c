"""The DNS resolver of URL inputs: a lookup that never answers cannot hold the worker's exit."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

HUNG_LOOKUP = textwrap.dedent(
    """
    import asyncio, threading
    from services.ingest.resolver import BoundedResolver

    release = threading.Event()

    def hung(host, port):
        release.wait(600)  # like a getaddrinfo that never answers
        return []

    async def main():
        resolver = BoundedResolver(hung, threads=2)
        try:
            async with asyncio.timeout(0.2):
                await resolver("never.answers.test", 443)
        except TimeoutError:
            print("timed out", flush=True)

    asyncio.run(main())
    """
)


def test_a_hung_lookup_does_not_hold_the_process_exit() -> None:
    # With a ThreadPoolExecutor the interpreter joins the hung thread at exit (600 s here).
    done = subprocess.run(
        [sys.executable, "-c", HUNG_LOOKUP], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "timed out"
