"""The S3 circuit breaker: what counts, fail-fast while open, one half-open trial, recovery."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pybreaker
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from config.settings import Settings
from services.errors import ObjectNotFound, StorageError, StorageUnavailable
from services.storage import Storage
from services.storage.breaker import S3Breaker, is_backend_failure, safe_s3_operation
from services.storage.s3 import RealStorageService
from tests.conftest import run_with_storage
from tests.fakeclock import FakeClock
from tests.faultproxy import FaultProxy, Faults, free_port


def client_error(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")


@pytest.mark.parametrize(
    ("exc", "counts"),
    [
        (client_error("SlowDown", 503), True),
        (client_error("InternalError", 500), True),
        (client_error("TooManyRequests", 429), True),
        (client_error("Throttling", 400), True),
        (EndpointConnectionError(endpoint_url="http://x"), True),
        (TimeoutError(), True),
        (ConnectionResetError(), True),
        (client_error("BadGateway", 502), True),
        (client_error("GatewayTimeout", 504), True),
        (client_error("RequestTimeout", 400), True),
        (client_error("NoSuchKey", 404), False),
        (client_error("AccessDenied", 403), False),
        (client_error("InvalidArgument", 400), False),
        (client_error("NotImplemented", 501), False),
        (client_error("HTTPVersionNotSupported", 505), False),
        (ValueError("bad parameter"), False),
    ],
)
def test_only_backend_health_errors_count(exc: BaseException, counts: bool) -> None:
    assert is_backend_failure(exc) is counts


def _run(coro_factory, times: int = 1) -> list[BaseException | object]:  # type: ignore[no-untyped-def]
    async def main() -> list[BaseException | object]:
        results: list[BaseException | object] = []
        for _ in range(times):
            try:
                results.append(await coro_factory())
            except StorageError as exc:
                results.append(exc)
        return results

    return asyncio.run(main())


def test_business_errors_never_trip() -> None:
    breaker = S3Breaker(2, 30)

    async def missing() -> None:
        raise client_error("NoSuchKey", 404)

    results = _run(lambda: safe_s3_operation(breaker, "get_object", missing, resource="s3://b/k"), times=5)
    assert all(isinstance(r, ObjectNotFound) for r in results)
    assert "s3://b/k" in str(results[0])
    assert breaker.state == pybreaker.STATE_CLOSED


def test_cancellation_is_not_counted() -> None:
    breaker = S3Breaker(1, 30)

    async def main() -> None:
        task = asyncio.create_task(safe_s3_operation(breaker, "put_object", asyncio.sleep, 10))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert breaker.state == pybreaker.STATE_CLOSED
    assert breaker.fail_counter == 0


def test_dead_endpoint_opens_then_fails_fast(s3_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens on the port: after fail_max failures, calls fail at once, saying so."""
    dead = s3_settings.model_copy(
        update={"s3_endpoint_url": f"http://127.0.0.1:{free_port()}", "s3_breaker_fail_max": 3, "s3_max_attempts": 1}
    )
    caplog.set_level(logging.WARNING, logger="services.storage.breaker")

    async def scenario(storage: Storage) -> tuple[list[BaseException], dict[str, object]]:
        errors = []
        for i in range(5):
            with pytest.raises(StorageUnavailable) as info:
                await storage.put_bytes(f"k{i}", b"x")
            errors.append(info.value)
        return errors, storage.describe()["circuit_breaker"]

    errors, state = run_with_storage(dead, scenario)
    assert "circuit open" not in str(errors[0])
    assert "circuit open, retry in" in str(errors[3])
    assert "circuit open, retry in" in str(errors[4])
    assert state["state"] == "open"
    assert state["retry_in_seconds"] == 30  # the default reset timeout, on the breaker's own clock
    assert any("closed -> open" in r.getMessage() for r in caplog.records)


def test_failing_endpoint_half_open_trial_and_recovery(s3_settings: Settings, caplog: pytest.LogCaptureFixture) -> None:
    """503s trip the breaker; after the reset timeout exactly one trial goes through; success closes it."""
    caplog.set_level(logging.WARNING, logger="services.storage.breaker")
    faults = Faults(error_rate=1.0)
    with FaultProxy(s3_settings.s3_endpoint_url or "", faults) as proxy:
        settings = s3_settings.model_copy(
            update={
                "s3_endpoint_url": proxy.url,
                "s3_breaker_fail_max": 2,
                "s3_breaker_reset_timeout": 0.3,
                "s3_max_attempts": 1,
            }
        )

        clock = FakeClock()

        async def scenario(storage: Storage) -> None:
            breaker = storage.breaker = S3Breaker(2, 0.3, clock=clock)  # type: ignore[attr-defined]
            for _ in range(2):
                with pytest.raises(StorageUnavailable):
                    await storage.put_bytes("k", b"x")
            assert breaker.state == pybreaker.STATE_OPEN
            before = proxy.requests
            for _ in range(10):
                with pytest.raises(StorageUnavailable, match="circuit open"):
                    await storage.put_bytes("k", b"x")
            assert proxy.requests == before  # fail fast: nothing reached the network
            faults.error_rate = 0.0
            faults.latency = 0.2  # the trial is still in flight when the others ask
            clock.advance(0.35)
            results = await asyncio.gather(
                *(storage.put_bytes(f"trial{i}", b"x") for i in range(5)), return_exceptions=True
            )
            passed = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, StorageUnavailable)]
            assert len(passed) == 1  # one trial call while half-open
            assert len(refused) == 4
            assert all("half-open" in str(r) for r in refused)
            assert breaker.state == pybreaker.STATE_CLOSED
            faults.latency = 0.0
            await storage.put_bytes("after", b"ok")

        run_with_storage(settings, scenario)
    messages = [r.getMessage() for r in caplog.records]
    assert any("open -> half-open" in m for m in messages)
    assert any("half-open -> closed" in m for m in messages)


def test_failed_trial_reopens(s3_settings: Settings) -> None:
    with FaultProxy(s3_settings.s3_endpoint_url or "", Faults(error_rate=1.0)) as proxy:
        settings = s3_settings.model_copy(
            update={
                "s3_endpoint_url": proxy.url,
                "s3_breaker_fail_max": 1,
                "s3_breaker_reset_timeout": 0.2,
                "s3_max_attempts": 1,
            }
        )

        clock = FakeClock()

        async def scenario(storage: Storage) -> None:
            breaker = storage.breaker = S3Breaker(1, 0.2, clock=clock)  # type: ignore[attr-defined]
            with pytest.raises(StorageUnavailable):
                await storage.put_bytes("k", b"x")
            clock.advance(0.25)
            with pytest.raises(StorageUnavailable):
                await storage.put_bytes("k", b"x")  # the trial, refused by the server
            assert breaker.state == pybreaker.STATE_OPEN
            with pytest.raises(StorageUnavailable, match="circuit open"):
                await storage.put_bytes("k", b"x")

        run_with_storage(settings, scenario)


def test_open_breaker_fails_fast_without_network(s3_settings: Settings) -> None:
    """While open, a call returns without any I/O (the proxy counts every request)."""
    with FaultProxy(s3_settings.s3_endpoint_url or "", Faults(down=True)) as proxy:
        settings = s3_settings.model_copy(
            update={"s3_endpoint_url": proxy.url, "s3_breaker_fail_max": 2, "s3_max_attempts": 1}
        )

        async def scenario(storage: Storage) -> None:
            for _ in range(2):
                with pytest.raises(StorageUnavailable):
                    await storage.head("k")
            seen = proxy.requests
            for _ in range(20):
                with pytest.raises(StorageUnavailable, match="circuit open"):
                    await storage.head("k")
            assert proxy.requests == seen

        run_with_storage(settings, scenario)


def test_local_backend_is_default(tmp_path: Path) -> None:
    from config.settings import build_settings

    assert build_settings().backend == "local"


def test_open_breaker_waits_for_its_own_clock() -> None:
    """Open until the injected clock passes the reset timeout, then exactly one trial."""
    clock = FakeClock()
    breaker = S3Breaker(1, 30, clock=clock)

    async def down() -> None:
        raise client_error("SlowDown", 503)

    async def fine() -> str:
        return "ok"

    [tripped] = _run(lambda: safe_s3_operation(breaker, "put_object", down))
    assert isinstance(tripped, StorageUnavailable)
    assert breaker.state == pybreaker.STATE_OPEN
    clock.advance(29)
    [refused] = _run(lambda: safe_s3_operation(breaker, "put_object", fine))
    assert "circuit open, retry in 1 s" in str(refused)
    clock.advance(1)
    assert _run(lambda: safe_s3_operation(breaker, "put_object", fine)) == ["ok"]
    assert breaker.state == pybreaker.STATE_CLOSED


def test_each_storage_has_its_own_breaker(s3_settings: Settings) -> None:
    """Tripping one storage's breaker leaves another's closed (no module-global state)."""

    async def down() -> None:
        raise TimeoutError

    async def main() -> tuple[str, str]:
        first = await RealStorageService.create(s3_settings)
        second = await RealStorageService.create(s3_settings)
        try:
            for _ in range(s3_settings.s3_breaker_fail_max):
                with pytest.raises(StorageUnavailable):
                    await safe_s3_operation(first.breaker, "head_object", down)
        finally:
            await first.close()
            await second.close()
        return first.breaker.state, second.breaker.state

    assert asyncio.run(main()) == ("open", "closed")


# --- classification through a real HTTP round trip (issue 11, finding 12) ---------------------


def _proxied(s3_settings: Settings, proxy: FaultProxy) -> Settings:
    return s3_settings.model_copy(update={"s3_endpoint_url": proxy.url, "s3_breaker_fail_max": 2, "s3_max_attempts": 1})


def test_not_implemented_answers_never_open_the_circuit(s3_settings: Settings) -> None:
    """501 NotImplemented is an answer (the AWS SDKs do not retry it): it fails the call, not the store."""
    faults = Faults(error_rate=1.0, error_status=501, error_code="NotImplemented")
    with FaultProxy(s3_settings.s3_endpoint_url or "", faults) as proxy:

        async def scenario(storage: Storage) -> str:
            for _ in range(5):
                with pytest.raises(StorageError, match="NotImplemented") as info:
                    await storage.put_bytes("k", b"x")
                assert not isinstance(info.value, StorageUnavailable)
            return storage.breaker.state  # type: ignore[attr-defined]

        assert run_with_storage(_proxied(s3_settings, proxy), scenario) == "closed"
        assert proxy.injected_errors == 5


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_transient_statuses_open_the_circuit(s3_settings: Settings, status: int) -> None:
    faults = Faults(error_rate=1.0, error_status=status, error_code="InternalError")
    with FaultProxy(s3_settings.s3_endpoint_url or "", faults) as proxy:

        async def scenario(storage: Storage) -> str:
            for _ in range(2):
                with pytest.raises(StorageUnavailable):
                    await storage.put_bytes("k", b"x")
            return storage.breaker.state  # type: ignore[attr-defined]

        assert run_with_storage(_proxied(s3_settings, proxy), scenario) == "open"


def test_a_bogus_list_token_answered_with_500_is_the_callers_error(s3_settings: Settings) -> None:
    """MinIO and Ceph answer an undecodable continuation token with 500 InternalError.

    A caller's token is the caller's input: the list fails with a clear error and the circuit
    stays closed; the same 500 on a token-free call (first page, put) still counts.
    """
    faults = Faults(error_rate=1.0, error_status=500, error_code="InternalError")
    faults.error_when = lambda method, path: "continuation-token" in path
    with FaultProxy(s3_settings.s3_endpoint_url or "", faults) as proxy:

        async def scenario(storage: Storage) -> tuple[str, str]:
            for _ in range(5):
                with pytest.raises(StorageError, match="continuation token") as info:
                    await storage.list_page("datasets/", token="bogus-token")
                assert not isinstance(info.value, StorageUnavailable)
            closed = storage.breaker.state  # type: ignore[attr-defined]
            faults.error_when = None  # now every request: an outage
            for _ in range(2):
                with pytest.raises(StorageUnavailable):
                    await storage.list_page("datasets/")
            return closed, storage.breaker.state  # type: ignore[attr-defined]

        assert run_with_storage(_proxied(s3_settings, proxy), scenario) == ("closed", "open")
