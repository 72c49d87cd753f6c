"""``WorkerClient``: the worker's job API as Python methods.

    from client import WorkerClient

    with WorkerClient.for_endpoint("ENDPOINT_ID") as worker:    # RUNPOD_API_KEY from the environment
        report = worker.upload_dataset("photos/", dataset="cats")
        trained = worker.train("cats", "cat-lora", steps=800, trigger_word="sks")
        result = worker.generate("a photo of sks cat", lora="cat-lora", num_images=2, out_dir="out/")

    worker = WorkerClient.for_local("http://localhost:8000")    # python rp_handler.py --rp_serve_api

Every job goes through ``/run`` and is polled until it ends (:mod:`client.jobs`); a worker error
(``{"error": ...}`` or status FAILED) raises :class:`JobFailed` with the worker's message. Ctrl-C
while a job runs cancels it (``/cancel``) and raises :class:`JobInterrupted`. ``train``
resubmits the same input while the worker stops with a ``[resumable]`` error (a checkpoint
saved). Output files are saved whether they came inline (base64) or as a presigned redirect;
every result is checked (:mod:`client.schema`) and names, hosts and sizes from it are not
trusted (:mod:`client.files`, :mod:`client.hosts`): a bad one raises a :class:`ClientError`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from client.errors import JobFailed
from client.files import DEFAULT_MAX_DOWNLOAD_BYTES, save_output_file
from client.hosts import HostPolicy, env_hosts
from client.jobs import JobRunner, ProgressCallback
from client.names import local_name
from client.schema import (
    CaptionReport,
    MemoryPlan,
    caption_report,
    memory_plan,
    obj,
    objects,
    optional_int,
    optional_text,
    output_file,
    texts,
)
from client.transport import DEFAULT_MAX_RESPONSE_BYTES, LocalTransport, RunPodTransport, Transport
from client.uploading import DatasetUploader
from client.uploads import DEFAULT_INLINE_BUDGET, DEFAULT_MAX_FILES_PER_BATCH

log = logging.getLogger("client")

ResumeCallback = Callable[[int, JobFailed], None]  # (resubmission number, the resumable failure)
DEFAULT_MAX_RESUMES = 10


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


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in values.items() if v is not None}


def _file_field(output: Any, key: str, action: str) -> dict[str, Any]:
    """``output[key]``, an output file; a result without it is the worker's failure, not a crash."""
    value = output.get(key) if isinstance(output, dict) else None
    if not isinstance(value, dict):
        raise JobFailed(f"{action}: the worker's result has no {key!r} file: {str(output)[:200]}")
    return value


class WorkerClient(JobRunner, DatasetUploader):
    """Runs jobs on the worker and moves files in and out.

    ``timeout``: seconds to wait for a job (per call, overridable); ``request_timeout``: seconds
    per HTTP request; ``inline_budget``: JSON bytes per inline upload batch (under RunPod's
    10 MB request limit); files that alone do not fit go through presigned URLs.
    ``allowed_hosts``: hosts presigned URLs may point at besides the endpoint's own and AWS
    S3 (plus ``LORA_WORKER_ALLOW_HOSTS``; see :mod:`client.hosts`); ``max_download_bytes``: the
    largest file saved.
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
        allowed_hosts: Iterable[str] = (),
        max_download_bytes: int = DEFAULT_MAX_DOWNLOAD_BYTES,
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self.poll_interval = poll_interval
        self.request_timeout = request_timeout
        self.inline_budget = inline_budget
        self.max_files_per_batch = max_files_per_batch
        self.put_concurrency = max(1, put_concurrency)
        self.presign_chunk = max(1, presign_chunk)
        self.hosts = HostPolicy.build([*allowed_hosts, *env_hosts()], endpoint_url=transport.base_url)
        self.max_download_bytes = max_download_bytes
        self.session = requests.Session()  # downloads and presigned PUTs (no RunPod credentials)

    @classmethod
    def for_endpoint(
        cls,
        endpoint_id: str | None = None,
        api_key: str | None = None,
        *,
        base_url: str | None = None,
        request_timeout: float = 60.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        **options: Any,
    ) -> WorkerClient:
        """A RunPod endpoint; the id and key default to ``RUNPOD_ENDPOINT_ID`` and ``RUNPOD_API_KEY``."""
        transport = RunPodTransport(
            endpoint_id or os.environ.get("RUNPOD_ENDPOINT_ID", ""),
            api_key or os.environ.get("RUNPOD_API_KEY", ""),
            request_timeout=request_timeout,
            base_url=base_url,
            max_response_bytes=max_response_bytes,
        )
        return cls(transport, request_timeout=request_timeout, **options)

    @classmethod
    def for_local(
        cls,
        base_url: str = "http://localhost:8000",
        *,
        request_timeout: float = 60.0,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        **options: Any,
    ) -> WorkerClient:
        """The local test server: ``python rp_handler.py --rp_serve_api [--rp_api_port N]``."""
        transport = LocalTransport(base_url, request_timeout=request_timeout, max_response_bytes=max_response_bytes)
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

    # --- storage actions ------------------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Backend, breaker state, GPU, versions (``{"action": "health"}``)."""
        return obj(self.run({"action": "health"}), "health result")

    def list_files(self, dataset: str | None = None, prefix: str | None = None) -> list[dict[str, Any]]:
        """Every object of a dataset or under a prefix (all pages): ``{"key", "name", "size", ...}``."""
        files: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            job = _drop_none({"action": "list_files", "dataset": dataset, "prefix": prefix, "token": token})
            page = obj(self.run(job), "list_files result")
            files.extend(objects(page.get("files"), "list_files result.files"))
            token = optional_text(page.get("next_token"), "list_files result.next_token")
            if not token:
                return files

    def delete_files(
        self, keys: list[str] | None = None, dataset: str | None = None, lora: str | None = None
    ) -> dict[str, Any]:
        """Delete keys, a whole dataset, or a LoRA: ``{"deleted": [...], "missing": [...], "failed": [...]}``."""
        job = _drop_none({"action": "delete_files", "keys": keys, "dataset": dataset, "lora": lora})
        result = obj(self.run(job), "delete_files result")
        for kind in ("deleted", "missing"):
            texts(result.get(kind), f"delete_files result.{kind}")
        objects(result.get("failed"), "delete_files result.failed")
        return result

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
            hosts=self.hosts,
            max_bytes=self.max_download_bytes,
        )

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
        result = self._save_training(output, output_name, Path.cwd() if dest is None else dest)
        result.resubmissions = resubmissions
        return result

    def _save_training(self, output: Any, output_name: str, dest: str | Path) -> TrainResult:
        """Download what a ``train_lora`` result names: the LoRA, its Kohya export, samples.

        The whole result is checked before any file is saved.
        """
        what = "train_lora result"
        lora_file = _file_field(output, "lora", "train_lora")
        output_file(lora_file, f"{what}.lora")
        kohya = output.get("kohya_lora")
        if kohya is not None:
            output_file(kohya, f"{what}.kohya_lora")
        samples = objects(output.get("samples"), f"{what}.samples")
        names = [
            local_name(f"{output_name}-{output_file(sample, f'{what}.samples[{i}]').name}")
            for i, sample in enumerate(samples)
        ]
        metrics = output.get("metrics")
        result = TrainResult(
            lora=Path(),
            metrics=obj(metrics, f"{what}.metrics") if metrics is not None else {},
            key=optional_text(lora_file.get("key"), f"{what}.lora.key"),
            resumed_from_step=optional_int(output.get("resumed_from_step"), f"{what}.resumed_from_step"),
        )
        result.lora = self.save_output_file(lora_file, dest)
        if kohya is not None:
            result.kohya_lora = self.save_output_file(kohya, result.lora.parent)
        result.samples = [
            self.save_output_file(sample, result.lora.parent / name)
            for sample, name in zip(samples, names, strict=True)
        ]
        return result

    def caption_dataset(
        self,
        dataset: str,
        *,
        out_dir: str | Path = ".",
        on_progress: ProgressCallback | None = None,
        timeout: float | None = None,
        **options: Any,
    ) -> CaptionReport:
        """Caption the dataset's images that have no ``.txt`` caption (``caption_dataset``;
        ``options`` are its other fields: ``trigger_word``, ``detail``, ``overwrite``, ...). The
        captions are stored beside the images; a full list the worker sent as a file (over 200
        captions) is saved into ``out_dir`` as ``captions.json``."""
        job = {"action": "caption_dataset", "dataset": dataset, **_drop_none(options)}
        output = self.run(job, timeout=timeout, on_progress=on_progress)
        report = caption_report(output, "caption_dataset result")
        if report.captions_file is not None:
            folder = Path(out_dir)
            folder.mkdir(parents=True, exist_ok=True)
            self.save_output_file(obj(output, "caption_dataset result")["captions_file"], folder)
        return report

    def plan(self, action: str = "train_lora", **params: Any) -> MemoryPlan:
        """Ask whether a ``train_lora`` or ``generate`` job fits a card (``dry_run``; nothing is
        loaded, trained or stored): e.g. ``plan(base_model="black-forest-labs/FLUX.1-dev",
        gpu_memory_gb=24)``. A ``train_lora`` plan needs no dataset or output name."""
        if action not in ("train_lora", "generate"):
            raise ValueError(f"plan: action must be train_lora or generate, not {action!r}")
        defaults = {"dataset": "plan", "output_name": "plan"} if action == "train_lora" else {"prompt": "plan"}
        job = {"action": action, **defaults, **_drop_none(params), "dry_run": True}
        return memory_plan(self.run(job), f"{action} dry run")

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
        output = obj(self.run(job, timeout=timeout, on_progress=on_progress), "generate result")
        seed = optional_int(output.get("seed"), "generate result.seed")
        images = objects(output.get("images"), "generate result.images")
        prefix = f"{seed}-" if seed is not None else ""
        # Every image and its local name is checked before any is saved.
        names = [
            local_name(prefix + output_file(image, f"generate result.images[{i}]").name)
            for i, image in enumerate(images)
        ]
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        saved = [self.save_output_file(image, folder / name) for image, name in zip(images, names, strict=True)]
        return GenerateResult(images=saved, seed=seed)
