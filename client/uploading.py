"""``WorkerClient.upload_dataset``: a folder into ``datasets/<name>/``, inline or presigned.

Every answer of the worker is checked (:mod:`client.schema`): a malformed one fails the files
it was about, with a :class:`ClientError`'s message in the report, never a crash.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

from client.errors import ClientError, JobFailed
from client.files import put_file
from client.hosts import HostPolicy
from client.schema import PresignedUpload, obj, objects, presigned_upload
from client.uploads import (
    SINGLE_PUT_LIMIT,
    LocalFile,
    UploadReport,
    encode_batch,
    name_problem,
    plan_upload,
    scan_folder,
)

log = logging.getLogger("client")

FilesCallback = Callable[[int, int], None]  # (files done, files to send)


def merge_batch(output: Any, sent: list[str], error: str, report: UploadReport) -> None:
    """Add a batch's result; a file the worker did not account for failed with ``error``.

    A batch where some files failed completes with ``"partial": true`` and a ``summary``.
    """
    output = obj(output, "upload_training_files result")
    lists = {
        kind: objects(output.get(kind), f"upload_training_files result.{kind}")
        for kind in ("uploaded", "skipped", "failed")
    }
    if output.get("partial"):
        report.partial = True
        if output.get("summary"):
            report.summaries.append(str(output["summary"]))
    report.uploaded.extend({**item, "via": "inline"} for item in lists["uploaded"])
    report.skipped.extend(lists["skipped"])
    report.failed.extend(lists["failed"])
    seen = {item.get("name") for items in lists.values() for item in items}
    for name in sent:
        if name not in seen:
            report.failed.append({"name": name, "error": error or "the worker did not report this file"})


class DatasetUploader:
    """The upload half of :class:`client.api.WorkerClient`."""

    inline_budget: int
    max_files_per_batch: int
    put_concurrency: int
    presign_chunk: int
    request_timeout: float
    session: requests.Session
    hosts: HostPolicy
    run: Callable[..., Any]

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
            if problem := name_problem(item.name):
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
            merge_batch(output, sent, "", report)
        except JobFailed as exc:
            partial = exc.output if isinstance(exc.output, dict) else {}
            self._merge_or_fail(partial, sent, str(exc), report)
        except ClientError as exc:
            merge_batch({}, sent, str(exc), report)

    @staticmethod
    def _merge_or_fail(output: dict[str, Any], sent: list[str], error: str, report: UploadReport) -> None:
        try:
            merge_batch(output, sent, error, report)
        except ClientError as exc:  # a malformed partial result: every file of the batch failed
            merge_batch({}, sent, f"{error} ({exc})", report)

    def _presign(self, dataset: str, chunk: list[LocalFile]) -> list[PresignedUpload]:
        request = {
            "action": "presign_uploads",
            "dataset": dataset,
            "files": [{"name": f.name, "content_type": f.content_type} for f in chunk],
        }
        output = obj(self.run(request), "presign_uploads result")
        entries = objects(output.get("uploads"), "presign_uploads result.uploads")
        return [presigned_upload(entry, f"presign_uploads result.uploads[{i}]") for i, entry in enumerate(entries)]

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
        try:
            answered = self._presign(dataset, chunk)
        except ClientError as exc:
            report.failed.extend({"name": f.name, "error": str(exc)} for f in chunk)
            advance(len(chunk))
            return
        by_name = {f.name: f for f in chunk}
        uploads = list({u.name: u for u in answered if u.name in by_name}.values())
        missing = set(by_name) - {u.name for u in uploads}
        report.failed.extend({"name": n, "error": "the worker sent no upload URL for it"} for n in sorted(missing))
        advance(len(missing))
        with ThreadPoolExecutor(max_workers=self.put_concurrency) as pool:
            for result in pool.map(lambda u: self._send(by_name[u.name], u), uploads):
                (report.failed if "error" in result else report.uploaded).append(result)
                report.presigned += "error" not in result
                advance(1)

    def _send(self, item: LocalFile, upload: PresignedUpload) -> dict[str, Any]:
        log.info("PUT %s (%d bytes)", item.name, item.size)
        try:
            size = put_file(
                item.path, upload, session=self.session, timeout=max(self.request_timeout, 60.0), hosts=self.hosts
            )
        except ClientError as exc:
            return {"name": item.name, "error": str(exc)}
        return {"name": item.name, "key": upload.key, "size": size, "via": "presigned"}
