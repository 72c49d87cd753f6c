"""When training compiles the denoiser (``torch.compile``), and what a warm inductor cache changes.

With ``COMPILE`` unset, training compiles on a GPU only when the job is long enough to earn the
warm-up back (:data:`TRAIN_COMPILE_MIN_STEPS`; fewer when an earlier worker left the inductor
cache warm on the network volume, which a marker file beside the cache records);
``COMPILE=true`` always compiles and ``COMPILE=false`` never does.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

# Measured on an H200 (REFERENCE.md): compile saves ~0.066 s/step at SD1.5 512 px batch 4
# after a ~156 s cold warm-up, so it pays from ~2400 steps; with a warm cache far sooner.
TRAIN_COMPILE_MIN_STEPS = 2500
TRAIN_COMPILE_MIN_STEPS_WARM = 1000
_MARKERS = "runpod-lora-worker"


def _marker(cfg_key: str, cache: Path | None) -> Path | None:
    if cache is None:
        return None
    digest = hashlib.sha256(cfg_key.encode()).hexdigest()[:16]
    return cache / _MARKERS / f"train-{digest}.json"


def should_compile(setting: bool | None, device: torch.device, steps: int, cfg_key: str, cache: Path | None) -> bool:
    """The training compile policy (see the module docstring); ``cache`` is the inductor cache."""
    if setting is not None:
        return setting
    if device.type != "cuda":
        return False
    marker = _marker(cfg_key, cache)
    warm = marker is not None and marker.is_file()
    return steps >= (TRAIN_COMPILE_MIN_STEPS_WARM if warm else TRAIN_COMPILE_MIN_STEPS)


def remember_warm(cfg_key: str, warmup: float, cache: Path | None) -> None:
    """Mark ``cfg_key``'s compiled graphs as warm in ``cache`` (a later worker compiles sooner)."""
    marker = _marker(cfg_key, cache)
    if marker is None:
        return
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps({"key": cfg_key, "warmup_seconds": round(warmup, 1)}), encoding="utf-8")
    except OSError as exc:
        log.warning("cannot write the compile marker %s: %s", marker, exc)
