"""One coroutine per action: ``await dispatch(request, ctx)`` runs the validated request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from services.actions.files import delete_files, get_file, list_files
from services.actions.gpu_jobs import generate, train_lora
from services.actions.health import health
from services.actions.uploads import presign_uploads, upload_training_files
from services.context import JobContext

ACTIONS: dict[str, Callable[[Any, JobContext], Awaitable[dict[str, Any]]]] = {
    "upload_training_files": upload_training_files,
    "presign_uploads": presign_uploads,
    "list_files": list_files,
    "delete_files": delete_files,
    "get_file": get_file,
    "train_lora": train_lora,
    "generate": generate,
    "health": health,
}
GPU_ACTIONS = frozenset({"train_lora", "generate"})


async def dispatch(request: Any, ctx: JobContext) -> dict[str, Any]:
    """Run the action named by ``request.action``."""
    return await ACTIONS[request.action](request, ctx)
