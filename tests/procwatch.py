"""Read a child process's output as it comes, so a test waits for the line that says something
happened (the server is listening, a step ran) instead of polling on a timer."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path


class OutputWatcher:
    """Collects ``process``'s text output (stdout, stderr merged into it) on a thread.

    ``wait_for(text)`` returns once a line containing ``text`` arrived; it fails as soon as the
    process closed its output without printing it. ``timeout`` only guards against a hang.
    """

    def __init__(self, process: subprocess.Popen[str], copy_to: Path | None = None) -> None:
        if process.stdout is None:
            raise ValueError("start the process with stdout=subprocess.PIPE, text=True")
        self.process = process
        self.lines: list[str] = []
        self.closed = False
        self.keep = True
        self._copy_to = copy_to
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._read, name="output-watcher", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        sink = self._copy_to.open("w") if self._copy_to is not None else None
        try:
            for line in self.process.stdout:
                if sink is not None:
                    sink.write(line)
                    sink.flush()
                with self._changed:
                    if self.keep:
                        self.lines.append(line)
                    self._changed.notify_all()
        finally:
            if sink is not None:
                sink.close()
            with self._changed:
                self.closed = True
                self._changed.notify_all()

    @property
    def text(self) -> str:
        with self._changed:
            return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 600) -> None:
        """Until a line containing ``text`` arrived; ``AssertionError`` when the output ended first."""
        with self._changed:
            found = self._changed.wait_for(lambda: self.closed or any(text in line for line in self.lines), timeout)
            if not found or not any(text in line for line in self.lines):
                raise AssertionError(f"{text!r} never printed (exit {self.process.poll()}):\n{''.join(self.lines)}")

    def discard(self) -> None:
        """From now on drop what the process prints (it is still read, so it never blocks)."""
        with self._changed:
            self.keep = False
            self.lines.clear()

    def wait_closed(self, timeout: float = 60) -> str:
        """Until the process closed its output (it exited); everything it printed."""
        self._thread.join(timeout)
        return self.text
