"""The key layout and every name/key rule, in one place.

Layout::

    datasets/<dataset>/<file name>            training files (upload_training_files, presign_uploads)
    loras/<output_name>/<output_name>.safetensors        a trained LoRA (copies: .kohya/.diffusers.safetensors)
    loras/<output_name>/checkpoints/...       training checkpoints (step-NNNNNNNN/ folders, latest.json)
    loras/<output_name>/steps/<step>.safetensors   snapshots (save_every), with <step>-sample-<i>.png
    outputs/<job id>/<file name>              outputs too large to return inline
    leases/loras/<output_name>.json           the claim of the job writing that LoRA (not a managed root)

Rules (each raises ``ValueError`` with a message fit for the caller, or returns a problem):

* :func:`safe_name`: dataset names and LoRA output names;
* :func:`file_name_problem`: a file name inside a dataset (checked, never rewritten);
* :func:`validate_key`: any object key, as both storage backends accept it;
* :func:`managed_key`: a key the caller may read or delete (inside the roots above);
* :func:`managed_prefix`: a prefix the caller may list (the same roots);
* :func:`lora_reference`: the ``lora`` input of ``generate`` (a key or an output name).

Imports nothing from the project: storage, schemas and actions all build on it.
"""

from __future__ import annotations

import re
import unicodedata

DATASET_ROOT = "datasets"
LORA_ROOT = "loras"
OUTPUT_ROOT = "outputs"
LEASE_ROOT = "leases"  # outside MANAGED_ROOTS: callers can neither list nor delete a lease
MANAGED_ROOTS = (f"{DATASET_ROOT}/", f"{LORA_ROOT}/", f"{OUTPUT_ROOT}/")

MAX_KEY_BYTES = 1024  # S3's limit
MAX_FILE_NAME_BYTES = 255  # a file name on every common file system (the local backend)

# Control (Cc), format (Cf: bidi overrides such as U+202E, zero-width characters), line and
# paragraph separators (Zl, Zp) and lone surrogates (Cs): a name holding one displays as
# something else (``x<U+202E>gnp.exe`` shows as ``xexe.png``) or breaks headers and logs.
REFUSED_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs"})
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
_LORA_REFERENCE = re.compile(r"^[A-Za-z0-9_.\-/]{1,512}$")


def safe_name(value: str, field: str) -> str:
    """A dataset or LoRA name: letters, digits, ``-``, ``_`` and ``.``; 1..128 characters; no ``..``."""
    if not _SAFE_NAME.fullmatch(value) or ".." in value or value == ".":
        raise ValueError(f"{field} must be 1-128 letters, digits, '-', '_' or '.', without '..' or separators")
    return value


def _character_problem(text: str) -> str | None:
    for ch in text:
        category = unicodedata.category(ch)
        if category in REFUSED_CATEGORIES:
            kind = {"Cc": "control", "Cs": "lone surrogate"}.get(category, "invisible or format")
            return f"must not contain {kind} characters (U+{ord(ch):04X})"
    return None


def file_name_problem(name: str) -> str | None:
    """Why ``name`` is not a valid file name inside a dataset, or ``None`` when it is.

    Names are checked, never rewritten: what the caller sent is the key they get.
    """
    if not name:
        return "must not be empty"
    if "/" in name or "\\" in name:
        return "path separators are not allowed"
    if name in (".", "..") or ".." in name:
        return "'..' is not allowed"
    if problem := _character_problem(name):
        return problem
    if len(name.encode()) > MAX_FILE_NAME_BYTES:
        return f"longer than {MAX_FILE_NAME_BYTES} bytes"
    return None


def _key_problem(key: str) -> str | None:
    if not key:
        return "must not be empty"
    if problem := _character_problem(key):  # before encoding: a lone surrogate cannot be encoded
        return problem
    if len(key.encode()) > MAX_KEY_BYTES:
        return f"is longer than {MAX_KEY_BYTES} bytes"
    if key.startswith("/") or "\\" in key:
        return "must be relative and use '/' separators"
    if any(part in ("", ".", "..") for part in key.removesuffix("/").split("/")):
        return "must not contain empty, '.' or '..' segments"
    return None


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ``ValueError``.

    No leading or trailing ``/`` (a key ending in ``/`` names a folder on S3 consoles and
    a directory on disk, so it is a file on neither backend), no empty, ``.`` or ``..``
    segments, no backslashes, no characters of :data:`REFUSED_CATEGORIES`, at most 1024 bytes.
    """
    if problem := _key_problem(key):
        raise ValueError(f"key {problem}")
    if key.endswith("/"):
        raise ValueError("key must not end with '/': that names a folder, not a file")
    return key


def validate_prefix(prefix: str) -> str:
    """Validate a listing prefix (empty means everything; a trailing ``/`` is allowed)."""
    if prefix and (problem := _key_problem(prefix)):
        raise ValueError(f"prefix {problem}")
    return prefix


def managed_key(key: str) -> str:
    """A key inside the worker's own roots (``datasets/``, ``loras/``, ``outputs/``)."""
    validate_key(key)
    if not key.startswith(MANAGED_ROOTS):
        raise ValueError(f"must start with one of {', '.join(MANAGED_ROOTS)}")
    return key


def managed_prefix(prefix: str) -> str:
    """A listing prefix inside the worker's own roots (a trailing ``/`` is allowed here)."""
    validate_prefix(prefix)
    if not prefix.startswith(MANAGED_ROOTS):
        raise ValueError(f"must start with one of {', '.join(MANAGED_ROOTS)}")
    return prefix


def lora_reference(value: str) -> str:
    """The ``lora`` input of ``generate``: a storage key or a ``train_lora`` output name."""
    if not _LORA_REFERENCE.fullmatch(value) or ".." in value or value.startswith("/") or "//" in value:
        raise ValueError("must be a storage key or an output_name (letters, digits, '-', '_', '.', '/')")
    return value


def dataset_prefix(dataset: str) -> str:
    """``datasets/<dataset>/``."""
    return f"{DATASET_ROOT}/{safe_name(dataset, 'dataset')}/"


def dataset_key(dataset: str, name: str) -> str:
    """``datasets/<dataset>/<name>``; ``name`` must pass :func:`file_name_problem`."""
    if problem := file_name_problem(name):
        raise ValueError(f"file name {name!r}: {problem}")
    return dataset_prefix(dataset) + name


def lora_prefix(output_name: str) -> str:
    """``loras/<output_name>/``."""
    return f"{LORA_ROOT}/{safe_name(output_name, 'output_name')}/"


def lora_key(output_name: str, kohya: bool = False, copy: str | None = None) -> str:
    """Where a trained LoRA is stored: ``loras/<name>/<name>.safetensors``; a copy in another
    format at ``<name>.<format>.safetensors`` (``kohya=True``: the kohya copy)."""
    copy = "kohya" if kohya else copy
    suffix = f".{copy}.safetensors" if copy else ".safetensors"
    return f"{lora_prefix(output_name)}{output_name}{suffix}"


def lora_owner(key: str) -> str | None:
    """The output_name whose folder ``key`` lies in (``loras/<name>/...``), else None."""
    root, _, rest = key.partition("/")
    name, slash, _ = rest.partition("/")
    return name if root == LORA_ROOT and slash and _SAFE_NAME.fullmatch(name) else None


def lora_name_of(key: str) -> str | None:
    """The output_name whose LoRA file ``key`` is (``loras/<name>/<name>.safetensors``), else None."""
    root, _, rest = key.partition("/")
    name, _, file_name = rest.partition("/")
    if root != LORA_ROOT or not name or "/" in file_name or not _SAFE_NAME.fullmatch(name):
        return None
    return name if key == lora_key(name) else None


def lora_sample_grid_key(output_name: str) -> str:
    """``loras/<name>/<name>.samples.png``: a training run's samples by step (rows) and prompt (columns)."""
    return f"{lora_prefix(output_name)}{output_name}.samples.png"


def lora_checkpoint_prefix(output_name: str) -> str:
    """``loras/<output_name>/checkpoints/``: where training checkpoints of that LoRA go."""
    return f"{lora_prefix(output_name)}checkpoints/"


def checkpoint_step_prefix(output_name: str, step: int) -> str:
    """``loras/<output_name>/checkpoints/step-NNNNNNNN/``: the files of one checkpoint."""
    return f"{lora_checkpoint_prefix(output_name)}step-{step:08d}/"


def checkpoint_pointer_key(output_name: str) -> str:
    """``loras/<output_name>/checkpoints/latest.json``: the pointer to the newest checkpoint."""
    return f"{lora_checkpoint_prefix(output_name)}latest.json"


def checkpoint_finished_key(output_name: str) -> str:
    """``loras/<output_name>/checkpoints/finished.json``: the kept checkpoints' run completed."""
    return f"{lora_checkpoint_prefix(output_name)}finished.json"


def snapshots_prefix(output_name: str) -> str:
    """``loras/<output_name>/steps/``: the snapshots of a run (``save_every``)."""
    return f"{lora_prefix(output_name)}steps/"


def snapshot_key(output_name: str, step: int) -> str:
    """``loras/<output_name>/steps/<step>.safetensors``."""
    return f"{snapshots_prefix(output_name)}{step}.safetensors"


def snapshot_sample_key(output_name: str, step: int, index: int) -> str:
    """``loras/<output_name>/steps/<step>-sample-<index>.png``."""
    return f"{snapshots_prefix(output_name)}{step}-sample-{index}.png"


def lease_key(output_name: str) -> str:
    """``leases/loras/<output_name>.json``: which job writes that LoRA now (see services.durable.lease)."""
    return f"{LEASE_ROOT}/{LORA_ROOT}/{safe_name(output_name, 'output_name')}.json"


def resolve_lora_key(reference: str) -> str:
    """The key a ``lora`` input names: a key under ``loras/`` as is, a bare name via :func:`lora_key`."""
    lora_reference(reference)
    key = reference if "/" in reference else lora_key(reference)
    if not key.startswith(f"{LORA_ROOT}/"):
        raise ValueError(f"{reference} must be a key under {LORA_ROOT}/ or a train_lora output_name")
    return key


def output_key(job_id: str, name: str) -> str:
    """``outputs/<job id>/<name>``: an output too large to return inline."""
    return validate_key(f"{OUTPUT_ROOT}/{job_id}/{name}")


def caption_key(dataset: str, image_name: str) -> str:
    """``datasets/<dataset>/<image stem>.txt``: the caption beside an image (what training reads)."""
    stem = image_name.rsplit(".", 1)[0] if "." in image_name.lstrip(".") else image_name
    return dataset_key(dataset, f"{stem}.txt")


def lora_captions_key(output_name: str) -> str:
    """``loras/<output_name>/captions.json``: the captions a training run used."""
    return lora_prefix(output_name) + "captions.json"
