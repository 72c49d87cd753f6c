"""The action registry: every action's input model and coroutine, in one list.

Adding an action: write its input model (with ``action: Literal["<name>"]``), its result model
and its coroutine ``async def run(request, ctx) -> <result model>`` in its own module, then add
one line to :data:`REGISTRY`. The names, the discriminated union that validates a job's
``input``, the JSON Schemas (and so the README's API reference) and :func:`dispatch` all come
from it.

Nothing here imports torch: the GPU actions load the runner inside their coroutines.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, Union, get_args

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from services.actions.caption_results import CaptionDatasetResult
from services.actions.captions import caption_dataset
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
from services.gpu.caption.options import CaptionDatasetInput
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
    (CaptionDatasetInput, caption_dataset, CaptionDatasetResult),
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


# How pydantic names the members of a union in an error's location ("constrained-int",
# "list[constrained-int]", a model's class name): never a field name, which is snake_case.
_UNION_MEMBER = re.compile(r"none|int|float|str|bool|bytes|constrained-[a-z]+|[a-z-]+\[.*\]|[A-Z]\w*")
_KINDS = {"int": "integer", "float": "number", "str": "string", "bool": "boolean", "bytes": "string"}


def _member_kind(member: str) -> str:
    """``list[constrained-int]`` -> ``a list of integers``; ``int`` -> ``an integer``."""
    inner = re.fullmatch(r"list\[(.*)\]", member)
    if inner:
        return f"a list of {_KINDS.get(inner.group(1).removeprefix('constrained-'), 'item')}s"
    kind = _KINDS.get(member.removeprefix("constrained-"), member)
    return ("an " if kind[0] in "aeiou" else "a ") + kind


def _is_type_error(item: Any) -> bool:
    return str(item["type"]).endswith(("_type", "_parsing")) or item["type"] == "model_attributes_type"


def _problem(item: Any) -> str:
    message = item["msg"].removeprefix("Value error, ")
    if item["type"] == "union_tag_invalid":
        message = f"unknown action; choose one of {', '.join(ACTIONS)}"
    elif item["type"] == "union_tag_not_found":
        message = f"missing 'action'; choose one of {', '.join(ACTIONS)}"
    return f"{_location(tuple(item['loc']))}: {message}"


def _union_problems(loc: tuple[int | str, ...], members: dict[str, list[Any]]) -> list[str]:
    """One union's errors as one problem: the members the value's type fits (the constraint it
    broke), or, when it fits none, what it should have been."""
    fitting = [item for items in members.values() if not all(map(_is_type_error, items)) for item in items]
    if fitting:
        return [_problem(item) for item in fitting]
    expected = " or ".join(dict.fromkeys(_member_kind(member) for member in members))
    return [f"{_location(loc)}: must be {expected}"]


def format_validation_error(error: ValidationError) -> str:
    """Every problem on one line each: ``input.files[3].name: Field required``; a union's
    members read as one problem (``input.resolution: must be an integer or a list of integers``)."""
    problems: list[str | tuple[int | str, ...]] = []  # a line, or where a union's problems go
    unions: dict[tuple[int | str, ...], dict[str, list[Any]]] = {}
    for item in error.errors(include_url=False):
        loc = tuple(item["loc"])
        start = 1 if loc and loc[0] in ACTIONS else 0
        at = next(
            (i for i in range(start, len(loc)) if isinstance(loc[i], str) and _UNION_MEMBER.fullmatch(loc[i])), None
        )
        if at is None:
            problems.append(_problem(item))
            continue
        if loc[:at] not in unions:
            unions[loc[:at]] = {}
            problems.append(loc[:at])
        unions[loc[:at]].setdefault(str(loc[at]), []).append({**item, "loc": loc[:at] + loc[at + 1 :]})
    lines = [
        p
        for problem in problems
        for p in ([problem] if isinstance(problem, str) else _union_problems(problem, unions[problem]))
    ]
    return "invalid input: " + "; ".join(lines)


def parse_job_input(raw: Any, settings: Settings) -> Any:
    """Validate a job's ``input`` into its action model, or raise :class:`InputError`."""
    if not isinstance(raw, dict):
        raise InputError("invalid input: input must be a JSON object with an 'action' field")
    try:
        request = _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise InputError(format_validation_error(exc)) from None
    check_limits = getattr(request, "check_limits", None)  # optional: bounds that come from settings
    if check_limits is not None:
        check_limits(settings)
    return request


def input_json_schema() -> dict[str, Any]:
    """The JSON Schema of a job's ``input`` (the API reference is generated from it)."""
    return _ADAPTER.json_schema()


async def dispatch(request: Any, ctx: JobContext) -> BaseModel:
    """Run the action named by ``request.action``."""
    return await ACTIONS[request.action](request, ctx)
