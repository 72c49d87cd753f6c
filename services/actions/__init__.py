"""The action registry: every action's input model and coroutine, in one list.

Adding an action: write its input model (with ``action: Literal["<name>"]``), its result model
and its coroutine ``async def run(request, ctx) -> <result model>`` in its own module, then add
one line to :data:`REGISTRY`. The names, the discriminated union that validates a job's
``input``, the JSON Schemas (and so the README's API reference) and :func:`dispatch` all come
from it.

Nothing here imports torch: the GPU actions load the runner inside their coroutines.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from services.actions.files import delete_files, get_file, list_files
from services.actions.gpu_jobs import generate, train_lora
from services.actions.health import health
from services.actions.results import (
    DeleteFilesResult,
    GenerateResult,
    GetFileResult,
    HealthResult,
    ListFilesResult,
    PresignResult,
    TrainLoraResult,
    UploadResult,
)
from services.actions.schemas import (
    DeleteFilesInput,
    GetFileInput,
    HealthInput,
    ListFilesInput,
    PresignUploadsInput,
    UploadTrainingFilesInput,
)
from services.actions.uploads import presign_uploads, upload_training_files
from services.errors import InputError
from services.gpu.params import GenerateInput, TrainLoraInput
from services.job.context import JobContext

if TYPE_CHECKING:
    from config.settings import Settings

Runner = Callable[[Any, JobContext], Awaitable[BaseModel]]

REGISTRY: tuple[tuple[type[BaseModel], Runner, type[BaseModel]], ...] = (
    (UploadTrainingFilesInput, upload_training_files, UploadResult),
    (PresignUploadsInput, presign_uploads, PresignResult),
    (ListFilesInput, list_files, ListFilesResult),
    (DeleteFilesInput, delete_files, DeleteFilesResult),
    (GetFileInput, get_file, GetFileResult),
    (TrainLoraInput, train_lora, TrainLoraResult),
    (GenerateInput, generate, GenerateResult),
    (HealthInput, health, HealthResult),
)


def _action_name(model: type[BaseModel]) -> str:
    (name,) = get_args(model.model_fields["action"].annotation)
    return str(name)


ACTIONS: dict[str, Runner] = {_action_name(model): run for model, run, _ in REGISTRY}
"""Action name -> coroutine (what :func:`dispatch` calls)."""

RESULTS: dict[str, type[BaseModel]] = {_action_name(model): result for model, _, result in REGISTRY}
"""Action name -> result model (the ``output`` of a job that succeeded; the API reference shows it)."""

JobInput = Annotated[Union[tuple(model for model, _, _ in REGISTRY)], Field(discriminator="action")]  # noqa: UP007
_ADAPTER: TypeAdapter[Any] = TypeAdapter(JobInput)


def _location(loc: tuple[int | str, ...]) -> str:
    path = "input"
    for part in loc[1:] if loc and loc[0] in ACTIONS else loc:
        path += f"[{part}]" if isinstance(part, int) else f".{part}"
    return path


def format_validation_error(error: ValidationError) -> str:
    """Every problem on one line each: ``input.files[3].name: Field required``."""
    problems = []
    for item in error.errors(include_url=False):
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "union_tag_invalid":
            message = f"unknown action; choose one of {', '.join(ACTIONS)}"
        elif item["type"] == "union_tag_not_found":
            message = f"missing 'action'; choose one of {', '.join(ACTIONS)}"
        problems.append(f"{_location(tuple(item['loc']))}: {message}")
    return "invalid input: " + "; ".join(problems)


def parse_job_input(raw: Any, settings: Settings) -> Any:
    """Validate a job's ``input`` into its action model, or raise :class:`InputError`."""
    if not isinstance(raw, dict):
        raise InputError("invalid input: input must be a JSON object with an 'action' field")
    try:
        request = _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc)) from None
    request.check_limits(settings)
    return request


def input_json_schema() -> dict[str, Any]:
    """The JSON Schema of a job's ``input`` (the API reference is generated from it)."""
    return _ADAPTER.json_schema()


async def dispatch(request: Any, ctx: JobContext) -> BaseModel:
    """Run the action named by ``request.action``."""
    return await ACTIONS[request.action](request, ctx)
