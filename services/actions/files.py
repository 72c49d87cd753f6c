"""``list_files``, ``delete_files`` and ``get_file``."""

from __future__ import annotations

from services.context import JobContext
from services.errors import ObjectNotFound, PartialFailure
from services.keys import dataset_prefix
from services.outputs import OutputFile
from services.results import DeleteFilesResult, GetFileResult, ListedFile, ListFilesResult
from services.schemas import DeleteFilesInput, GetFileInput, ListFilesInput


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
    """Delete keys (or a whole dataset); failures are listed next to what was deleted."""
    if request.dataset:
        keys = [o.key async for o in ctx.storage.iter_objects(dataset_prefix(request.dataset))]
    else:
        keys = list(dict.fromkeys(request.keys or []))
    result = await ctx.storage.delete_many(keys)
    report = DeleteFilesResult(deleted=result.deleted, failed=result.errors)
    if result.errors:
        raise PartialFailure(f"{len(result.errors)} of {len(keys)} keys could not be deleted", report)
    return report


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
