"""``train_lora`` and ``generate``: storage in and out around the GPU runner.

The runner (``services.gpu``) is synchronous and imports torch; it runs in a worker
thread under the GPU lock, so the event loop keeps serving storage jobs meanwhile.
"""

from __future__ import annotations

from pathlib import Path

from services.context import JobContext, gpu_lock
from services.datasets import fetch_dataset
from services.errors import InputError, ObjectNotFound
from services.gpu.params import GenerateInput, TrainLoraInput
from services.keys import lora_key, resolve_lora_key
from services.outputs import OutputFile
from services.results import GenerateResult, TrainLoraResult


async def train_lora(request: TrainLoraInput, ctx: JobContext) -> TrainLoraResult:
    """Train, store the LoRA under ``loras/<output_name>/``, return it with samples and metrics."""
    from services.gpu.train_job import train_lora as run_training

    dataset_dir = await fetch_dataset(request, ctx)
    out_dir = ctx.workspace / "train"
    out_dir.mkdir()
    async with gpu_lock():
        result = await ctx.in_thread(
            "training", run_training, request, dataset_dir, out_dir, ctx.settings, ctx.progress, ctx.stop
        )
    ctx.stage = "storing the LoRA"
    key = lora_key(request.output_name)
    await ctx.storage.put_file(key, result.lora_path, content_type="application/octet-stream")
    response = TrainLoraResult(
        lora=OutputFile.from_path(key.rsplit("/", 1)[1], result.lora_path, "application/octet-stream", key=key),
        samples=[OutputFile.from_bytes(s.name, s.data, s.mime) for s in result.samples],
        metrics=result.metrics,
    )
    if result.kohya_path is not None:
        kohya = lora_key(request.output_name, kohya=True)
        await ctx.storage.put_file(kohya, result.kohya_path, content_type="application/octet-stream")
        response.kohya_lora = OutputFile.from_path(
            kohya.rsplit("/", 1)[1], result.kohya_path, "application/octet-stream", key=kohya
        )
    return response


async def _fetch_lora(request: GenerateInput, ctx: JobContext) -> Path | None:
    path = ctx.workspace / "lora.safetensors"
    if request.lora_url:
        from services.fetch import download

        await download(request.lora_url, path, ctx.settings, expect="any")
        return path
    if not request.lora:
        return None
    try:
        key = resolve_lora_key(request.lora)
    except ValueError as exc:
        raise InputError(f"input.lora: {exc}") from None
    try:
        await ctx.storage.download_file(key, path)
    except ObjectNotFound:
        raise InputError(f"input.lora: no LoRA stored at {key}") from None
    return path


async def generate(request: GenerateInput, ctx: JobContext) -> GenerateResult:
    """Generate images (with the job's LoRA, if any); images go through the output policy."""
    from services.gpu.generate import generate_images

    ctx.stage = "downloading the LoRA"
    lora_path = await _fetch_lora(request, ctx)
    async with gpu_lock():
        result = await ctx.in_thread(
            "generating", generate_images, request, lora_path, ctx.settings, ctx.progress, ctx.stop
        )
    return GenerateResult(
        images=[OutputFile.from_bytes(i.name, i.data, i.mime) for i in result.images],
        seed=result.seed,
    )
