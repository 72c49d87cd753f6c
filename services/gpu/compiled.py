"""``torch.compile`` of a cached pipeline's denoiser: whether to compile, the persistent inductor
cache (on the network volume when there is one) and the compiled module, built once per cached
pipeline and wrapped so that its outputs leave the CUDA graph pool."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.gpu.catalog import INDUCTOR_CACHE_ON_VOLUME, RUNPOD_VOLUME

if TYPE_CHECKING:
    import torch

    from config.settings import Settings
    from services.gpu.models import LoadedPipeline

log = logging.getLogger(__name__)


def resolve_compile(setting: bool | None, device: torch.device) -> bool:
    """``COMPILE`` when set, else on with CUDA and off on the CPU."""
    return device.type == "cuda" if setting is None else setting


def compile_cache_dir(settings: Settings) -> Path | None:
    """The persistent inductor cache: ``TORCHINDUCTOR_CACHE_DIR`` when set, else a folder on
    the network volume when there is one (so the next worker starts warm), else None."""
    if settings.torchinductor_cache_dir is not None:
        return settings.torchinductor_cache_dir
    if not RUNPOD_VOLUME.is_dir():
        return None
    try:
        INDUCTOR_CACHE_ON_VOLUME.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        log.warning("cannot create the inductor cache %s (%s); compiling without it", INDUCTOR_CACHE_ON_VOLUME, exc)
        return None
    return INDUCTOR_CACHE_ON_VOLUME


def use_compile_cache(cache: Path | None) -> None:
    """Point inductor at ``cache``. Inductor reads its cache folder only from the environment
    (``torch._inductor.runtime.cache_dir_utils.cache_dir``), so this is the one place that sets it."""
    if cache is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache)


def compiled_denoiser(entry: LoadedPipeline, cache: Path | None) -> torch.nn.Module:
    """The entry's denoiser under ``torch.compile`` in reduce-overhead mode (CUDA graphs).

    The compiled module shares the plain one's parameters, so LoRA weights fused in place are
    seen without a recompile; it is built once per cached pipeline.
    """
    import torch

    if entry.compiled is None:
        use_compile_cache(cache)
        plain = entry.denoiser
        entry.compiled = _detached_outputs(torch.compile(plain, mode="reduce-overhead"), plain)
    return entry.compiled


def _detached_outputs(compiled: Any, plain: Any) -> Any:
    """Wrap ``compiled`` so that its outputs are copied out of the CUDA graph pool.

    Outputs of a CUDA graph replay are overwritten by the next replay; a scheduler that keeps
    a model output across steps (PNDM without guidance does) would read a stale buffer. One
    small copy per step removes the hazard. Attributes (``config``, ``dtype``, ...) come from
    the plain module, so the pipeline sees its usual denoiser.
    """
    import torch

    def clone(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return value.clone()
        if isinstance(value, tuple):
            return type(value)(clone(item) for item in value)
        if isinstance(value, dict):  # diffusers' BaseOutput is an ordered dict dataclass
            return type(value)(**{key: clone(item) for key, item in value.items()})
        return value

    class DetachedOutputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.compiled = compiled

        def forward(self, *args: Any, **kwargs: Any) -> Any:
            return clone(self.compiled(*args, **kwargs))

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(plain, name)

    return DetachedOutputs()
