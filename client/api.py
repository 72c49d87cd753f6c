"""``WorkerClient``: the worker's job API as Python methods.

    from client import WorkerClient

    with WorkerClient.for_endpoint("ENDPOINT_ID") as worker:    # RUNPOD_API_KEY from the environment
        report = worker.upload_dataset("photos/", dataset="cats")
        trained = worker.train("cats", "cat-lora", steps=800, trigger_word="sks")
        result = worker.generate("a photo of sks cat", lora="cat-lora", num_images=2, out_dir="out/")

    worker = WorkerClient.for_local("http://localhost:8000")    # python rp_handler.py --rp_serve_api

Every job goes through ``/run`` and is polled until it ends; a worker error (``{"error": ...}``
or status FAILED) raises :class:`JobFailed` with the worker's message. Ctrl-C while a job runs
cancels it (``/cancel``) and raises :class:`JobInterrupted`. ``train`` resubmits the same input
while the worker stops with a ``[resumable]`` error (a checkpoint saved). Output files are
saved whether they came inline (base64) or as a presigned redirect.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from client.errors import ClientError, JobFailed, JobInterrupted, JobTimeout, TransportError
from client.files import local_name, put_file, save_output_file
from client.transport import FINAL_STATES, LocalTransport, RunPodTransport, Transport
from client.uploads import (
    DEFAULT_INLINE_BUDGET,
    DEFAULT_MAX_FILES_PER_BATCH,
    SINGLE_PUT_LIMIT,
    LocalFile,
    UploadReport,
    encode_batch,
    name_problem,
    plan_upload,
    scan_folder,
)

log = logging.getLogger("client")

ProgressCallback = Callable[[Any], None]
FilesCallback = Callable[[int, int], None]  # (files done, files to send)
ResumeCallback = Callable[[int, JobFailed], None]  # (resubmission number, the resumable failure)
DEFAULT_MAX_RESUMES = 10
POLL_FAILURES_TOLERATED = 3  # status polls that may fail in a row (a network blip) before giving up


@dataclass
class TrainResult:
    """Where :meth:`WorkerClient.train` saved the LoRA, and the worker's metrics."""

    lora: Path
    kohya_lora: Path | None = None
    samples: list[Path] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)
    key: str | None = None
    resumed_from_step: int | None = None  # the worker's: 0 for a fresh start, None when it does not say
    resubmissions: int = 0  # jobs sent again after a resumable stop


@dataclass
class GenerateResult:
    """Where :meth:`WorkerClient.generate` saved the images; image ``i`` used ``seed + i``."""

    images: list[Path]
    seed: int | None


def _error_text(error: Any) -> str:
    """The worker's error as one line (the SDK sends a raised exception as JSON with a traceback)."""
    if isinstance(error, str) and error.startswith("{"):
        try:
            error = json.loads(error)
        except ValueError:
            return error
    if isinstance(error, dict):
        if "error_message" in error:
            kind = str(error.get("error_type", "")).removeprefix("<class '").removesuffix("'>")
            return f"{kind}: {error['error_message']}" if kind else str(error["error_message"])
        return json.dumps(error)
    return str(error)


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _file_field(output: Any, key: str, action: str) -> dict[str, Any]:
    """``output[key]``, an output file; a result without it is the worker's failure, not a crash."""
    value = output.get(key) if isinstance(output, dict) else None
    if not isinstance(value, dict):
        raise JobFailed(f"{action}: the worker's result has no {key!r} file: {str(output)[:200]}")
    return value


class WorkerClient:
    """Runs jobs on the worker and moves files in and out.

    ``timeout``: seconds to wait for a job (per call, overridable); ``request_timeout``: seconds
    per HTTP request; ``inline_budget``: JSON bytes per inline upload batch (under RunPod's
    10 MB request limit); files that alone do not fit go through presigned URLs.
    """

    def __init__(
        self,
        transport: Transport,
        *,
        timeout: float = 3600.0,
        poll_interval: float = 2.0,
        request_timeout: float = 60.0,
        inline_budget: int = DEFAULT_INLINE_BUDGET,
        max_files_per_batch: int = DEFAULT_MAX_FILES_PER_BATCH,
        put_concurrency: int = 4,
        presign_chunk: int = 32,
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self.inline_budget = inline_budget
        self.max_files_per_batch = max_files_per_batch
        self.put_concurrency = max(1, put_concurrency)
        self.presign_chunk = max(1, presign_chunk)
        self.session = requests.Session()  # downloads and presigned PUTs (no RunPod credentials)

    @classmethod
    def for_endpoint(
        cls,
        endpoint_id: str | None = None,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        request_timeout: float = 60.0,
        **options: Any,
    ) -> WorkerClient:
        """A RunPod endpoint; the id and key default to ``RUNPOD_ENDPOINT_ID`` and ``RUNPOD_API_KEY``."""
        transport = RunPodTransport(
            endpoint_id or os.environ.get("RUNPOD_ENDPOINT_ID", ""),
            api_key or os.environ.get("RUNPOD_API_KEY", ""),
            request_timeout=request_timeout,
            base_url=base_url,
        )
        return cls(transport, request_timeout=request_timeout, **options)

    @classmethod
    def for_local(
        cls, base_url: str = "http://localhost:8000", *, request_timeout: float = 60.0, **options: Any
    ) -> WorkerClient:
        """The local test server: ``python rp_handler.py --rp_serve_api [--rp_api_port N]``."""
        transport = LocalTransport(base_url, request_timeout=request_timeout)
        return cls(transport, request_timeout=request_timeout, **options)

    def __repr__(self) -> str:
        return f"WorkerClient({self.transport!r})"

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.session.close()
        self.transport.close()

    # --- jobs ---------------------------------------------------------------------------------

    def run(
        self, job_input: dict[str, Any], *, timeout: float | None = None, on_progress: ProgressCallback | None = None
    ) -> Any:
        """Run one job and return its output; raises :class:`JobFailed` or :class:`JobTimeout`.

        ``on_progress`` receives each new progress update the worker posts while the job runs
        (RunPod shows them as the status's ``output``; the local server shows none). Ctrl-C
        while the job runs asks the endpoint to cancel it and raises :class:`JobInterrupted`.
        """
        limit = self.timeout if timeout is None else timeout
        action = str(job_input.get("action", "job"))
        deadline = time.monotonic() + limit
        state = self.transport.submit(job_input)
        job_id = state.get("id")
        if not isinstance(job_id, str) or not job_id:
            raise TransportError(f"{action}: the endpoint accepted the job but sent no id: {str(state)[:200]}")
        log.debug("%s: job %s submitted", action, job_id)
        try:
            state = self._wait(job_id, action, state, deadline, limit, on_progress)
        except KeyboardInterrupt as exc:
            raise JobInterrupted(job_id, action, self._cancel(job_id, action)) from exc
        return self._finish(job_id, action, state)

    def _wait(
        self,
        job_id: str,
        action: str,
        state: dict[str, Any],
        deadline: float,
        limit: float,
        on_progress: ProgressCallback | None,
    ) -> dict[str, Any]:
        delay = 0.1
        last_progress: Any = None
        failures = 0
        while state.get("status") not in FINAL_STATES:
            progress = state.get("output")
            if on_progress and state.get("status") == "IN_PROGRESS" and progress not in (None, last_progress):
                last_progress = progress
                on_progress(progress)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._cancel(job_id, action)
                raise JobTimeout(f"{action}: job {job_id} did not finish within {limit:g} s", job_id=job_id)
            time.sleep(min(delay, remaining))
            delay = min(delay * 2, self.poll_interval)
            try:
                state = self.transport.status(job_id, max(0.0, deadline - time.monotonic()))
                failures = 0
            except TransportError as exc:
                failures += 1
                if failures > POLL_FAILURES_TOLERATED:
                    raise
                log.warning("%s: status of job %s failed (%s); retrying", action, job_id, exc)
        return state

    def _cancel(self, job_id: str, action: str) -> str:
        """Ask the endpoint to cancel ``job_id``; what happened, as a sentence."""
        try:
            self.transport.cancel(job_id)
        except ClientError as exc:
            log.warning("%s: could not cancel job %s: %s", action, job_id, exc)
            return f"could not cancel job {job_id}: {exc}"
        return f"cancelled job {job_id} on the endpoint"

    @staticmethod
    def _finish(job_id: str, action: str, state: dict[str, Any]) -> Any:
        status = state.get("status")
        if status == "COMPLETED":
            output = state.get("output")
            if output is None:
                raise JobFailed(
                    f"{action}: job {job_id} completed without output; RunPod drops a result it cannot "
                    "post (over 10 MB): lower RESPONSE_MAX_BYTES on the worker",
                    job_id=job_id,
                    status="COMPLETED",
                )
            if isinstance(output, dict) and output.get("error"):
                raise JobFailed(f"{action}: {_error_text(output['error'])}", job_id=job_id, output=output)
            return output
        error = state.get("error") or f"job ended with status {status}"
        raise JobFailed(
            f"{action}: {_error_text(error)}", job_id=job_id, status=str(status), output=state.get("output")
        )

    # --- storage actions ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Backend, breaker state, GPU, versions (``{"action": "health"}``)."""
        return self.run({"action": "health"})

    def list_files(self, dataset: str | None = None, prefix: str | None = None) -> list[dict[str, Any]]:
        """Every object of a dataset or under a prefix (all pages): ``{"key", "name", "size", ...}``."""
        files: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            page = self.run(_drop_none({"action": "list_files", "dataset": dataset, "prefix": prefix, "token": token}))
            files.extend(page.get("files", []))
            token = page.get("next_token")
            if not token:
                return files

    def delete_files(
        self, keys: list[str] | None = None, dataset: str | None = None, lora: str | None = None
    ) -> dict[str, Any]:
        """Delete keys, a whole dataset, or a LoRA: ``{"deleted": [...], "missing": [...], "failed": [...]}``."""
        return self.run(_drop_none({"action": "delete_files", "keys": keys, "dataset": dataset, "lora": lora}))

    def get_file(self, key: str, dest: str | Path = ".") -> Path:
        """Fetch one stored object (``loras/...``, ``datasets/...``, ``outputs/...``) into ``dest``."""
        output = self.run({"action": "get_file", "key": key})
        return self.save_output_file(_file_field(output, "file", "get_file"), dest)

    def save_output_file(self, file: Mapping[str, Any], dest: str | Path) -> Path:
        """Save an output file (base64 or redirect) to ``dest``: a path or an existing directory."""
        return save_output_file(
            file,
            dest,
            session=self.session,
            allow_file_urls=self.transport.allow_file_urls,
            timeout=self.request_timeout,
        )

    # --- dataset upload -------------------------------------------------------------------------

    def upload_dataset(
        self, folder: str | Path, dataset: str, *, on_progress: FilesCallback | None = None
    ) -> UploadReport:
        """Upload the images and ``.txt`` captions of ``folder`` into ``datasets/<dataset>/``.

        Files go inline in batches packed under ``inline_budget`` JSON bytes, or, when one
        alone would not fit, straight to storage through ``presign_uploads``. Never raises for
        a file: check ``report.failed`` (``report.ok``). ``on_progress(done, total)`` follows
        the files sent, after each batch and each presigned PUT.
        """
        files, ignored = scan_folder(Path(folder))
        report = UploadReport(dataset=dataset, ignored=ignored)
        sendable: list[LocalFile] = []
        for item in files:
            problem = name_problem(item.name)
            if problem:
                report.failed.append({"name": item.name, "error": f"name: {problem}"})
            else:
                sendable.append(item)
        plan = plan_upload(sendable, dataset, budget=self.inline_budget, max_files_per_batch=self.max_files_per_batch)
        report.batches = len(plan.batches)
        done = 0

        def advance(count: int) -> None:
            nonlocal done
            done += count
            if on_progress:
                on_progress(done, len(sendable))

        advance(0)
        for number, batch in enumerate(plan.batches, 1):
            log.debug("batch %d/%d: %d files inline", number, len(plan.batches), len(batch))
            self._upload_batch(dataset, batch, report)
            advance(len(batch))
        if plan.presigned:
            log.debug("%d files too large for a request: sending them through presigned URLs", len(plan.presigned))
        for start in range(0, len(plan.presigned), self.presign_chunk):
            self._upload_presigned(dataset, plan.presigned[start : start + self.presign_chunk], report, advance)
        return report

    def _upload_batch(self, dataset: str, batch: list[LocalFile], report: UploadReport) -> None:
        job_input, unreadable = encode_batch(dataset, batch, self.inline_budget)
        report.failed.extend(unreadable)
        sent = [entry["name"] for entry in job_input["files"]]
        if not sent:
            return
        try:
            output = self.run(job_input)
        except JobFailed as exc:
            output = exc.output if isinstance(exc.output, dict) else {}
            self._merge_batch(output, sent, str(exc), report)
            return
        except ClientError as exc:
            self._merge_batch({}, sent, str(exc), report)
            return
        self._merge_batch(output, sent, "", report)

    @staticmethod
    def _merge_batch(output: Mapping[str, Any], sent: list[str], error: str, report: UploadReport) -> None:
        """Add a batch's result; a file the worker did not account for failed with ``error``.

        A batch where some files failed completes with ``"partial": true`` and a ``summary``.
        """
        if output.get("partial"):
            report.partial = True
            if output.get("summary"):
                report.summaries.append(str(output["summary"]))
        seen: set[str] = set()
        for item in output.get("uploaded", []):
            report.uploaded.append({**item, "via": "inline"})
            seen.add(item.get("name"))
        for item in output.get("skipped", []):
            report.skipped.append(item)
            seen.add(item.get("name"))
        for item in output.get("failed", []):
            report.failed.append(item)
            seen.add(item.get("name"))
        for name in sent:
            if name not in seen:
                report.failed.append({"name": name, "error": error or "the worker did not report this file"})

    def _upload_presigned(
        self, dataset: str, chunk: list[LocalFile], report: UploadReport, advance: Callable[[int], None]
    ) -> None:
        too_large = [f for f in chunk if f.size > SINGLE_PUT_LIMIT]
        for item in too_large:
            report.failed.append({"name": item.name, "error": f"{item.size} bytes is over S3's 5 GiB single PUT"})
        advance(len(too_large))
        chunk = [f for f in chunk if f.size <= SINGLE_PUT_LIMIT]
        if not chunk:
            return
        request = {
            "action": "presign_uploads",
            "dataset": dataset,
            "files": [{"name": f.name, "content_type": f.content_type} for f in chunk],
        }
        try:
            output = self.run(request)
        except ClientError as exc:
            report.failed.extend({"name": f.name, "error": str(exc)} for f in chunk)
            advance(len(chunk))
            return
        by_name = {f.name: f for f in chunk}
        uploads = [u for u in output.get("uploads", []) if u.get("name") in by_name]
        missing = set(by_name) - {u["name"] for u in uploads}
        report.failed.extend({"name": n, "error": "the worker sent no upload URL for it"} for n in sorted(missing))
        advance(len(missing))

        def send(upload: dict[str, Any]) -> dict[str, Any]:
            item = by_name[upload["name"]]
            log.info("PUT %s (%d bytes)", item.name, item.size)
            try:
                size = put_file(
                    item.path,
                    upload,
                    session=self.session,
                    timeout=max(self.request_timeout, 60.0),
                )
            except ClientError as exc:
                return {"name": item.name, "error": str(exc)}
            return {"name": item.name, "key": upload.get("key"), "size": size, "via": "presigned"}

        with ThreadPoolExecutor(max_workers=self.put_concurrency) as pool:
            for result in pool.map(send, uploads):
                (report.failed if "error" in result else report.uploaded).append(result)
                report.presigned += "error" not in result
                advance(1)

    # --- GPU actions ----------------------------------------------------------------------------

    def train(
        self,
        dataset: str,
        output_name: str,
        *,
        dest: str | Path | None = None,
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        auto_resume: bool = True,
        max_resumes: int = DEFAULT_MAX_RESUMES,
        on_resume: ResumeCallback | None = None,
        **params: Any,
    ) -> TrainResult:
        """Train a LoRA (``train_lora``; ``params`` are its other fields) and download it.

        ``dest``: a file path, or a directory (default: the current one) for
        ``<output_name>.safetensors``; a Kohya export and samples are saved beside it.

        When the worker stops with a ``[resumable]`` error (a deadline, a cancel, SIGTERM: a
        checkpoint was saved), the same input is sent again, at most ``max_resumes`` times,
        and the worker resumes from its checkpoint; ``on_resume(number, failure)`` hears of
        each. ``auto_resume=False`` raises the failure instead. (The worker's own ``resume``
        field, ``resume=False`` in ``params``, is another thing: it forces a fresh start.)
        ``timeout`` applies to each job.
        """
        job = {"action": "train_lora", "dataset": dataset, "output_name": output_name, **_drop_none(params)}
        resubmissions = 0
        while True:
            try:
                output = self.run(job, timeout=timeout, on_progress=on_progress)
                break
            except JobFailed as failure:
                if not (auto_resume and failure.resumable):
                    raise
                if resubmissions >= max_resumes:
                    raise JobFailed(
                        f"{failure} (gave up after {resubmissions} resubmissions; raise the limit or run again)",
                        job_id=failure.job_id,
                        status=failure.status,
                        output=failure.output,
                    ) from failure
                resubmissions += 1
                log.info("train_lora: resubmitting (%d of at most %d): %s", resubmissions, max_resumes, failure)
                if on_resume:
                    on_resume(resubmissions, failure)
        target = dest if dest is not None else Path.cwd()
        lora_file = _file_field(output, "lora", "train_lora")
        lora = self.save_output_file(lora_file, target)
        resumed = output.get("resumed_from_step")
        result = TrainResult(
            lora=lora,
            metrics=output.get("metrics") or {},
            key=lora_file.get("key"),
            resumed_from_step=resumed if isinstance(resumed, int) else None,
            resubmissions=resubmissions,
        )
        if output.get("kohya_lora"):
            result.kohya_lora = self.save_output_file(output["kohya_lora"], lora.parent)
        for sample in output.get("samples") or []:
            name = f"{output_name}-{local_name(sample.get('name', 'sample.png'))}"
            result.samples.append(self.save_output_file(sample, lora.parent / name))
        return result

    def generate(
        self,
        prompt: str,
        *,
        out_dir: str | Path = ".",
        timeout: float | None = None,
        on_progress: ProgressCallback | None = None,
        **params: Any,
    ) -> GenerateResult:
        """Generate images (``generate``; ``params`` are its other fields) into ``out_dir``.

        Files are named ``<seed>-<name>`` (``7-image-0.png``), so runs do not overwrite each other.
        """
        job = {"action": "generate", "prompt": prompt, **_drop_none(params)}
        output = self.run(job, timeout=timeout, on_progress=on_progress)
        if not isinstance(output, dict):
            raise JobFailed(f"generate: the worker's result is not an object: {str(output)[:200]}")
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        seed = output.get("seed")
        prefix = f"{seed}-" if seed is not None else ""
        images = [
            self.save_output_file(image, folder / f"{prefix}{local_name(image.get('name', 'image.png'))}")
            for image in output.get("images", [])
        ]
        return GenerateResult(images=images, seed=seed)
