"""The ``lora-worker`` command line: every option of every command (:func:`build_parser`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from client.api import DEFAULT_MAX_RESUMES
from client.hosts import ALLOW_HOSTS_ENV
from client.uploads import DEFAULT_INLINE_BUDGET, DEFAULT_MAX_FILES_PER_BATCH, REQUEST_LIMIT_BYTES

PROG = "lora-worker"
EXIT_TEXT = (
    "Exit status: 0 done, 1 a job or a file failed, 2 bad usage or configuration, 3 plan: the job does not "
    "fit, 130 interrupted "
    "(Ctrl-C cancels the running job on the endpoint)."
)


def parse_param(text: str) -> tuple[str, Any]:
    """``key=value``; the value is read as JSON when it parses (``8``, ``true``, ``["a"]``), else text."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw
    return key, value


def _connection_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """The same options on the main parser and on every command (so they go before or after it)."""
    default: Any = None if top else argparse.SUPPRESS

    def add(*names: str, **kwargs: Any) -> None:
        value = kwargs.pop("default", None)
        parser.add_argument(*names, default=value if top else default, **kwargs)

    add("--endpoint", metavar="ID", help="RunPod endpoint id (default: RUNPOD_ENDPOINT_ID; key: RUNPOD_API_KEY)")
    add("--local", metavar="URL", help="use the local test server instead, e.g. http://localhost:8000")
    add("--timeout", type=float, metavar="S", default=3600.0, help="seconds to wait for a job (default 3600)")
    add("--request-timeout", type=float, metavar="S", default=60.0, help="seconds per HTTP request (default 60)")
    add("--poll-interval", type=float, metavar="S", default=2.0, help="seconds between status polls (default 2)")
    add(
        "--allow-host",
        action="append",
        metavar="HOST",
        default=[],
        help="also download from / upload to this storage host (repeat it; '.example.com' allows its "
        f"subdomains); the endpoint's host and AWS S3 are always allowed; also {ALLOW_HOSTS_ENV}",
    )
    add("--json", action="store_true", default=False, help="print results as JSON on stdout")
    add("-q", "--quiet", action="store_true", default=False, help="no progress bars or messages on stderr")
    add("-v", "--verbose", action="store_true", default=False, help="log each request and batch on stderr")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Client of the RunPod LoRA worker: upload datasets, train, generate, fetch files "
        "(also runs as 'python -m client').",
        epilog=f"{EXIT_TEXT} Run '%(prog)s COMMAND --help' for a command's options.",
    )
    _connection_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=text, description=text, epilog=EXIT_TEXT)
        _connection_options(sub, top=False)
        return sub

    command("health", "show the worker's storage backend, GPU and versions")
    _upload_options(command("upload", "upload a folder of images and .txt captions as a training dataset"))
    _storage_commands(command)
    _train_options(
        command(
            "train", "train a LoRA and download it; resubmits the job while the worker stops with a resumable error"
        )
    )
    _generate_options(command("generate", "generate images and save them"))
    _caption_options(command("caption", "caption a dataset's images that have no .txt caption (stored beside them)"))
    _plan_options(
        command("plan", "ask whether a train or generate job fits a card (nothing runs; exit status 3: it does not)")
    )
    return parser


def _upload_options(upload: argparse.ArgumentParser) -> None:
    upload.add_argument("folder", type=Path, help="folder whose images and .txt captions are uploaded")
    upload.add_argument("--dataset", required=True, help="dataset name (letters, digits, '-', '_', '.')")
    upload.add_argument(
        "--inline-budget",
        type=int,
        default=DEFAULT_INLINE_BUDGET,
        metavar="BYTES",
        help=f"JSON bytes per inline batch (default {DEFAULT_INLINE_BUDGET}, at most {REQUEST_LIMIT_BYTES}); "
        "larger files go through presigned URLs",
    )
    upload.add_argument(
        "--batch-files",
        type=int,
        default=DEFAULT_MAX_FILES_PER_BATCH,
        metavar="N",
        help=f"at most N files per inline batch (default {DEFAULT_MAX_FILES_PER_BATCH})",
    )


def _storage_commands(command: Callable[[str, str], argparse.ArgumentParser]) -> None:
    """``ls``, ``get`` and ``rm``."""
    listing = command("ls", "list the files of a dataset or under a prefix")
    where = listing.add_mutually_exclusive_group(required=True)
    where.add_argument("--dataset", help="list datasets/<name>/")
    where.add_argument("--prefix", help="list every key under this prefix, e.g. loras/ or outputs/")

    get = command("get", "download one stored file")
    get.add_argument("key", help="e.g. loras/my-lora/my-lora.safetensors")
    get.add_argument("--out", default=".", help="file or folder to save into (default: .)")

    remove = command("rm", "delete stored files, a whole dataset, or a LoRA")
    remove.add_argument("keys", nargs="*", help="keys to delete")
    remove.add_argument("--dataset", help="delete every file of this dataset")
    remove.add_argument("--lora", help="delete this LoRA with its checkpoints and snapshots (loras/<name>/)")


def _train_options(train: argparse.ArgumentParser) -> None:
    train.add_argument("--dataset", required=True, help="the dataset to train on (see 'upload')")
    train.add_argument("--output-name", required=True, help="LoRA name; stored under loras/<name>/")
    train.add_argument("--steps", type=int, help="optimizer steps (default: the worker's)")
    train.add_argument("--base-model", help="builtin:tiny-sd, a cached Hugging Face repo id, ... (default: MODEL_ID)")
    train.add_argument("--trigger-word", help="prepended to every caption that lacks it")
    train.add_argument("--rank", type=int, help="LoRA rank (default: the worker's)")
    train.add_argument("--resolution", type=int, help="training resolution in pixels (default: the worker's)")
    train.add_argument("--out", help="file or folder for the .safetensors (default: .)")
    train.add_argument(
        "--no-resume",
        dest="auto_resume",
        action="store_false",
        help="do not resubmit when the worker stops with a [resumable] error (deadline, cancel, "
        "shutdown: a checkpoint was saved); fail instead. To start over rather than resume: --param resume=false",
    )
    train.add_argument(
        "--max-resumes",
        type=int,
        default=DEFAULT_MAX_RESUMES,
        metavar="N",
        help=f"resubmit at most N times (default {DEFAULT_MAX_RESUMES}); --timeout applies to each job",
    )
    _param_option(train, "train_lora")


def _generate_options(generate: argparse.ArgumentParser) -> None:
    generate.add_argument("--prompt", required=True, help="what to generate")
    generate.add_argument("--negative-prompt", help="what to steer away from")
    generate.add_argument("--lora", help="a train_lora output_name or a loras/... key")
    generate.add_argument("--num-images", type=int, help="images in one job (default: the worker's)")
    generate.add_argument("--steps", type=int, help="denoising steps (default: the worker's)")
    generate.add_argument("--width", type=int, help="image width in pixels")
    generate.add_argument("--height", type=int, help="image height in pixels")
    generate.add_argument("--seed", type=int, help="image i uses seed + i (default: random, printed)")
    generate.add_argument("--base-model", help="the model to generate with (default: MODEL_ID)")
    generate.add_argument("--format", choices=("png", "jpeg", "webp"), help="image format (default: png)")
    generate.add_argument("--out", default=".", help="folder to save the images into (default: .)")
    _param_option(generate, "generate", "guidance_scale=3.5 or scheduler=euler")


def _caption_options(caption: argparse.ArgumentParser) -> None:
    caption.add_argument("--dataset", required=True, help="the dataset whose images are captioned (see 'upload')")
    caption.add_argument("--trigger-word", help="put into every caption (see --param trigger_placement=end)")
    caption.add_argument("--detail", choices=("short", "detailed"), help="one sentence (default) or a paragraph")
    caption.add_argument(
        "--overwrite", action="store_true", default=None, help="caption images that have a caption too (replaced)"
    )
    caption.add_argument("--out", default=".", help="folder for captions.json when the worker sends it (default: .)")
    _param_option(caption, "caption_dataset", "prefix='a photo of' or max_length=200")


def _plan_options(plan: argparse.ArgumentParser) -> None:
    plan.add_argument("--generate", action="store_true", help="plan a generate job (default: a train_lora job)")
    plan.add_argument("--base-model", help="e.g. black-forest-labs/FLUX.1-dev (default: the worker's MODEL_ID)")
    plan.add_argument(
        "--gpu-memory-gb",
        type=_gigabytes,
        metavar="GB",
        help="the card to plan for, e.g. 24, 32, 48, 80, 141 (default: the worker's GPU)",
    )
    plan.add_argument("--resolution", type=int, help="the side in pixels (training; generate: both sides)")
    plan.add_argument("--width", type=int, help="generate: image width in pixels (default: --resolution)")
    plan.add_argument("--height", type=int, help="generate: image height in pixels (default: --resolution)")
    _param_option(plan, "train_lora or generate", "quantize_base=none or batch_size=4")


def _gigabytes(text: str) -> float:
    """A card's memory: a finite number above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of GiB, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of GiB above 0, got {text!r}")
    return value


def _param_option(parser: argparse.ArgumentParser, action: str, example: str = "") -> None:
    example = example or 'learning_rate=5e-5 or export_formats=\'["diffusers","kohya"]\''
    parser.add_argument(
        "--param",
        action="append",
        type=parse_param,
        default=[],
        metavar="KEY=VALUE",
        help=f"any other {action} field, e.g. {example} (values are JSON when they parse, else text)",
    )
