"""Progress on stderr with tqdm: a job's steps, and files of a dataset upload.

tqdm because it is small, pure Python with no dependencies of its own, already in the
worker's environment (through huggingface_hub), and draws a plain line when stderr is not
a terminal. The worker reports progress as ``{"step", "total_steps", "loss"?, "eta_seconds"?,
...}``: RunPod shows the latest one as the ``output`` of an IN_PROGRESS job. Until one
arrives (the job is queued, loading, or runs on the local server, whose status call blocks
until the end) the bar is a spinner with the elapsed time, redrawn by a small thread.
"""

from __future__ import annotations

import sys
import threading
from typing import Any, TextIO

from tqdm import tqdm

SPINNER = "|/-\\"
TICK_SECONDS = 0.5
SPIN_FORMAT = "{desc} [{elapsed}]"
STEP_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]"


def describe(update: dict[str, Any]) -> str:
    """The bar's postfix for one progress update: loss, the worker's ETA, the last checkpoint."""
    parts = []
    loss = update.get("loss")
    if isinstance(loss, int | float):
        parts.append(f"loss={loss:.4f}")
    eta = update.get("eta_seconds")
    if isinstance(eta, int | float):
        parts.append(f"eta={eta:.0f}s")
    checkpoint = update.get("checkpoint_step", update.get("last_checkpoint_step"))
    if checkpoint is not None:
        parts.append(f"checkpoint={checkpoint}")
    return ", ".join(parts)


class StepBar:
    """One job's progress; call it with each progress update (``on_progress=bar``).

    ``disable`` draws nothing (``--quiet``). Thread-safe: the spinner thread and the polling
    thread draw under one lock.
    """

    def __init__(self, label: str, *, file: TextIO | None = None, disable: bool = False) -> None:
        self.label = label
        self.disable = disable
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._turn = 0
        self._bar = tqdm(
            total=None,
            desc=self._spin_text(),
            bar_format=SPIN_FORMAT,
            file=file or sys.stderr,
            disable=disable,
            leave=True,
            dynamic_ncols=True,
        )
        self._ticker: threading.Thread | None = None
        if not disable:
            self._ticker = threading.Thread(target=self._tick, name="progress-spinner", daemon=True)
            self._ticker.start()

    def _spin_text(self) -> str:
        return f"{self.label} {SPINNER[self._turn % len(SPINNER)]} running"

    def _tick(self) -> None:
        while not self._stop.wait(TICK_SECONDS):
            with self._lock:
                self._turn += 1
                if self._bar.total is None:
                    self._bar.set_description_str(self._spin_text(), refresh=False)
                self._bar.refresh()

    def __call__(self, update: Any) -> None:
        """Show a progress update; anything without ``step``/``total_steps`` is ignored."""
        if not isinstance(update, dict):
            return
        step, total = update.get("step"), update.get("total_steps")
        if not isinstance(step, int) or not isinstance(total, int) or total <= 0:
            return
        with self._lock:
            if self._bar.total != total:
                self._bar.total = total
                self._bar.bar_format = STEP_FORMAT
                self._bar.set_description_str(self.label, refresh=False)
            self._bar.n = min(step, total)
            self._bar.set_postfix_str(describe(update), refresh=False)
            self._bar.refresh()

    def note(self, text: str) -> None:
        """A message line above the bar (resubmissions, warnings); none when disabled."""
        if self.disable:
            return
        with self._lock:
            self._bar.write(text, file=self._bar.fp)

    def close(self, outcome: str = "finished") -> None:
        """Stop the spinner; its last line says ``outcome`` (``finished``, ``interrupted``, ``failed``).

        A step bar keeps its label when finished and names any other outcome.
        """
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        with self._lock:
            if self._bar.total is None:
                self._bar.set_description_str(f"{self.label} {outcome}", refresh=False)
            elif outcome != "finished":
                self._bar.set_description_str(f"{self.label} ({outcome})", refresh=False)
            self._bar.close()

    def __enter__(self) -> StepBar:
        return self

    def __exit__(self, kind: type[BaseException] | None, *exc_info: object) -> None:
        self.close(outcome_of(kind))


def outcome_of(kind: type[BaseException] | None) -> str:
    """How a ``with`` block ended: ``finished``, ``interrupted`` (Ctrl-C) or ``failed``."""
    if kind is None:
        return "finished"
    return "interrupted" if issubclass(kind, KeyboardInterrupt) else "failed"


class FileBar:
    """Files of an upload done so far; call it with ``(done, total)`` (``on_progress=bar``)."""

    def __init__(self, label: str, *, file: TextIO | None = None, disable: bool = False) -> None:
        self._bar = tqdm(desc=label, unit="file", file=file or sys.stderr, disable=disable, leave=True)

    def __call__(self, done: int, total: int) -> None:
        self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> FileBar:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
