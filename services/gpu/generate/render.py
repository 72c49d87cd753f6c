"""Image generation: ``generate_images`` (the ``generate`` action) and the core ``render``.

The same inputs and seed give the same images on the same device: image ``i`` starts from a
CPU generator seeded with ``seed + i``. A job's LoRA and scheduler are set for that job only
(:func:`services.gpu.adapters.fused_lora`, :func:`scheduler_for`). With compilation on, the
denoiser runs through ``torch.compile`` in reduce-overhead mode; the first call for each new
shape compiles, and its time is recorded as a warm-up (``gpu_info``).

Defaults: ``steps`` and ``guidance_scale`` left out come from the model variant
(:meth:`ModelFamily.variant`: FLUX.1-schnell 4 steps at guidance 0 with T5 length 256,
FLUX.1-dev 28 at 3.5, Z-Image-Turbo 9 at 0, Z-Image 50 at 4, SD/SDXL 25 at the pipeline's own);
a caller's values win. The result reports the values used.

Progress and stop: after every denoising step (diffusers' ``callback_on_step_end``) the job's
``progress(update, final=False)`` gets ``{"step", "total_steps"}`` (the last step
with ``final=True``; the caller throttles the others) and the job's
:class:`~services.job.stop.StopSignal` is checked; a set signal raises :class:`JobStopped` out of
the pipeline, and the ``finally`` blocks put the cached pipeline back at rest (LoRA weights
restored, adapter removed, scheduler and denoiser back).
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.errors import InputError
from services.gpu import compiled, models
from services.gpu.adapters import fused_lora
from services.gpu.catalog import check_pixels
from services.gpu.encode import encode_image
from services.gpu.guard import gpu_errors
from services.gpu.state import RUNNER_STATE
from services.gpu.types import GenerateResult

if TYPE_CHECKING:
    from PIL import Image

    from config.settings import Settings
    from services.gpu.families.base import Variant
    from services.gpu.models import LoadedPipeline
    from services.gpu.params import GenerateInput
    from services.gpu.train.loop import Progress
    from services.job.stop import StopSignal

log = logging.getLogger(__name__)

# scheduler name -> (diffusers class, extra config)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


@dataclass(frozen=True)
class GenerationRequest:
    """What to render; sizes already resolved (see :func:`generate_images`)."""

    prompt: str
    width: int
    height: int
    seed: int
    steps: int | None = None  # None: the model variant's
    num_images: int = 1
    negative_prompt: str | None = None
    guidance_scale: float | None = None
    scheduler: str = "default"
    lora_scale: float = 1.0


DEFAULT_STEPS = 25  # a pipeline of no known family


def variant_of(entry: LoadedPipeline) -> Variant | None:
    """The loaded model's variant (generation defaults); None for a pipeline of no known family."""
    return None if entry.family is None else entry.family.variant(entry.pipe, entry.key.model)


def pipeline_guidance(pipe: Any) -> float | None:
    """The ``guidance_scale`` default of the pipeline's ``__call__`` (None when it takes none)."""
    parameter = inspect.signature(pipe.__call__).parameters.get("guidance_scale")
    default = None if parameter is None else parameter.default
    return float(default) if isinstance(default, int | float) else None


def with_defaults(entry: LoadedPipeline, request: GenerationRequest, max_steps: int | None = None) -> GenerationRequest:
    """``request`` with its steps and guidance resolved: the caller's, else the variant's
    (steps within ``max_steps``), else the pipeline's own guidance."""
    variant = variant_of(entry)
    steps = request.steps
    if steps is None:
        steps = variant.steps if variant is not None else DEFAULT_STEPS
        steps = min(steps, max_steps) if max_steps is not None else steps
    guidance = request.guidance_scale
    if guidance is None:
        guidance = variant.guidance if variant is not None and variant.guidance is not None else None
        guidance = pipeline_guidance(entry.pipe) if guidance is None else guidance
    return dataclasses.replace(request, steps=steps, guidance_scale=guidance)


# One image's pixels the CPU renders in minutes (no GPU: local runs). Stops are checked between
# steps, and a 2048x2048 image on the CPU spent 13 minutes inside its first step.
CPU_MAX_IMAGE_PIXELS = 768 * 768


def check_cpu_pixels(width: int, height: int, device_type: str) -> None:
    """Refuse an image size the CPU cannot finish in reasonable time (:data:`CPU_MAX_IMAGE_PIXELS`)."""
    if device_type == "cpu" and width * height > CPU_MAX_IMAGE_PIXELS:
        raise InputError(
            f"input.width: {width}x{height} is too large to generate on the CPU (this worker has no GPU): "
            f"at most {CPU_MAX_IMAGE_PIXELS} pixels per image, e.g. 768x768 or 1024x576"
        )


def generate_images(
    params: GenerateInput,
    lora_path: Path | None,
    settings: Settings,
    progress: Progress | None = None,
    stop: StopSignal | None = None,
) -> GenerateResult:
    """Render ``params.num_images`` images; sync (run it in a worker thread under the GPU lock)."""
    seed = params.seed if params.seed is not None else secrets.randbelow(2**32)
    with gpu_errors("generate"):
        device = models.runtime_device()
        model = params.base_model or settings.model_id
        quantize = params.quantize_base == "nf4"
        entry = models.load_pipeline(model, settings, models.inference_dtype(device), device, quantize=quantize)
        entry.placement.set_offload(bool(params.cpu_offload))
        width = params.width or entry.native_size
        height = params.height or entry.native_size
        check_pixels(width, height, settings.max_image_pixels)
        check_cpu_pixels(width, height, device.type)
        request = GenerationRequest(
            prompt=params.prompt,
            width=width,
            height=height,
            seed=seed,
            steps=params.steps,
            num_images=params.num_images,
            negative_prompt=params.negative_prompt,
            guidance_scale=params.guidance_scale,
            scheduler=params.scheduler,
            lora_scale=params.lora_scale,
        )
        request = with_defaults(entry, request, settings.max_gen_steps)
        # Under cpu_offload the denoiser leaves the device while T5 runs: CUDA graphs captured at
        # its old addresses would re-record every call, so it runs eager.
        compile = compiled.resolve_compile(settings.compile, device) and not entry.placement.moves_denoiser
        cache = compiled.compile_cache_dir(settings) if compile else None
        images = render(entry, request, lora_path, compile=compile, cache=cache, progress=progress, stop=stop)
    files = [encode_image(image, f"image-{i}", params.format, params.quality) for i, image in enumerate(images)]
    return GenerateResult(images=files, seed=seed, steps=request.steps, guidance_scale=request.guidance_scale)


def render(
    entry: LoadedPipeline,
    request: GenerationRequest,
    lora_path: Path | None,
    *,
    compile: bool,
    cache: Path | None = None,
    progress: Progress | None = None,
    stop: StopSignal | None = None,
) -> list[Image.Image]:
    """Run the pipeline for one request with its LoRA and scheduler; returns PIL images.
    Steps and guidance left out take the variant's defaults (:func:`with_defaults`)."""
    request = with_defaults(entry, request)
    kwargs = _call_kwargs(entry, request)
    if progress is not None or stop is not None:
        kwargs["callback_on_step_end"] = step_callback(request.steps or DEFAULT_STEPS, progress, stop)
    if stop is not None:
        stop.check("generate before the first step")
    with (
        scheduler_for(entry, request.scheduler),
        fused_lora(entry, lora_path, request.lora_scale),
        _denoiser(entry, compile, cache) as first_call,
    ):
        started = time.perf_counter()
        try:
            output = entry.pipe(**kwargs)
        finally:
            entry.placement.release()  # the encoders and the VAE that came to the device (cpu_offload)
        if first_call(request):
            seconds = time.perf_counter() - started
            RUNNER_STATE.record_warmup(
                f"generate {entry.key.model} {request.num_images}x{request.width}x{request.height}", seconds
            )
            log.info("compile warm-up for %s: %.1f s", entry.key, seconds)
    return list(output.images)


def step_callback(
    steps: int, progress: Progress | None, stop: StopSignal | None
) -> Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]:
    """diffusers' ``callback_on_step_end``: report the step, then stop if asked."""

    def on_step_end(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> dict[str, Any]:
        done = index + 1
        total = getattr(pipe, "num_timesteps", None) or steps  # Heun and friends take more
        if progress is not None:
            progress({"step": done, "total_steps": total}, final=done >= total)
        if stop is not None and done < total:
            stop.check(f"generate at step {done} of {total}")
        return {}

    return on_step_end


def _call_kwargs(entry: LoadedPipeline, request: GenerationRequest) -> dict[str, Any]:
    import torch

    accepted = inspect.signature(entry.pipe.__call__).parameters
    kwargs: dict[str, Any] = {
        "prompt": request.prompt,
        "width": request.width,
        "height": request.height,
        "num_inference_steps": request.steps,
        "num_images_per_prompt": request.num_images,
        "generator": [torch.Generator("cpu").manual_seed(request.seed + i) for i in range(request.num_images)],
        "output_type": "pil",
    }
    if request.negative_prompt:
        if "negative_prompt" not in accepted:
            raise InputError(f"input.negative_prompt: {type(entry.pipe).__name__} does not take one")
        kwargs["negative_prompt"] = request.negative_prompt
    if request.guidance_scale is not None and "guidance_scale" in accepted:
        kwargs["guidance_scale"] = request.guidance_scale
    variant = variant_of(entry)
    if variant is not None and variant.max_sequence_length and "max_sequence_length" in accepted:
        kwargs["max_sequence_length"] = variant.max_sequence_length
    return kwargs


@contextmanager
def scheduler_for(entry: LoadedPipeline, name: str) -> Iterator[None]:
    """Swap the pipeline's scheduler for this job (``default`` keeps the model's own)."""
    if name == "default":
        yield
        return
    import diffusers

    class_name, extra = SCHEDULERS[name]
    default = entry.default_scheduler
    compatible = {cls.__name__ for cls in getattr(default, "compatibles", [])} | {type(default).__name__}
    if class_name not in compatible:
        raise InputError(f"input.scheduler: {name} does not work with {type(entry.pipe).__name__}; use 'default'")
    entry.pipe.scheduler = getattr(diffusers, class_name).from_config(default.config, **extra)
    try:
        yield
    finally:
        entry.pipe.scheduler = default


@contextmanager
def _denoiser(entry: LoadedPipeline, compile: bool, cache: Path | None) -> Iterator[Any]:
    """Swap in the compiled denoiser for the call; yields ``first_call(request) -> bool``."""
    if not compile:
        yield lambda _request: False
        return
    name = entry.denoiser_name
    plain = getattr(entry.pipe, name)
    setattr(entry.pipe, name, compiled.compiled_denoiser(entry, cache))

    def first_call(request: GenerationRequest) -> bool:
        shape = (request.num_images, request.width, request.height, request.guidance_scale)
        if shape in entry.warm_shapes:
            return False
        entry.warm_shapes.add(shape)
        return True

    try:
        yield first_call
    finally:
        setattr(entry.pipe, name, plain)
