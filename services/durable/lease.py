"""One writer per ``output_name``: a lease object in storage that a training job holds while it runs.

The lease is JSON under :func:`~services.storage.keys.lease_key` (``leases/loras/<name>.json``):
the job id, the worker, when it was taken and when it expires (wall-clock seconds: workers
compare it). A job takes it before it deletes or writes anything of that LoRA:

* created with a conditional write (:meth:`Storage.put_bytes_if`, S3 ``If-None-Match: *``, an
  exclusive locked create on the local backend): of two jobs starting together one wins;
* a lease that exists and has not expired refuses the job at once
  (:class:`~services.errors.OutputBusy`, naming the holder's job id and when the lease expires);
* an expired one (a worker killed mid-run never released it) is taken over with ``If-Match``
  on the ETag read, so of two jobs taking it over together one wins; a resend then resumes;
* the running job renews it every third of its length (``LEASE_SECONDS``) with ``If-Match``;
  a renewal that finds another holder marks the lease :attr:`Lease.lost` (the job must not
  store its LoRA then), and it is deleted at the job's end if still its own.

Stores that ignore the conditional headers (older MinIO, some gateways) write anyway. The worker
detects that on acquire: it repeats the create, which such a store accepts; the lease then works
by read-check-write (refuses a live holder, but two jobs starting within the same moment can
both pass) and the worker logs a warning once. The clock is injected (tests move it by hand).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.errors import ObjectNotFound, OutputBusy, PreconditionFailed, StorageError
from services.storage.base import Storage
from services.storage.keys import lease_key

log = logging.getLogger(__name__)

Clock = Callable[[], float]
MAX_LEASE_BYTES = 4096
_Text = Annotated[str, Field(min_length=1, max_length=256)]


class LeaseRecord(BaseModel):
    """What the lease object holds."""

    model_config = ConfigDict(strict=True, extra="forbid")

    output_name: _Text
    job_id: _Text
    worker: _Text
    acquired_at: float
    expires_at: float

    def expires_text(self) -> str:
        return datetime.fromtimestamp(self.expires_at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def worker_name() -> str:
    """This worker: RunPod's pod id, else the host name."""
    return os.environ.get("RUNPOD_POD_ID") or socket.gethostname() or "unknown"


class Lease:
    """The claim of job ``job_id`` on ``output_name``; :meth:`acquire` before writing, :meth:`release` after."""

    def __init__(
        self, storage: Storage, output_name: str, job_id: str, worker: str, seconds: float, clock: Clock = time.time
    ) -> None:
        self.storage = storage
        self.key = lease_key(output_name)
        self.output_name = output_name
        self.job_id = job_id
        self.worker = worker
        self.seconds = seconds
        self.clock = clock
        self.etag: str | None = None
        self.conditional = True  # False once the store is seen to ignore conditional writes
        self.lost: str | None = None  # why the lease is no longer this job's

    def _record(self, acquired_at: float | None = None) -> bytes:
        now = self.clock()
        record = LeaseRecord(
            output_name=self.output_name,
            job_id=self.job_id,
            worker=self.worker,
            acquired_at=now if acquired_at is None else acquired_at,
            expires_at=now + self.seconds,
        )
        return record.model_dump_json().encode()

    async def read(self) -> tuple[LeaseRecord | None, str | None]:
        """The stored lease and its ETag; ``(None, None)`` when there is none, ``(None, etag)``
        when it is not a lease record (taken over like an expired one)."""
        try:
            raw, etag = await self.storage.get_bytes_and_etag(self.key)
        except ObjectNotFound:
            return None, None
        try:
            if len(raw) > MAX_LEASE_BYTES:
                raise ValueError(f"{len(raw)} bytes")
            return LeaseRecord.model_validate(json.loads(raw)), etag
        except (ValueError, ValidationError, RecursionError) as exc:
            log.warning("lease %s is not a lease record (%s); it counts as expired", self.key, exc)
            return None, etag

    def _busy(self, holder: LeaseRecord) -> OutputBusy:
        left = max(0, round(holder.expires_at - self.clock()))
        return OutputBusy(
            f"input.output_name: {self.output_name} is being written by job {holder.job_id} "
            f"(worker {holder.worker}); its lease expires at {holder.expires_text()} (in {left} s). "
            "Wait for that job, or send this job again after the lease expires (a killed job's lease "
            "expires on its own and the resend resumes from its checkpoint)"
        )

    async def acquire(self) -> None:
        """Take the lease or raise :class:`OutputBusy`; storage errors propagate."""
        for _ in range(3):  # a lease released or taken over between our write and our read: look again
            holder, etag = await self.read()
            if holder is not None and holder.job_id != self.job_id and holder.expires_at > self.clock():
                raise self._busy(holder)
            try:
                info = await self.storage.put_bytes_if(
                    self.key, self._record(), etag=etag, content_type="application/json"
                )
            except PreconditionFailed:
                log.debug("lease %s changed between our read and our write; reading it again", self.key)
                continue
            self.etag = info.etag
            await self._probe()
            log.info("job %s holds the lease on %s", self.job_id, self.output_name)
            return
        holder, _ = await self.read()
        if holder is not None:
            raise self._busy(holder)
        raise StorageError(f"{self.key}: could not take the lease (changed under every attempt)")

    async def _probe(self) -> None:
        """Repeat the create: a store that honours ``If-None-Match`` refuses it (the lease exists)."""
        try:
            info = await self.storage.put_bytes_if(self.key, self._record(), etag=None, content_type="application/json")
        except PreconditionFailed:
            return
        self.etag = info.etag
        self.conditional = False
        log.warning(
            "storage accepted a create of the existing %s: it ignores conditional writes; "
            "the lease on %s falls back to read-check-write (two jobs starting at the same moment may both pass)",
            self.key,
            self.output_name,
        )

    async def renew(self) -> None:
        """Extend the lease; marks :attr:`lost` (and logs) when another job holds it now."""
        holder, etag = await self.read()
        if holder is None or holder.job_id != self.job_id:
            self._lose(f"held by job {holder.job_id}" if holder else "gone")
            return
        try:
            info = await self.storage.put_bytes_if(
                self.key, self._record(holder.acquired_at), etag=etag, content_type="application/json"
            )
        except PreconditionFailed:
            self._lose("changed while renewing")
            return
        self.etag = info.etag

    def _lose(self, why: str) -> None:
        self.lost = f"the lease on {self.output_name} was lost ({why}): another job may be writing it"
        log.error("job %s: %s", self.job_id, self.lost)

    async def release(self) -> None:
        """Delete the lease if it is still this job's (a failure is logged: it expires anyway)."""
        try:
            holder, _ = await self.read()
            if holder is None or holder.job_id != self.job_id:
                return
            result = await self.storage.delete_many([self.key])
        except StorageError as exc:
            log.warning("job %s: releasing the lease %s failed (it expires on its own): %s", self.job_id, self.key, exc)
            return
        if result.errors:
            log.warning("job %s: releasing the lease %s failed: %s", self.job_id, self.key, result.errors)

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.seconds / 3)
            try:
                await self.renew()
            except StorageError as exc:
                log.warning("job %s: renewing the lease %s failed (retried): %s", self.job_id, self.key, exc)

    @asynccontextmanager
    async def held(self) -> AsyncIterator[Lease]:
        """Acquire, renew in the background while the block runs, release after."""
        await self.acquire()
        renewal = asyncio.create_task(self._renew_forever())
        try:
            yield self
        finally:
            renewal.cancel()
            await asyncio.gather(renewal, return_exceptions=True)
            await asyncio.shield(self.release())
