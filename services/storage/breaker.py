"""The S3 circuit breaker (:class:`S3Breaker`, one per storage instance) and
:func:`safe_s3_operation`, the one path of every S3 call.

pybreaker 1.4 has no native asyncio support: ``call_async`` needs tornado, and
``call()`` on a coroutine function only records a success. So the operation is awaited
here and its outcome is replayed through the breaker's ``calling()``, which keeps
pybreaker's counting and state machine while letting us:

* fail fast while open, with the time left (``storage unavailable: circuit open, retry in 27 s``);
* let exactly one trial call through once the reset timeout has passed (half-open);
* leave ``asyncio.CancelledError`` uncounted (a cancelled job says nothing about S3);
* count only backend-health errors (:func:`is_backend_failure`); 404, 403 and parameter
  errors pass through without tripping anything.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import pybreaker
from botocore.exceptions import (
    ClientError,
    ConnectionClosedError,
    EndpointConnectionError,
    HTTPClientError,
    ReadTimeoutError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from services.errors import CircuitOpen, ObjectNotFound, StorageError, StorageUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestLimitExceeded",
        "TooManyRequestsException",
        "RequestThrottled",
        "ServiceUnavailable",
        "InternalError",
        "RequestTimeout",
    }
)
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound", "404"})
ACCESS_CODES = frozenset({"AccessDenied", "Forbidden", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


def _client_error_status(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0)


def is_backend_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the storage backend is unhealthy (counts towards tripping).

    Connection errors, timeouts, HTTP 5xx, 429 and throttling codes count; missing keys,
    access errors and bad parameters do not: they are the caller's business.
    """
    if isinstance(exc, ClientError):
        code, status = _client_error_status(exc)
        return status >= 500 or status == 429 or code in THROTTLING_CODES
    return isinstance(
        exc,
        EndpointConnectionError
        | ConnectionClosedError
        | ReadTimeoutError
        | BotoConnectionError
        | HTTPClientError
        | aiohttp.ClientError
        | TimeoutError
        | ConnectionError,
    )


Clock = Callable[[], float]


class S3Breaker:
    """The circuit breaker of one storage instance (``S3_BREAKER_FAIL_MAX``, ``S3_BREAKER_RESET_TIMEOUT``).

    ``clock`` (seconds, monotonic) decides when an open breaker lets its half-open trial
    through; tests pass a fake one instead of sleeping.
    """

    def __init__(self, fail_max: int = 5, reset_timeout: float = 30.0, *, clock: Clock = time.monotonic) -> None:
        self._clock = clock
        self._opened_at: float | None = None
        self._trial_in_flight = False
        self._cb = pybreaker.CircuitBreaker(
            fail_max=fail_max,
            reset_timeout=reset_timeout,
            exclude=[lambda exc: not is_backend_failure(exc)],
            listeners=[_StateLogger(self)],
            name="s3",
        )

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half-open``."""
        return self._cb.current_state

    @property
    def fail_counter(self) -> int:
        return self._cb.fail_counter

    def _opened(self) -> None:
        self._opened_at = self._clock()

    def seconds_until_half_open(self) -> float:
        if self._opened_at is None:
            return 0.0
        return max(0.0, self._opened_at + self._cb.reset_timeout - self._clock())

    def describe(self) -> dict[str, Any]:
        """Readable state for the health action."""
        info: dict[str, Any] = {
            "state": self.state,
            "fail_counter": self._cb.fail_counter,
            "fail_max": self._cb.fail_max,
            "reset_timeout": self._cb.reset_timeout,
        }
        if self.state == pybreaker.STATE_OPEN:
            info["retry_in_seconds"] = math.ceil(self.seconds_until_half_open())
        return info

    def open_error(self) -> CircuitOpen:
        retry = max(1, math.ceil(self.seconds_until_half_open()))
        return CircuitOpen(f"storage unavailable: circuit open, retry in {retry} s")

    def admit(self) -> bool:
        """Fail fast while open; return True when this call is the half-open trial."""
        state = self.state
        if state == pybreaker.STATE_CLOSED:
            return False
        if state == pybreaker.STATE_OPEN:
            if self.seconds_until_half_open() > 0:
                raise self.open_error()
            self._cb.half_open()  # on this breaker's clock, not pybreaker's wall clock
        if self._trial_in_flight:
            raise CircuitOpen("storage unavailable: circuit half-open, a trial call is in progress")
        self._trial_in_flight = True
        return True

    def trial_done(self) -> None:
        self._trial_in_flight = False

    def record(self, outcome: BaseException | None) -> None:
        """Replay the outcome through pybreaker so it counts it."""
        with self._cb.calling():
            if outcome is not None:
                raise outcome


class _StateLogger(pybreaker.CircuitBreakerListener):
    """Logs every state change at WARNING (ignoring pybreaker's ``open -> open`` repeats)."""

    def __init__(self, owner: S3Breaker) -> None:
        self.owner = owner

    def state_change(
        self,
        cb: pybreaker.CircuitBreaker,
        old_state: pybreaker.CircuitBreakerState | None,
        new_state: pybreaker.CircuitBreakerState,
    ) -> None:
        if new_state.name == pybreaker.STATE_OPEN:
            self.owner._opened()
        old = old_state.name if old_state is not None else None
        if old == new_state.name:
            return
        log.warning(
            "s3 circuit breaker %s -> %s (fail_max=%d, reset_timeout=%ss)",
            old,
            new_state.name,
            cb.fail_max,
            cb.reset_timeout,
        )


def translate_error(exc: BaseException, operation: str, resource: str) -> StorageError:
    """The project's error for a failed S3 call, naming the operation and resource."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, ClientError):
        code, status = _client_error_status(exc)
        if code in NOT_FOUND_CODES or status == 404:
            return ObjectNotFound(f"{resource}: not found ({code or status})")
        if code in ACCESS_CODES or status == 403:
            return StorageError(f"{operation} {resource}: access denied ({code or status}); check the credentials")
        if is_backend_failure(exc):
            return StorageUnavailable(f"storage unavailable: {operation} {resource} failed with {code} ({status})")
        return StorageError(f"{operation} {resource} failed: {code} ({status})")
    if is_backend_failure(exc):
        detail = type(exc).__name__
        return StorageUnavailable(f"storage unavailable: {operation} {resource} failed ({detail}: {exc})")
    return StorageError(f"{operation} {resource} failed: {type(exc).__name__}: {exc}")


async def safe_s3_operation(
    breaker: S3Breaker,
    operation: str,
    func: Callable[..., Awaitable[T]],
    /,
    *args: Any,
    resource: str = "",
    **kwargs: Any,
) -> T:
    """Await ``func(*args, **kwargs)`` under ``breaker`` (the storage instance's own).

    ``operation`` and ``resource`` (e.g. ``put_object``, ``s3://bucket/key``) name the call
    in errors and logs; the request body is never logged. Raises ``StorageUnavailable``
    while the circuit is open or when the backend failed, ``ObjectNotFound`` for a
    missing key, and ``StorageError`` otherwise.
    """
    trial = breaker.admit()
    try:
        try:
            result = await func(*args, **kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error is counted and translated below
            outcome: Exception | None = exc
        else:
            outcome = None
        try:
            breaker.record(outcome)
        except pybreaker.CircuitBreakerError as exc:
            if outcome is None:
                # Another call tripped the breaker while this one was in flight; ours worked.
                return result
            log.warning("s3 %s %s failed; circuit breaker now open", operation, resource)
            raise breaker.open_error() from exc.__context__ or outcome
        except Exception as exc:
            if is_backend_failure(exc):
                log.warning("s3 %s %s failed: %s: %s", operation, resource, type(exc).__name__, exc)
            raise translate_error(exc, operation, resource) from exc
        return result
    finally:
        if trial:
            breaker.trial_done()
