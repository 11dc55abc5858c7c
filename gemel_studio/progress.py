"""Progress and cancellation for long work, shared by the CLI, the tests and the Qt worker.

Long functions take a `Progress` and call `step()`; they never know who is watching.
`step()` raises `Cancelled` once `cancel()` was called, so work stops at the next step.
The studio's worker turns the updates into signals; `terminal_progress()` into a tqdm bar
on a terminal (and nothing when output is piped), for the `gemel` commands.
"""

from __future__ import annotations

import sys
import threading
import time
from contextlib import contextmanager
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


class _TerminalBar:
    """A tqdm bar fed by a Progress's updates; each `start()` (a new total) begins a new bar."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.bar = None

    def __call__(self, done: int, total: int, message: str) -> None:
        from tqdm import tqdm

        if self.bar is None or total != self.bar.total or done < self.bar.n:
            self.close()
            # Progress throttles already: tqdm draws every update it gets.
            self.bar = tqdm(total=total, desc=message[:40] or None, file=self.stream, mininterval=0, miniters=1,
                            dynamic_ncols=True, leave=True, disable=False)
        elif message:
            self.bar.set_description_str(message[:40], refresh=False)
        self.bar.update(done - self.bar.n)
        if total and done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def terminal_progress(stream: TextIO | None = None) -> Progress:
    """A Progress that draws a tqdm bar on `stream` (standard error) when it is a terminal,
    and prints nothing when it is not (piped, redirected, or under --json)."""
    stream = sys.stderr if stream is None else stream
    isatty = getattr(stream, "isatty", None)
    if not (isatty and isatty()):
        return Progress()
    return Progress(_TerminalBar(stream), min_interval=0.1)


def write_line(text: str, stream: TextIO | None = None) -> None:
    """Print a line (on standard output) above any bar that terminal_progress is drawing."""
    from tqdm import tqdm

    stream = sys.stdout if stream is None else stream
    tqdm.write(text, file=stream)
    stream.flush()


@contextmanager
def cancel_on_signals(progress: Progress, message: str, terminate: bool = False):
    """While inside, the first Ctrl-C (SIGINT; with `terminate`, a service manager's SIGTERM
    too) cancels `progress`: the work stops at its next step and says so with `message`; a
    second signal stops at once. Yields a list that names the first signal's stop
    ('interrupted' or 'terminated'). The previous handlers come back after."""
    import signal

    why: list[str] = []
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield why
        return

    def handler(signum, frame):
        if progress.cancelled:
            raise KeyboardInterrupt
        why.append("terminated" if signum == signal.SIGTERM else "interrupted")
        progress.cancel()
        again = "SIGTERM; a second one stops at once" if signum == signal.SIGTERM else "Ctrl-C again to stop at once"
        print(f"\n{message} ({again})", file=sys.stderr, flush=True)

    signals = (signal.SIGINT, signal.SIGTERM) if terminate else (signal.SIGINT,)
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield why
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
