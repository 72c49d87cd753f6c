"""How jobs reach the worker: RunPod's serverless API, or the SDK's local ``--rp_serve_api`` server.

Both transports speak RunPod's job states (``{"id", "status", "output"?, "error"?}``) and
only submit (``/run``), poll and cancel; :class:`client.api.WorkerClient` does the waiting.

Both are plain ``requests``: RunPod's API is three routes (``POST {base}/{endpoint}/run``,
``GET .../status/{id}``, ``POST .../cancel/{id}`` with ``Authorization: Bearer <key>``), and
the SDK's local server serves ``/run`` and ``POST /status/{id}`` without the endpoint prefix,
running a ``/run`` job inside that status call (so it blocks until the job ends). Not
importing the ``runpod`` SDK keeps the installed client light (about 2 s of import and a
FastAPI/boto3 dependency tree saved).
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

import requests
import urllib3
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from client.errors import BadResponse, ClientError, JobTimeout, TransportError
from client.files import capped

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
CONNECT_TIMEOUT = 10.0
CANCEL_TIMEOUT = 10.0
LOCAL_CANCEL_TIMEOUT = 3.0  # the local server answers at once, or its event loop is busy with the job
RUNPOD_API = "https://api.runpod.ai/v2"
DEFAULT_MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # a job state; RunPod's own results stay under 20 MB
ERROR_BODY_BYTES = 4096  # what is read of an HTTP error's body


class _RequestTimedOut(TransportError):
    """No answer within the request's timeout."""


class Transport(Protocol):
    """Submits jobs and reads their state. Implementations never log the API key."""

    #: Whether ``file://`` URLs in outputs and presigned uploads may be used (local server only).
    allow_file_urls: bool
    #: Whether a status call blocks until the job ends (the local server), so no progress shows.
    blocking_status: bool
    #: The endpoint's URL: its host may serve presigned URLs (:mod:`client.hosts`).
    base_url: str

    def submit(self, job_input: dict[str, Any]) -> dict[str, Any]:
        """Queue a job (``/run``); the returned state holds its ``id``."""
        ...

    def status(self, job_id: str, wait: float) -> dict[str, Any]:
        """The job's current state; ``wait`` is the most seconds the call may take."""
        ...

    def cancel(self, job_id: str) -> None:
        """Ask the endpoint to stop the job; raises :class:`TransportError` when it cannot."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def _read_body(response: requests.Response, limit: int, what: str) -> bytes:
    """The body, refused (:class:`BadResponse`) past ``limit`` bytes without reading the rest."""
    announced = response.headers.get("Content-Length", "")
    if announced.isdigit() and int(announced) > limit:
        raise BadResponse(f"{what}: the answer announces {announced} bytes, over the {limit}-byte limit")
    return b"".join(capped(lambda n: response.raw.read(n, decode_content=True), limit, what, BadResponse))


def _http_error(response: requests.Response, what: str) -> TransportError:
    head = response.raw.read(ERROR_BODY_BYTES, decode_content=True) or b""
    body = head.decode("utf-8", "replace").strip().replace("\n", " ")[:300]
    hint = ""
    if response.status_code == 401:
        hint = " (the API key was refused: check RUNPOD_API_KEY)"
    elif response.status_code == 413:
        hint = " (request too large: RunPod accepts at most 10 MB per /run request)"
    return TransportError(f"{what}: HTTP {response.status_code}{hint}: {body or response.reason}")


class _HttpTransport:
    """JSON over one ``requests`` session; every failure becomes a :class:`TransportError`."""

    allow_file_urls = False
    blocking_status = False

    def __init__(
        self,
        base_url: str,
        *,
        request_timeout: float,
        headers: dict[str, str] | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.request_timeout = request_timeout
        self.max_response_bytes = max_response_bytes
        self.session = requests.Session()
        self.session.headers.update(headers or {})

    def _request(self, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        url = f"{self.base_url}/{path}"
        what = f"{method} {url}"
        try:
            with self.session.request(
                method, url, json=body, timeout=(CONNECT_TIMEOUT, timeout), stream=True, allow_redirects=False
            ) as response:
                if response.status_code >= 300:
                    raise _http_error(response, what)
                data = _read_body(response, self.max_response_bytes, what)
        except requests.ConnectionError as exc:
            raise TransportError(f"{what}: cannot connect ({self._unreachable_hint()})") from exc
        except (requests.Timeout, urllib3.exceptions.ReadTimeoutError) as exc:
            raise _RequestTimedOut(f"{what}: no answer within {timeout:g} s") from exc
        except (requests.RequestException, urllib3.exceptions.HTTPError) as exc:
            raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from exc
        try:
            answer = json.loads(data)
        except ValueError as exc:
            raise BadResponse(f"{what}: the answer is not JSON: {data[:200]!r}") from exc
        if not isinstance(answer, dict):
            raise BadResponse(f"{what}: expected a JSON object, got {type(answer).__name__}")
        return answer

    def _unreachable_hint(self) -> str:
        return "check the network"

    def close(self) -> None:
        self.session.close()


class RunPodTransport(_HttpTransport):
    """A RunPod serverless endpoint.

    ``base_url`` overrides ``https://api.runpod.ai/v2`` (so does ``RUNPOD_ENDPOINT_BASE_URL``,
    as in the SDK). The API key goes in the ``Authorization`` header only and is never printed.
    Status polls are retried on 429/502/503/504 (RunPod rate-limits polling); ``/run`` is not,
    so a job is never submitted twice.
    """

    def __init__(
        self,
        endpoint_id: str,
        api_key: str,
        *,
        request_timeout: float = 60.0,
        base_url: str | None = None,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if not endpoint_id:
            raise ClientError("no endpoint id: pass --endpoint or set RUNPOD_ENDPOINT_ID (or use --local URL)")
        if not api_key:
            raise ClientError("RUNPOD_API_KEY is not set: the RunPod API needs an API key")
        base = base_url or os.environ.get("RUNPOD_ENDPOINT_BASE_URL") or RUNPOD_API
        super().__init__(
            f"{base.rstrip('/')}/{endpoint_id}",
            request_timeout=request_timeout,
            headers={"Authorization": f"Bearer {api_key}"},
            max_response_bytes=max_response_bytes,
        )
        self.endpoint_id = endpoint_id
        retry = Retry(total=4, backoff_factor=0.5, status_forcelist=(429, 502, 503, 504), allowed_methods={"GET"})
        for scheme in ("http://", "https://"):
            self.session.mount(scheme, HTTPAdapter(max_retries=retry))

    def __repr__(self) -> str:
        return f"RunPodTransport(endpoint_id={self.endpoint_id!r})"

    def submit(self, job_input: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "run", {"input": job_input}, self.request_timeout)

    def status(self, job_id: str, wait: float) -> dict[str, Any]:
        return self._request("GET", f"status/{job_id}", None, max(1.0, min(wait, self.request_timeout)))

    def cancel(self, job_id: str) -> None:
        self._request("POST", f"cancel/{job_id}", None, min(CANCEL_TIMEOUT, self.request_timeout))


class LocalTransport(_HttpTransport):
    """The SDK's local test server (``python rp_handler.py --rp_serve_api``), e.g. http://localhost:8000.

    Its ``POST /status/{id}`` runs the job inside the request and answers once, so ``status``
    waits up to the job's remaining time and no progress is visible while it runs. The SDK
    (1.12) serves no cancel route: :meth:`cancel` asks anyway and says so when it is refused.
    """

    allow_file_urls = True
    blocking_status = True

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        *,
        request_timeout: float = 60.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ClientError(f"--local needs an http(s) URL such as http://localhost:8000, got {base_url!r}")
        super().__init__(base_url, request_timeout=request_timeout, max_response_bytes=max_response_bytes)

    def __repr__(self) -> str:
        return f"LocalTransport(base_url={self.base_url!r})"

    def _unreachable_hint(self) -> str:
        return "start the local server with: python rp_handler.py --rp_serve_api"

    def submit(self, job_input: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "run", {"input": job_input}, self.request_timeout)

    def status(self, job_id: str, wait: float) -> dict[str, Any]:
        try:
            return self._request("POST", f"status/{job_id}", None, max(1.0, wait))
        except _RequestTimedOut as exc:  # the job runs inside this request
            raise JobTimeout(f"job {job_id} did not finish within {wait:g} s", job_id=job_id) from exc

    def cancel(self, job_id: str) -> None:
        try:
            self._request("POST", f"cancel/{job_id}", None, LOCAL_CANCEL_TIMEOUT)
        except TransportError as exc:
            raise TransportError(
                "the local test server cannot cancel a running job (the SDK serves no /cancel there): "
                "it runs to its end; stop the server to stop it"
            ) from exc
