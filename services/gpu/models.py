"""Model sources and the bounded, least-recently-used pipeline cache.

A ``base_model`` is a ``builtin:tiny-*`` model (built in code), an absolute
directory holding a diffusers pipeline (``model_index.json``), or a Hugging Face repo id loaded
from the local cache only (``HF_HOME``'s hub, the default hub cache, and RunPod's cached models
at ``/runpod-volume/huggingface-cache/hub``): nothing is ever downloaded.

Pipelines stay loaded across jobs, keyed by (model, dtype, device); each entry knows its model
family (:mod:`services.gpu.families`), None for pipelines the runner only generates with. At rest a cached pipeline
is frozen (``requires_grad`` off), in eval mode, with no adapter and its default scheduler; the
training and generation paths restore that state in ``finally`` blocks. When the cache is full,
the least recently used pipeline is dropped and its GPU memory freed.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.errors import InputError
from services.gpu.catalog import (
    BUILTIN_MODELS,
    RUNPOD_HF_CACHE,
)
from services.gpu.families import ModelFamily, family_of, family_of_builtin, family_of_index
from services.gpu.quantize import QUANT_PREFIX, is_quantized, quantize_linear_layers
from services.gpu.state import RUNNER_STATE

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

    from config.settings import Settings
    from services.gpu.placement import Placement

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PipelineKey:
    """Cache key: the model name as given, the weights' dtype and the device."""

    model: str
    dtype: str
    device: str

    def __str__(self) -> str:
        return f"{self.model} ({self.dtype}, {self.device})"


@dataclass(eq=False)
class LoadedPipeline:
    """A cached pipeline and what the runner learned about it."""

    key: PipelineKey
    pipe: DiffusionPipeline
    family: ModelFamily | None
    native_size: int
    default_scheduler: Any
    placement: Placement
    compiled: Any = None  # torch.compile'd denoiser, built on first compiled use
    warm_shapes: set[tuple[Any, ...]] = field(default_factory=set)

    @property
    def denoiser_name(self) -> str:
        """``unet`` or ``transformer``: the family's, else whichever the pipeline has."""
        if self.family is not None:
            return self.family.denoiser_name
        return "unet" if getattr(self.pipe, "unet", None) is not None else "transformer"

    @property
    def quantized(self) -> bool:
        """True when the denoiser's frozen weights are NF4 (a LoRA is applied unfused)."""
        return is_quantized(self.key.dtype)

    @property
    def denoiser(self) -> torch.nn.Module:
        return getattr(self.pipe, self.denoiser_name)


class PipelineCache:
    """Least-recently-used cache of :class:`LoadedPipeline`; thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._entries: OrderedDict[PipelineKey, LoadedPipeline] = OrderedDict()

    def get(self, key: PipelineKey, capacity: int, loader: Callable[[PipelineKey], LoadedPipeline]) -> LoadedPipeline:
        """The cached pipeline for ``key``, loading it (after making room) when absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                while len(self._entries) > capacity:
                    self._drop(next(iter(self._entries)))
                self._publish()
                return entry
            while len(self._entries) >= capacity:
                self._drop(next(iter(self._entries)))
            entry = loader(key)
            self._entries[key] = entry
            self._publish()
            return entry

    def evict(self, key: PipelineKey) -> None:
        """Drop one pipeline (after a failure left it in an unknown state)."""
        with self._lock:
            if key in self._entries:
                self._drop(key)
                self._publish()

    def clear(self) -> None:
        """Drop every pipeline."""
        with self._lock:
            for key in list(self._entries):
                self._drop(key)
            self._publish()

    def loaded(self) -> list[PipelineKey]:
        """Cached keys, least recently used first."""
        with self._lock:
            return list(self._entries)

    def _drop(self, key: PipelineKey) -> None:
        entry = self._entries.pop(key)
        was_compiled = entry.compiled is not None
        entry.compiled = None
        entry.pipe = None  # type: ignore[assignment]
        del entry
        log.info("pipeline cache: evicted %s", key)
        _free_memory(reset_compiled=was_compiled)
        if was_compiled:
            for other in self._entries.values():
                other.warm_shapes.clear()

    def _publish(self) -> None:
        RUNNER_STATE.set_pipelines([str(key) for key in self._entries])


PIPELINES = PipelineCache()


def _free_memory(reset_compiled: bool = False) -> None:
    """Collect garbage and return cached CUDA blocks to the driver.

    A compiled model in reduce-overhead mode keeps its CUDA graphs' memory pool until dynamo
    is reset, so evicting one resets dynamo (other compiled pipelines recompile on next use,
    from the inductor cache).
    """
    import torch

    if reset_compiled:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --- device and dtype ---------------------------------------------------------------------

_configured: set[str] = set()


def runtime_device() -> torch.device:
    """The CUDA device when there is one, else the CPU; configures torch once per device type."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and "cuda" not in _configured:
        # TF32 for the fp32 parts; cuDNN autotuning pays off because job shapes repeat.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        _configured.add("cuda")
    return device


def inference_dtype(device: torch.device) -> torch.dtype:
    """bf16 on CUDA (no fp16 VAE overflow, shares the training weights), fp32 on the CPU."""
    import torch

    return torch.bfloat16 if device.type == "cuda" else torch.float32


# --- loading ----------------------------------------------------------------------------------


def load_pipeline(
    model: str, settings: Settings, dtype: torch.dtype, device: torch.device, quantize: bool = False
) -> LoadedPipeline:
    """The cached pipeline of ``model`` in ``dtype`` on ``device``, loading it when needed;
    with ``quantize``, its denoiser's linear layers in NF4 (:mod:`services.gpu.quantize`)."""
    name = str(dtype).removeprefix("torch.")
    key = PipelineKey(model, f"{QUANT_PREFIX}{name}" if quantize else name, str(device))
    return PIPELINES.get(key, settings.model_cache_size, lambda k: _load(k, settings, dtype, device))


def _load(key: PipelineKey, settings: Settings, dtype: torch.dtype, device: torch.device) -> LoadedPipeline:
    import torch
    from diffusers.utils import logging as diffusers_logging

    log.info("pipeline cache: loading %s", key)
    diffusers_logging.disable_progress_bar()  # bars would flood the worker's logs
    if key.model in BUILTIN_MODELS:
        from services.gpu.families import build_tiny_pipeline

        pipe = build_tiny_pipeline(key.model)  # built in fp32
        if dtype != torch.float32:
            pipe = pipe.to(dtype=dtype)
    elif key.model.startswith("/"):
        pipe = _from_directory(Path(key.model), dtype)
    else:
        pipe = _from_hf_cache(key.model, settings, dtype)
    if is_quantized(key.dtype):
        family = family_of(pipe)
        if family is None:
            raise InputError(f"input.quantize_base: {type(pipe).__name__} has no known denoiser to quantize")
        layers = quantize_linear_layers(family.denoiser(pipe), dtype, device)
        log.info("pipeline cache: %s: %d linear layers of the %s in NF4", key, layers, family.denoiser_name)
    return wrap_pipeline(pipe.to(device), key)


def wrap_pipeline(pipe: DiffusionPipeline, key: PipelineKey) -> LoadedPipeline:
    """Freeze ``pipe`` and describe it as a cache entry (used by the loader and the benchmark)."""
    import torch

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    if hasattr(getattr(pipe, "vae", None), "enable_slicing"):
        pipe.vae.enable_slicing()  # one image per VAE call: the memory plan's bound (services.gpu.memory)
    family = family_of(pipe)
    native = family.native_size(pipe) if family is not None else _native_size(pipe)
    denoiser = family.denoiser_name if family is not None else ("unet" if hasattr(pipe, "unet") else "transformer")
    from services.gpu.placement import Placement

    placement = Placement(pipe, denoiser, torch.device(key.device), denoiser_movable=not is_quantized(key.dtype))
    return LoadedPipeline(key, pipe, family, native, pipe.scheduler, placement)


def _native_size(pipe: DiffusionPipeline, fallback: int = 1024) -> int:
    """The default image side of a pipeline of no known family."""
    factor = getattr(pipe, "vae_scale_factor", 8)
    sample = getattr(pipe, "default_sample_size", None)
    if not isinstance(sample, int):
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        sample = getattr(getattr(denoiser, "config", None), "sample_size", None)
    return int(sample * factor) if isinstance(sample, int) else fallback


def peek_family(model: str, settings: Settings) -> ModelFamily | None:
    """The family of ``model`` without loading it: a builtin's, or the one its
    ``model_index.json`` names (a directory, or a repo id in the local cache); None when unknown."""
    if model in BUILTIN_MODELS:
        return family_of_builtin(model)
    if model.startswith("/"):
        index = Path(model) / "model_index.json"
    else:
        folder = "models--" + model.replace("/", "--")
        pattern = "snapshots/*/model_index.json"
        found = [i for cache in hf_cache_dirs(settings) for i in sorted((cache / folder).glob(pattern))]
        if not found:
            return None
        index = found[0]
    try:
        return family_of_index(json.loads(index.read_text(encoding="utf-8")))
    except (OSError, ValueError) as exc:
        log.info("%s: cannot read %s (%s); the loader reports it", model, index, exc)
        return None


def _load_kwargs(index: Path | None, dtype: torch.dtype) -> dict[str, Any]:
    """from_pretrained options: the dtype, and no safety checker for pipelines that ship one."""
    kwargs: dict[str, Any] = {"dtype": dtype}
    if index is not None and index.is_file():
        try:
            components = json.loads(index.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise InputError(f"input.base_model: cannot read {index}: {exc}") from exc
        family = family_of_index(components)
        log.info("%s: %s (%s)", index.parent, components.get("_class_name"), family.label if family else "no family")
        if "safety_checker" in components:
            kwargs.update(safety_checker=None, requires_safety_checker=False)
    return kwargs


def _from_pretrained(source: str, where: str, kwargs: dict[str, Any]) -> DiffusionPipeline:
    """AutoPipelineForText2Image.from_pretrained, retrying the fp16 variant, errors as InputError."""
    from diffusers import AutoPipelineForText2Image

    try:
        return AutoPipelineForText2Image.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as first:
        try:
            return AutoPipelineForText2Image.from_pretrained(source, variant="fp16", **kwargs)
        except (OSError, ValueError) as second:
            raise InputError(
                f"input.base_model: cannot load {source} from {where}: {first} (fp16 variant: {second})"
            ) from first


def _from_directory(path: Path, dtype: torch.dtype) -> DiffusionPipeline:
    index = path / "model_index.json"
    if not index.is_file():
        raise InputError(f"input.base_model: {path} is not a diffusers pipeline directory (no model_index.json there)")
    return _from_pretrained(str(path), str(path), _load_kwargs(index, dtype))


def hf_cache_dirs(settings: Settings) -> list[Path]:
    """Hub cache folders searched for repo ids, in order, without duplicates."""
    from huggingface_hub import constants

    candidates: list[Path] = []
    if settings.hf_home is not None:
        candidates.append(Path(settings.hf_home) / "hub")
    candidates.append(Path(constants.HF_HUB_CACHE))
    candidates.append(RUNPOD_HF_CACHE)
    unique: list[Path] = []
    for candidate in candidates:
        if candidate not in unique:
            unique.append(candidate)
    return unique


def _from_hf_cache(repo_id: str, settings: Settings, dtype: torch.dtype) -> DiffusionPipeline:
    folder = "models--" + repo_id.replace("/", "--")
    searched = hf_cache_dirs(settings)
    for cache in searched:
        snapshots = cache / folder / "snapshots"
        if not snapshots.is_dir():
            continue
        indexes = sorted(snapshots.glob("*/model_index.json"))
        kwargs = _load_kwargs(indexes[0] if indexes else None, dtype)
        kwargs.update(cache_dir=str(cache), local_files_only=True)
        return _from_pretrained(repo_id, str(cache), kwargs)
    looked = ", ".join(str(path) for path in searched)
    raise InputError(
        f"input.base_model: {repo_id} is not in the local Hugging Face cache (looked in {looked}); "
        "this worker never downloads models: bake the model into the image or use RunPod cached models"
    )
