"""``list_files``, ``delete_files`` and ``get_file``."""

from __future__ import annotations

import asyncio
import time

from services.actions.results import DeleteFilesResult, GetFileResult, ListedFile, ListFilesResult
from services.actions.schemas import DeleteFilesInput, GetFileInput, ListFilesInput
from services.durable.lease import Lease, worker_name
from services.errors import ObjectNotFound, OutputBusy, StorageError
from services.job.context import JobContext
from services.output.files import OutputFile
from services.storage.keys import dataset_prefix, lora_checkpoint_prefix, lora_name_of, lora_owner, lora_prefix


async def list_files(request: ListFilesInput, ctx: JobContext) -> ListFilesResult:
    """One page of objects (``next_token`` continues the listing)."""
    prefix = dataset_prefix(request.dataset) if request.dataset else request.prefix or ""
    page = await ctx.storage.list_page(prefix, page_size=request.limit, token=request.token)
    files = [
        ListedFile(
            key=o.key,
            name=o.key.removeprefix(prefix),
            size=o.size,
            last_modified=o.last_modified.isoformat() if o.last_modified else None,
        )
        for o in page.objects
    ]
    return ListFilesResult(prefix=prefix, files=files, next_token=page.next_token)


async def delete_files(request: DeleteFilesInput, ctx: JobContext) -> DeleteFilesResult:
    """Delete keys (or a whole dataset or LoRA): ``deleted``, ``missing`` (did not exist) and ``failed``.

    Deleting a trained LoRA's file also deletes its training checkpoints (a later ``train_lora``
    of that name would otherwise resume from them). Some keys failed: the job completes with
    ``partial`` and a summary; all failed: an error.
    """
    missing: list[str] = []
    await _refuse_while_training(ctx, request)
    if request.dataset or request.lora:
        prefix = dataset_prefix(request.dataset) if request.dataset else lora_prefix(request.lora or "")
        keys = [o.key async for o in ctx.storage.iter_objects(prefix)]
    else:
        requested = list(dict.fromkeys(request.keys or []))
        exists = await _exist(ctx, requested)
        keys = [k for k, e in zip(requested, exists, strict=True) if e]
        missing = [k for k, e in zip(requested, exists, strict=True) if not e]
        for name in _trained_loras(keys):
            keys += [o.key async for o in ctx.storage.iter_objects(lora_checkpoint_prefix(name)) if o.key not in keys]
    result = await ctx.storage.delete_many(keys) if keys else None
    deleted, failed = (result.deleted, result.errors) if result else ([], [])
    summary = f"{len(deleted)} deleted, {len(missing)} missing, {len(failed)} failed"
    if failed:
        named = "; ".join(f"{f.get('key')}: {f.get('error')}" for f in failed[:10])
        summary += f": {named}" + (f" (and {len(failed) - 10} more)" if len(failed) > 10 else "")
        if not deleted:
            raise StorageError(f"no key was deleted: {summary}")
    return DeleteFilesResult(deleted=deleted, missing=missing, failed=failed, partial=bool(failed), summary=summary)


async def _refuse_while_training(ctx: JobContext, request: DeleteFilesInput) -> None:
    """:class:`OutputBusy` when a running ``train_lora`` holds the lease on a LoRA this delete
    touches: it would write its checkpoints and LoRA back, and the delete would not last."""
    names = {request.lora} if request.lora else {n for k in request.keys or [] if (n := lora_owner(k))}
    for name in sorted(n for n in names if n):
        lease = Lease(ctx.storage, name, ctx.job_id, worker_name(), ctx.settings.lease_seconds)
        holder, _ = await lease.read()
        if holder is not None and holder.expires_at > time.time():
            raise OutputBusy(
                f"input.lora: {name} is being trained by job {holder.job_id} (worker {holder.worker}, lease "
                f"until {holder.expires_text()}); cancel that job or wait for it to end, then delete"
            )


def _trained_loras(keys: list[str]) -> list[str]:
    """The output names whose LoRA file (``loras/<name>/<name>.safetensors``) is in ``keys``."""
    return sorted({name for key in keys if (name := lora_name_of(key))})


async def _exist(ctx: JobContext, keys: list[str]) -> list[bool]:
    """Whether each key exists (HEAD requests, ``UPLOAD_CONCURRENCY`` at a time)."""
    slots = asyncio.Semaphore(ctx.settings.upload_concurrency)

    async def exists(key: str) -> bool:
        async with slots:
            return await ctx.storage.head(key) is not None

    return list(await asyncio.gather(*(exists(k) for k in keys)))


async def get_file(request: GetFileInput, ctx: JobContext) -> GetFileResult:
    """One stored object through the output policy: inline when small, else a presigned URL."""
    info = await ctx.storage.head(request.key)
    if info is None:
        raise ObjectNotFound(f"input.key: {request.key} does not exist")
    name = request.key.rsplit("/", 1)[-1]
    if info.size > ctx.settings.inline_max_bytes:
        mime = info.content_type or "application/octet-stream"
        return GetFileResult(file=OutputFile(name=name, size=info.size, mime=mime, key=request.key))  # presigned as is
    data = await ctx.storage.get_bytes(request.key)
    return GetFileResult(file=OutputFile.from_bytes(name, data, mime=info.content_type, key=request.key))
