"""``lora-worker`` (or ``python -m client``): the worker from the command line.

    export RUNPOD_API_KEY=...  RUNPOD_ENDPOINT_ID=...      # or: --local http://localhost:8000
    lora-worker health
    lora-worker upload ./photos --dataset cats
    lora-worker ls --dataset cats
    lora-worker train --dataset cats --output-name cat-lora --steps 800 --param trigger_word=sks
    lora-worker generate --prompt "a photo of sks cat" --lora cat-lora --num-images 2 --out out/
    lora-worker get loras/cat-lora/cat-lora.safetensors --out .
    lora-worker caption --dataset cats --trigger-word sks         # .txt captions beside the images
    lora-worker plan --base-model black-forest-labs/FLUX.1-dev --gpu-memory-gb 24   # will it fit?

Progress bars go to stderr, results to stdout (``--json`` for machine-readable output). Ctrl-C
(SIGINT) or a SIGTERM cancels the running job on the endpoint. A command started with SIGINT ignored (a ``&``
job of a non-interactive shell, so the terminal's Ctrl-C is meant for the foreground) keeps
ignoring it, as Python and every POSIX tool do; ``nohup`` ignores only SIGHUP. Exit status: 0
done, 1 a job or a file failed, 2 bad usage or configuration, 3 ``plan``: the job does not fit,
130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from client.api import WorkerClient
from client.cli_args import build_parser
from client.errors import ClientError, JobFailed, JobInterrupted
from client.progress import FileBar, StepBar
from client.uploads import REQUEST_LIMIT_BYTES

EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_DOES_NOT_FIT = 3  # plan: the job fits no plan on the card
EXIT_INTERRUPTED = 130


def make_client(args: argparse.Namespace, parser: argparse.ArgumentParser) -> WorkerClient:
    options = {
        "timeout": args.timeout,
        "poll_interval": args.poll_interval,
        "request_timeout": args.request_timeout,
        "allowed_hosts": args.allow_host,
    }
    if args.command == "upload":
        if not 0 < args.inline_budget <= REQUEST_LIMIT_BYTES:
            parser.error(f"--inline-budget must be between 1 and {REQUEST_LIMIT_BYTES}")
        if not args.folder.is_dir():
            parser.error(f"{args.folder} is not a folder")
        options |= {"inline_budget": args.inline_budget, "max_files_per_batch": max(1, args.batch_files)}
    if args.command == "train" and args.max_resumes < 0:
        parser.error("--max-resumes must be 0 or more")
    if args.local and args.endpoint:
        parser.error("give --endpoint or --local, not both")
    try:
        if args.local:
            return WorkerClient.for_local(args.local, **options)
        return WorkerClient.for_endpoint(args.endpoint, **options)
    except ClientError as exc:
        parser.error(str(exc))


def _emit(args: argparse.Namespace, data: Any, lines: list[str]) -> None:
    if args.json:
        print(json.dumps(data, indent=2, default=str))
    else:
        for line in lines:
            print(line)


def cmd_health(worker: WorkerClient, args: argparse.Namespace) -> int:
    print(json.dumps(worker.health(), indent=2))
    return 0


def cmd_upload(worker: WorkerClient, args: argparse.Namespace) -> int:
    with FileBar(f"upload {args.dataset}", disable=args.quiet) as bar:
        report = worker.upload_dataset(args.folder, args.dataset, on_progress=bar)
    lines = [
        f"dataset {report.dataset}: {len(report.uploaded)} uploaded ({report.presigned} through presigned URLs, "
        f"{report.batches} inline batches), {len(report.skipped)} skipped, {len(report.failed)} failed, "
        f"{len(report.ignored)} ignored"
    ]
    lines += [f"  skipped {item.get('name')}: {item.get('reason', '')}" for item in report.skipped]
    lines += [f"  ignored {item['name']}: {item['reason']}" for item in report.ignored]
    lines += [f"  FAILED {item.get('name')}: {item.get('error', '')}" for item in report.failed]
    lines += [f"  worker: {summary}" for summary in report.summaries]
    _emit(args, report.to_dict(), lines)
    if not report.ok:
        names = ", ".join(str(item.get("name")) for item in report.failed)
        print(f"error: upload to dataset {report.dataset}: {len(report.failed)} files failed: {names}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def cmd_ls(worker: WorkerClient, args: argparse.Namespace) -> int:
    files = worker.list_files(dataset=args.dataset, prefix=args.prefix)
    total = sum(int(f.get("size") or 0) for f in files)
    lines = [f"{f.get('size', 0):>12}  {f.get('key')}" for f in files]
    lines.append(f"{len(files)} files, {total} bytes")
    _emit(args, files, lines)
    return 0


def cmd_get(worker: WorkerClient, args: argparse.Namespace) -> int:
    path = worker.get_file(args.key, args.out)
    _emit(args, {"key": args.key, "path": str(path)}, [str(path)])
    return 0


def cmd_rm(worker: WorkerClient, args: argparse.Namespace) -> int:
    if [bool(args.keys), bool(args.dataset), bool(args.lora)].count(True) != 1:
        print("error: give keys, --dataset or --lora (one of them)", file=sys.stderr)
        return EXIT_USAGE
    result = worker.delete_files(keys=args.keys or None, dataset=args.dataset, lora=args.lora)
    failed = result.get("failed") or []
    lines = [f"deleted {key}" for key in result.get("deleted", [])]
    lines += [f"FAILED {item.get('key')}: {item.get('error')}" for item in failed]
    _emit(args, result, lines)
    return EXIT_FAILED if failed else 0


def _local_note(worker: WorkerClient, bar: StepBar) -> None:
    if worker.transport.blocking_status:
        bar.note("the local server runs the job inside one status call: no step progress until it ends")


def cmd_train(worker: WorkerClient, args: argparse.Namespace) -> int:
    params = {
        "steps": args.steps,
        "base_model": args.base_model,
        "trigger_word": args.trigger_word,
        "rank": args.rank,
        "resolution": args.resolution,
        **dict(args.param),
    }
    with StepBar(f"train {args.output_name}", disable=args.quiet) as bar:
        _local_note(worker, bar)

        def resumed(number: int, failure: JobFailed) -> None:
            bar.note(f"{failure}")
            bar.note(f"resubmitting the same input to resume ({number} of at most {args.max_resumes})")

        try:
            result = worker.train(
                args.dataset,
                args.output_name,
                dest=args.out,
                on_progress=bar,
                auto_resume=args.auto_resume,
                max_resumes=args.max_resumes,
                on_resume=resumed,
                **params,
            )
        except JobFailed as failure:
            if failure.resumable and not args.auto_resume:
                raise JobFailed(f"{failure} (--no-resume: run the same command again to resume)") from failure
            raise
    data = {
        "lora": str(result.lora),
        "key": result.key,
        "kohya_lora": str(result.kohya_lora) if result.kohya_lora else None,
        "samples": [str(p) for p in result.samples],
        "metrics": result.metrics,
        "resumed_from_step": result.resumed_from_step,
        "resubmissions": result.resubmissions,
    }
    lines = [f"LoRA saved to {result.lora}" + (f" (stored as {result.key})" if result.key else "")]
    if result.resumed_from_step:
        lines.append(
            f"resumed from step {result.resumed_from_step} (after {result.resubmissions} resubmission"
            + ("s)" if result.resubmissions > 1 else ")")
            if result.resubmissions
            else f"resumed from step {result.resumed_from_step} (a checkpoint of an earlier run)"
        )
    if result.kohya_lora:
        lines.append(f"Kohya LoRA saved to {result.kohya_lora}")
    lines += [f"sample saved to {p}" for p in result.samples]
    if result.metrics:
        lines.append("metrics: " + json.dumps(result.metrics))
    _emit(args, data, lines)
    return 0


def cmd_generate(worker: WorkerClient, args: argparse.Namespace) -> int:
    params = {
        "negative_prompt": args.negative_prompt,
        "lora": args.lora,
        "num_images": args.num_images,
        "steps": args.steps,
        "width": args.width,
        "height": args.height,
        "seed": args.seed,
        "base_model": args.base_model,
        "format": args.format,
        **dict(args.param),
    }
    with StepBar("generate", disable=args.quiet) as bar:
        _local_note(worker, bar)
        result = worker.generate(args.prompt, out_dir=args.out, on_progress=bar, **params)
    _emit(
        args,
        {"images": [str(p) for p in result.images], "seed": result.seed},
        [str(p) for p in result.images] + [f"seed {result.seed}"],
    )
    return 0


def cmd_caption(worker: WorkerClient, args: argparse.Namespace) -> int:
    """Captions written go to stdout (``image: caption``); images that failed to stderr, exit 1."""
    options = {"trigger_word": args.trigger_word, "detail": args.detail, "overwrite": args.overwrite}
    with StepBar(f"caption {args.dataset}", disable=args.quiet) as bar:
        _local_note(worker, bar)
        report = worker.caption_dataset(args.dataset, out_dir=args.out, on_progress=bar, **options, **dict(args.param))
    lines = [f"{entry['image']}: {entry['caption']}" for entry in report.captions]
    lines.append(f"{len(report.captions)} captioned, {len(report.skipped)} had a caption, {len(report.failed)} failed")
    if report.captions_file is not None:
        lines.append(f"every caption: {args.out}/{report.captions_file.name}")
    data = {"captions": report.captions, "skipped": report.skipped, "failed": report.failed}
    _emit(args, {**data, "partial": report.partial}, lines)
    for problem in report.failed:
        print(f"failed: {problem['image']}: {problem['reason']}", file=sys.stderr)
    return EXIT_FAILED if report.failed else 0


def cmd_plan(worker: WorkerClient, args: argparse.Namespace) -> int:
    """The dry run; exit status 3 when the job does not fit the card (1: the dry run failed)."""
    action = "generate" if args.generate else "train_lora"
    if args.generate:
        sizes = {"width": args.width or args.resolution, "height": args.height or args.resolution}
    elif args.width or args.height:
        raise ValueError("--width and --height plan a --generate job; a training job takes --resolution")
    else:
        sizes = {"resolution": args.resolution}
    params = {"base_model": args.base_model, "gpu_memory_gb": args.gpu_memory_gb, **sizes, **dict(args.param)}
    answer = worker.plan(action, **params)
    lines = [f"{action} on {'this worker' if answer.card_gib is None else f'{answer.card_gib:g} GiB'}: "]
    if answer.plan is not None:
        lines[0] += f"fits with {_settings(answer.plan)}"
    else:
        lines[0] += "no GPU to plan for (give --gpu-memory-gb)" if answer.fits is None else "does not fit"
    if answer.message:
        lines.append(answer.message)
    for card, plan in answer.cards.items():
        lines.append(f"  {card} GB: " + (_settings(plan) if plan.get("fits") else "does not fit"))
    data = {"fits": answer.fits, "card_gib": answer.card_gib, "plan": answer.plan, "message": answer.message}
    _emit(args, {**data, "cards": answer.cards}, lines)
    return EXIT_DOES_NOT_FIT if answer.fits is False else 0


def _settings(plan: dict[str, Any]) -> str:
    """``quantize_base nf4, gradient_checkpointing on, cpu_offload off: peak 16.8 GiB (19.5 with the margin)``"""
    parts = []
    for name in ("quantize_base", "gradient_checkpointing", "cpu_offload"):
        value = plan.get(name)
        if value is not None:
            parts.append(f"{name} {'on' if value is True else 'off' if value is False else value}")
    peak, needed = plan.get("peak_gib"), plan.get("needed_gib")
    return ", ".join(parts) + f": peak {peak} GiB ({needed} with the margin)"


COMMANDS: dict[str, Callable[[WorkerClient, argparse.Namespace], int]] = {
    "health": cmd_health,
    "upload": cmd_upload,
    "ls": cmd_ls,
    "get": cmd_get,
    "rm": cmd_rm,
    "train": cmd_train,
    "generate": cmd_generate,
    "caption": cmd_caption,
    "plan": cmd_plan,
}


def _stop_like_ctrl_c(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    worker = make_client(args, parser)  # a usage or configuration error exits here (status 2)
    level = logging.DEBUG if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    logging.getLogger("urllib3").setLevel(max(level, logging.INFO))
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)  # a kill cancels the remote job as Ctrl-C does
    try:
        with worker:
            return COMMANDS[args.command](worker, args)
    except JobInterrupted as stop:
        print(f"interrupted: {stop.action}: {stop.cancel}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # Piped into `head` and the reader left: not an error. Point stdout at devnull so the
        # interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILED
    except (ClientError, OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_FAILED
