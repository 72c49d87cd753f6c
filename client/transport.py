"""How jobs reach the worker: RunPod's API through the SDK, or the local ``--rp_serve_api`` server.

Both transports speak RunPod's job states (``{"id", "status", "output"?, "error"?}``) and
only submit (``/run``) and poll; :class:`client.api.WorkerClient` does the waiting.

Why two: ``runpod.Endpoint`` builds ``{base}/{endpoint_id}/run`` and reads a job with
``GET {base}/{endpoint_id}/status/{id}``. The SDK's local test server serves ``/run`` and
``POST /status/{id}`` without the ``/v2/<endpoint id>`` prefix, and runs a ``/run`` job only
when its status is asked for (so that ``POST`` blocks until the job ends). No base URL makes
the SDK's paths and methods match that server, so :class:`LocalTransport` is a thin
``requests`` transport for that case only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import requests

from client.errors import ClientError, JobTimeout, TransportError

if TYPE_CHECKING:
    from runpod import Endpoint

FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"})
CONNECT_TIMEOUT = 10.0


class _RequestTimedOut(TransportError):
    """No answer within the request's timeout."""


class Transport(Protocol):
    """Submits jobs and reads their state. Implementations never log the API key."""

    #: Whether ``file://`` URLs in outputs and presigned uploads may be used (local server only).
    allow_file_urls: bool

    def submit(self, job_input: dict[str, Any]) -> dict[str, Any]:
        """Queue a job (``/run``); the returned state holds its ``id``."""
        ...

    def status(self, job_id: str, wait: float) -> dict[str, Any]:
        """The job's current state; ``wait`` is the most seconds the call may take."""
        ...

    def cancel(self, job_id: str) -> None:
        """Ask the endpoint to stop the job (best effort)."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


def _http_error(exc: requests.HTTPError, what: str) -> TransportError:
    response = exc.response
    if response is None:
        return TransportError(f"{what}: {exc}")
    body = response.text.strip().replace("\n", " ")[:300]
    hint = ""
    if response.status_code == 413:
        hint = " (request too large: RunPod accepts at most 10 MB per /run request)"
    return TransportError(f"{what}: HTTP {response.status_code}{hint}: {body or response.reason}")


class RunPodTransport:
    """A RunPod serverless endpoint, through the SDK's ``runpod.Endpoint`` and its HTTP client.

    ``base_url`` overrides the SDK's ``https://api.runpod.ai/v2`` (``RUNPOD_ENDPOINT_BASE_URL``
    does the same for the whole process). The API key is handed to the SDK and never printed.
    """

    allow_file_urls = False

    def __init__(
        self, endpoint_id: str, api_key: str, *, request_timeout: float = 60.0, base_url: str | None = None
    ) -> None:
        if not endpoint_id:
            raise ClientError("no endpoint id: pass --endpoint or set RUNPOD_ENDPOINT_ID (or use --local URL)")
        if not api_key:
            raise ClientError("RUNPOD_API_KEY is not set: the RunPod API needs an API key")
        import runpod  # about 2 s to import; only the real endpoint needs it

        self.endpoint: Endpoint = runpod.Endpoint(endpoint_id, api_key=api_key)
        if base_url:
            self.endpoint.rp_client.endpoint_url_base = base_url.rstrip("/")
        self.request_timeout = request_timeout

    def __repr__(self) -> str:
        return f"RunPodTransport(endpoint_id={self.endpoint.endpoint_id!r})"

    def _call(self, method: str, path: str, data: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        client = self.endpoint.rp_client
        route = f"{self.endpoint.endpoint_id}/{path}"
        what = f"{method} {route}"
        try:
            if method == "POST":
                answer = client.post(route, data, timeout=timeout)  # type: ignore[arg-type]
            else:
                answer = client.get(route, timeout=timeout)  # type: ignore[arg-type]
        except requests.HTTPError as exc:
            raise _http_error(exc, what) from exc
        except requests.RequestException as exc:
            raise TransportError(f"{what}: {type(exc).__name__}: {exc}") from exc
        except RuntimeError as exc:  # the SDK's "401 Unauthorized" and "API key not set"
            raise TransportError(f"{what}: {exc}") from exc
        if not isinstance(answer, dict):
            raise TransportError(f"{what}: expected a JSON object, got {type(answer).__name__}")
        return answer

    def submit(self, job_input: dict[str, Any]) -> dict[str, Any]:
        # Not Endpoint.run(): its 10 s timeout also bounds sending a 10 MB body.
        return self._call("POST", "run", {"input": job_input}, self.request_timeout)

    def status(self, job_id: str, wait: float) -> dict[str, Any]:
        return self._call("GET", f"status/{job_id}", None, max(1.0, min(wait, self.request_timeout)))

    def cancel(self, job_id: str) -> None:
        self._call("POST", f"cancel/{job_id}", None, min(30.0, self.request_timeout))

    def close(self) -> None:
        self.endpoint.rp_client.rp_session.close()


class LocalTransport:
    """The SDK's local test server (``python rp_handler.py --rp_serve_api``), e.g. http://localhost:8000.

    Its ``POST /status/{id}`` runs the job inside the request, so ``status`` waits up to the
    job's remaining time, and progress updates are not visible locally.
    """

    allow_file_urls = True

    def __init__(self, base_url: str = "http://localhost:8000", *, request_timeout: float = 60.0) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ClientError(f"--local needs an http(s) URL such as http://localhost:8000, got {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.request_timeout = request_timeout
        self.session = requests.Session()

    def __repr__(self) -> str:
        return f"LocalTransport(base_url={self.base_url!r})"

    def _post(self, path: str, body: dict[str, Any] | None, timeout: float) -> dict[str, Any]:
        url = self.base_url + path
        try:
            response = self.session.post(url, json=body, timeout=(CONNECT_TIMEOUT, timeout))
            response.raise_for_status()
            answer = response.json()
        except requests.HTTPError as exc:
            raise _http_error(exc, f"POST {url}") from exc
        except requests.ConnectionError as exc:
            raise TransportError(
                f"cannot reach the local server at {self.base_url} (start it with: python rp_handler.py --rp_serve_api)"
            ) from exc
        except requests.Timeout as exc:
            raise _RequestTimedOut(f"POST {url}: no answer within {timeout:g} s") from exc
        except (requests.RequestException, ValueError) as exc:
            raise TransportError(f"POST {url}: {type(exc).__name__}: {exc}") from exc
        if not isinstance(answer, dict):
            raise TransportError(f"POST {url}: expected a JSON object, got {type(answer).__name__}")
        return answer

    def submit(self, job_input: dict[str, Any]) -> dict[str, Any]:
        return self._post("/run", {"input": job_input}, self.request_timeout)

    def status(self, job_id: str, wait: float) -> dict[str, Any]:
        try:
            return self._post(f"/status/{job_id}", None, max(1.0, wait))
        except _RequestTimedOut as exc:  # the job runs inside this request
            raise JobTimeout(f"job {job_id} did not finish within {wait:g} s", job_id=job_id) from exc

    def cancel(self, job_id: str) -> None:
        """The local server has no cancel route; an abandoned job is dropped when it ends."""
        del job_id

    def close(self) -> None:
        self.session.close()
