"""One writer per output_name (services.durable.lease) and the conditional writes under it, on both
backends (moto's server honours If-None-Match / If-Match). Time is a FakeClock: no sleeps."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from config.settings import Settings
from services.durable.lease import Lease, LeaseRecord
from services.errors import OutputBusy, PreconditionFailed
from services.storage import Storage
from services.storage.base import ObjectInfo
from services.storage.keys import MANAGED_ROOTS, lease_key
from tests.conftest import run_with_storage
from tests.fakeclock import FakeClock

NAME = "my-lora"
TTL = 600.0


def lease(storage: Storage, job: str, clock: FakeClock, worker: str = "w1") -> Lease:
    return Lease(storage, NAME, job, worker, TTL, clock=clock)


def test_conditional_writes_create_once_and_replace_only_the_version_read(any_settings: Settings) -> None:
    """Catches a backend whose create overwrites an existing object or whose If-Match ignores the ETag."""

    async def scenario(storage: Storage) -> None:
        key = lease_key(NAME)
        first = await storage.put_bytes_if(key, b"one", etag=None)
        with pytest.raises(PreconditionFailed):
            await storage.put_bytes_if(key, b"two", etag=None)
        data, etag = await storage.get_bytes_and_etag(key)
        assert (data, etag) == (b"one", first.etag)
        with pytest.raises(PreconditionFailed):
            await storage.put_bytes_if(key, b"three", etag='"not-the-etag"')
        second = await storage.put_bytes_if(key, b"four", etag=etag)
        with pytest.raises(PreconditionFailed):  # the version read before is gone
            await storage.put_bytes_if(key, b"five", etag=etag)
        assert await storage.get_bytes_and_etag(key) == (b"four", second.etag)

    run_with_storage(any_settings, scenario)


def test_a_second_job_on_a_claimed_name_is_refused_naming_the_holder(any_settings: Settings) -> None:
    """Catches two jobs writing one LoRA: the second must fail at once, naming job and expiry."""
    clock = FakeClock()

    async def scenario(storage: Storage) -> None:
        first = lease(storage, "job-a", clock, worker="pod-1")
        await first.acquire()
        assert first.conditional
        clock.advance(60)
        with pytest.raises(OutputBusy) as raised:
            await lease(storage, "job-b", clock).acquire()
        message = str(raised.value)
        assert "job-a" in message and "pod-1" in message and "in 540 s" in message
        assert LeaseRecord.model_validate_json(await storage.get_bytes(lease_key(NAME))).expires_text() in message
        await first.release()
        second = lease(storage, "job-b", clock)
        await second.acquire()  # released: free again
        await second.release()
        assert await storage.head(lease_key(NAME)) is None

    run_with_storage(any_settings, scenario)


def test_two_jobs_starting_together_one_wins(any_settings: Settings) -> None:
    """Catches a read-check-write race: both see no lease, both write. The conditional create lets one win."""
    clock = FakeClock()

    async def scenario(storage: Storage) -> None:
        outcomes = await asyncio.gather(
            *(lease(storage, f"job-{i}", clock).acquire() for i in range(4)), return_exceptions=True
        )
        assert sum(o is None for o in outcomes) == 1, outcomes
        assert all(isinstance(o, OutputBusy) for o in outcomes if o is not None), outcomes

    run_with_storage(any_settings, scenario)


def test_a_killed_workers_lease_expires_and_a_resend_takes_it(any_settings: Settings) -> None:
    """Catches a lease that never expires (a killed worker would block its LoRA forever) and a
    renewal that does not notice another job took over."""
    clock = FakeClock()

    async def scenario(storage: Storage) -> None:
        killed = lease(storage, "job-a", clock)
        await killed.acquire()  # the worker dies here: no renewal, no release
        clock.advance(TTL / 3)
        await killed.renew()  # a renewal moves the expiry on
        clock.advance(TTL - 1)
        with pytest.raises(OutputBusy):
            await lease(storage, "job-b", clock).acquire()
        clock.advance(2)
        resend = lease(storage, "job-b", clock)
        await resend.acquire()
        await killed.renew()
        assert killed.lost and "job-b" in killed.lost
        await killed.release()  # not its own any more: left alone
        assert json.loads(await storage.get_bytes(lease_key(NAME)))["job_id"] == "job-b"

    run_with_storage(any_settings, scenario)


class IgnoresConditions:
    """A store that accepts every conditional write (as some S3-compatible stores do)."""

    def __init__(self, inner: Storage) -> None:
        self.inner = inner

    async def put_bytes_if(self, key: str, data: bytes, *, etag: str | None, **kwargs: Any) -> ObjectInfo:
        return await self.inner.put_bytes(key, data, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_store_that_ignores_conditions_is_detected_and_a_live_holder_still_refuses(
    local_settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Catches a worker that trusts a store ignoring If-None-Match: the repeated create is accepted,
    so it says so, and a live lease read before writing still refuses the second job."""
    clock = FakeClock()

    async def scenario(storage: Storage) -> None:
        loose: Any = IgnoresConditions(storage)
        first = lease(loose, "job-a", clock)
        await first.acquire()
        assert not first.conditional
        with pytest.raises(OutputBusy, match="job-a"):
            await lease(loose, "job-b", clock).acquire()

    run_with_storage(local_settings, scenario)
    assert "ignores conditional writes" in caplog.text


def test_a_damaged_lease_counts_as_expired_and_leases_are_not_managed_keys(any_settings: Settings) -> None:
    """Catches a lease object that cannot be parsed blocking its LoRA, and leases users could delete."""
    clock = FakeClock()
    assert not lease_key(NAME).startswith(MANAGED_ROOTS)

    async def scenario(storage: Storage) -> None:
        await storage.put_bytes(lease_key(NAME), b"[" * 5000)
        taker = lease(storage, "job-b", clock)
        await taker.acquire()
        assert json.loads(await storage.get_bytes(lease_key(NAME)))["job_id"] == "job-b"

    run_with_storage(any_settings, scenario)


def test_delete_files_refuses_a_lora_that_a_running_job_holds(
    any_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Catches a delete that a running ``train_lora`` would undo (it writes its checkpoints and LoRA
    back): while the lease is held, ``delete_files`` of that LoRA, by name or by key, is refused
    naming the job and nothing is deleted; once the lease is released, the delete goes through."""
    from tests.conftest import run_jobs, use_settings_env

    use_settings_env(monkeypatch, any_settings)
    key = f"loras/{NAME}/checkpoints/step-00000002/trainer.safetensors"

    async def claim(storage: Storage) -> None:
        await storage.put_bytes(key, b"state")
        await Lease(storage, NAME, "job-train", "pod-1", TTL).acquire()

    run_with_storage(any_settings, claim)
    by_name, by_key = run_jobs(
        {"id": "d1", "input": {"action": "delete_files", "lora": NAME}},
        {"id": "d2", "input": {"action": "delete_files", "keys": [key]}},
    )
    for result in (by_name, by_key):
        assert "is being trained by job job-train" in result["error"], result

    async def release_and_check(storage: Storage) -> bool:
        assert await storage.head(key) is not None  # nothing was deleted
        await Lease(storage, NAME, "job-train", "pod-1", TTL).release()
        return True

    run_with_storage(any_settings, release_and_check)
    [done] = run_jobs({"id": "d3", "input": {"action": "delete_files", "lora": NAME}})
    assert key in done["deleted"], done
