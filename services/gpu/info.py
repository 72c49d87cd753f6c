"""GPU facts for the health action, without importing torch.

torch is consulted only when a GPU action already imported it; otherwise the NVIDIA driver's
``/proc`` entries and the presence of ``nvidia-smi`` say whether a GPU is there.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Any

from services.gpu import SOFTWARE_VERSION
from services.gpu.state import RUNNER_STATE

log = logging.getLogger(__name__)

NVIDIA_PROC = Path("/proc/driver/nvidia/gpus")


def _driver_gpus(proc: Path = NVIDIA_PROC) -> list[str]:
    """GPU model names from the driver's /proc entries (empty when there is no driver)."""
    names: list[str] = []
    if not proc.is_dir():
        return names
    for entry in sorted(proc.iterdir()):
        info = entry / "information"
        try:
            text = info.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            log.warning("cannot read %s: %s", info, exc)
            names.append("unknown")
            continue
        model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Model:")), "")
        names.append(model or "unknown")
    return names


def _torch_facts(torch: Any) -> dict[str, Any]:
    """CUDA facts from an already imported torch (never initialises anything heavy)."""
    facts: dict[str, Any] = {"torch": torch.__version__, "cuda_available": bool(torch.cuda.is_available())}
    if facts["cuda_available"] and torch.cuda.is_initialized():  # never create a CUDA context here
        index = torch.cuda.current_device()
        facts["device"] = torch.cuda.get_device_name(index)
        facts["memory_allocated_gib"] = round(torch.cuda.memory_allocated(index) / 2**30, 3)
        facts["memory_reserved_gib"] = round(torch.cuda.memory_reserved(index) / 2**30, 3)
        facts["memory_total_gib"] = round(torch.cuda.get_device_properties(index).total_memory / 2**30, 3)
    return facts


def gpu_info() -> dict[str, Any]:
    """GPU presence, loaded pipelines and compile warm-ups measured so far; never imports torch."""
    gpus = _driver_gpus()
    info: dict[str, Any] = {
        "gpu_present": bool(gpus) or shutil.which("nvidia-smi") is not None,
        "gpus": gpus,
        "runner_version": SOFTWARE_VERSION,
        "torch_loaded": "torch" in sys.modules,
    }
    torch = sys.modules.get("torch")
    if torch is not None:
        info.update(_torch_facts(torch))
        info["gpu_present"] = info["gpu_present"] or info["cuda_available"]
    info.update(RUNNER_STATE.snapshot())
    return info
