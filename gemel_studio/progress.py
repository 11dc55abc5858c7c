"""Progress and cancellation for long work, shared by the CLI, the tests and the Qt worker.

Long functions take a `Progress` and call `step()`; they never know who is watching.
`step()` raises `Cancelled` once `cancel()` was called, so work stops at the next step.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable, TextIO

from .errors import Cancelled

ProgressCallback = Callable[[int, int, str], None]


class Progress:
    """Counts done/total, forwards throttled updates to a callback and carries a cancel flag.

    Thread-safe: `cancel()` may be called from another thread (the GUI) while the work runs.
    Updates are throttled to `min_interval` seconds, except the last one, which always goes out.
    """

    def __init__(self, callback: ProgressCallback | None = None, min_interval: float = 0.05):
        self._callback = callback
        self._min_interval = min_interval
        self._cancel = threading.Event()
        self._last_emit = 0.0
        self.total = 0
        self.done = 0
        self.message = ""

    def start(self, total: int, message: str = "") -> None:
        self.total, self.done, self.message = total, 0, message
        self._emit(force=True)

    def step(self, message: str = "", n: int = 1, check: bool = True) -> None:
        """Record `n` units done; raise `Cancelled` if cancellation was requested (unless
        check=False: work that must not be half-recorded checks before it starts instead)."""
        if check:
            self.check()
        self.done += n
        if message:
            self.message = message
        self._emit(force=self.done >= self.total)

    def check(self) -> None:
        if self._cancel.is_set():
            raise Cancelled(self.message or "cancelled")

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def _emit(self, force: bool) -> None:
        if self._callback is None:
            return
        now = time.monotonic()
        if force or now - self._last_emit >= self._min_interval:
            self._last_emit = now
            self._callback(self.done, self.total, self.message)


def terminal_progress(stream: TextIO = sys.stderr) -> Progress:
    """A Progress that draws a one-line bar on a terminal, and prints nothing when piped."""
    if not stream.isatty():
        return Progress()

    def draw(done: int, total: int, message: str) -> None:
        width = 30
        filled = int(width * done / total) if total else 0
        stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {message[:40]:<40}")
        if total and done >= total:
            stream.write("\n")
        stream.flush()

    return Progress(draw, min_interval=0.1)
