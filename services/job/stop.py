"""A job's stop signal: set once by a cancel, SIGTERM/SIGINT or the job deadline, read by the runner.

The GPU runner runs in a worker thread; it checks the signal between denoising or optimizer
steps (a ``threading.Event``, so a check costs nothing) and stops with :class:`JobStopped`.
"""

from __future__ import annotations

import threading

from services.errors import JobStopped


class StopSignal:
    """Set once with a reason (``cancelled``, ``shutdown``, ``deadline``); the first reason wins."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self.reason = ""

    def set(self, reason: str) -> None:
        with self._lock:
            if not self._event.is_set():
                self.reason = reason
                self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()

    def check(self, where: str) -> None:
        """Raise :class:`JobStopped` naming ``where`` the job stopped, when the signal is set."""
        if self._event.is_set():
            raise JobStopped(f"{where}: stopped ({self.reason})", reason=self.reason)
