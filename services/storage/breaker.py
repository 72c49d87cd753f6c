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
  errors pass through without tripping anything;
* bound every call by a deadline (``S3_OPERATION_TIMEOUT``, botocore's retries included): a
  store that accepts connections and never answers fails the call, and counts, in seconds.
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

from services.errors import CircuitOpen, ObjectNotFound, StorageError, StorageTimeout, StorageUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

# What the AWS SDKs retry (botocore ``retries/standard.py``, the "standard" retry mode of
# every SDK): throttling codes, transient codes, HTTP 500/502/503/504, connection errors and
# timeouts. Exactly these are failures of the store. Everything else is an answer: 4xx,
# 501 NotImplemented and the other 5xx are deterministic and would fail the same way again.
THROTTLING_CODES = frozenset(
    {
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "EC2ThrottledException",
    }
)
TRANSIENT_CODES = frozenset({"RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete"})
TRANSIENT_STATUSES = frozenset({500, 502, 503, 504})
THROTTLING_STATUS = 429  # not in botocore's list, but every store that sends it means "slow down"
NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchUpload", "NotFound", "404"})
ACCESS_CODES = frozenset({"AccessDenied", "Forbidden", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"})


def _client_error_status(exc: ClientError) -> tuple[str, int]:
    error = exc.response.get("Error", {})
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    return str(error.get("Code", "")), int(status or 0)


def is_backend_failure(exc: BaseException) -> bool:
    """Whether ``exc`` says the storage backend is unhealthy (counts towards tripping).

    What the AWS SDKs retry counts (connection errors, timeouts, HTTP 500/502/503/504 and
    429, throttling and transient codes); every other answer (404, 403, 400, 501
    NotImplemented, 505 and so on) is deterministic, says nothing about the store's health,
    and does not.
    """
    if isinstance(exc, ClientError):
        code, status = _client_error_status(exc)
        return (
            status in TRANSIENT_STATUSES
            or status == THROTTLING_STATUS
            or code in THROTTLING_CODES
            or code in TRANSIENT_CODES
        )
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
        """Failures counted since the breaker last closed."""
        return self._cb.fail_counter

    def _opened(self) -> None:
        self._opened_at = self._clock()

    def seconds_until_half_open(self) -> float:
        """How long an open breaker still fails fast (0 when closed or due for a trial)."""
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
        """The fail-fast error, saying when to retry."""
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
        """Let the next call be a half-open trial (after :meth:`admit` returned True)."""
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


class DeadlineExceeded(TimeoutError):
    """The whole call, botocore's retries included, got no answer within its deadline."""


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
    if isinstance(exc, DeadlineExceeded):
        return StorageTimeout(f"storage unavailable: {operation} {resource}: {exc}")
    if is_backend_failure(exc):
        detail = type(exc).__name__
        return StorageUnavailable(f"storage unavailable: {operation} {resource} failed ({detail}: {exc})")
    return StorageError(f"{operation} {resource} failed: {type(exc).__name__}: {exc}")


def _caller_caused(exc: Exception, operation: str, resource: str) -> StorageError | None:
    """The error to report instead of ``exc`` when the caller's input, not the store, caused it.

    Some stores (MinIO, Ceph) answer a continuation token they cannot decode with
    ``500 InternalError`` instead of 400. On a call that carries such a caller-given value a
    plain 500 is therefore not counted: a caller replaying bogus tokens must not open the
    circuit for every job on the worker. A real outage still counts through every other call
    (the first page of any listing carries no token), and throttling, 502-504, timeouts and
    connection errors on this very call still count.
    """
    if isinstance(exc, ClientError):
        code, status = _client_error_status(exc)
        if status == 500 and code not in THROTTLING_CODES | TRANSIENT_CODES:
            return StorageError(
                f"{operation} {resource} failed: {code or 'error'} (500) for the continuation token given; "
                "it may be invalid or expired: list again from the first page"
            )
    return None


async def safe_s3_operation(
    breaker: S3Breaker,
    operation: str,
    func: Callable[..., Awaitable[T]],
    /,
    *args: Any,
    resource: str = "",
    deadline: float | None = None,
    caller_input: bool = False,
    **kwargs: Any,
) -> T:
    """Await ``func(*args, **kwargs)`` under ``breaker`` (the storage instance's own).

    ``operation`` and ``resource`` (e.g. ``put_object``, ``s3://bucket/key``) name the call
    in errors and logs; the request body is never logged. ``deadline`` (seconds,
    ``S3_OPERATION_TIMEOUT``) bounds the whole call; running out of it counts as a failure
    of the store. ``caller_input`` marks a call whose parameters the caller chose (a list
    token): see :func:`_caller_caused`. Raises ``StorageUnavailable`` while the circuit is
    open or when the backend failed, ``ObjectNotFound`` for a missing key, and
    ``StorageError`` otherwise.
    """
    trial = breaker.admit()
    try:
        scope = asyncio.timeout(deadline)
        try:
            async with scope:
                result = await func(*args, **kwargs)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - every error is counted and translated below
            outcome: Exception | None = exc
            if isinstance(exc, TimeoutError) and scope.expired():
                outcome = DeadlineExceeded(f"no answer within {deadline:g} s (S3_OPERATION_TIMEOUT)")
            elif caller_input and (instead := _caller_caused(exc, operation, resource)) is not None:
                outcome = instead
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
