"""Process-wide runner facts that the health action reads without importing torch.

The pipeline cache (:mod:`services.gpu.models`) reports what it holds here, and the compile
paths record their warm-up times; :func:`services.gpu.info.gpu_info` reads both.
"""

from __future__ import annotations

import threading
from typing import Any


class RunnerState:
    """Thread-safe record of loaded pipelines and measured compile warm-ups."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pipelines: list[str] = []
        self._warmups: dict[str, float] = {}

    def set_pipelines(self, names: list[str]) -> None:
        """Replace the list of loaded pipelines, most recently used last."""
        with self._lock:
            self._pipelines = list(names)

    def record_warmup(self, what: str, seconds: float) -> None:
        """Record the first (compiling) call of a compiled model for one input shape."""
        with self._lock:
            self._warmups[what] = round(seconds, 3)

    def snapshot(self) -> dict[str, Any]:
        """A copy for the health action."""
        with self._lock:
            total = round(sum(self._warmups.values()), 3)
            return {
                "pipelines": list(self._pipelines),
                "compile_warmup_seconds": dict(self._warmups),
                "compile_warmup_total_seconds": total,
            }

    def clear(self) -> None:
        """Forget everything (tests)."""
        with self._lock:
            self._pipelines.clear()
            self._warmups.clear()


RUNNER_STATE = RunnerState()
