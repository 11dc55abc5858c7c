"""One way to run long work off the GUI thread: `Worker(fn)` runs `fn(progress) -> result`.

The same plain functions the CLI calls (analysis now; retraining and inference later) run
here unchanged. The worker thread never touches a widget: it emits private signals that are
queued to the GUI thread, where the public `sig*` signals are re-emitted, so every slot a
panel connects runs on the GUI thread.
"""

from __future__ import annotations

import logging
import traceback
from typing import Any, Callable

from PySide6.QtCore import QObject, QRunnable, QThreadPool, Qt, Signal, Slot

from ..errors import Cancelled, GemelError
from ..progress import Progress

log = logging.getLogger(__name__)

WorkFunction = Callable[[Progress], Any]

_pool: QThreadPool | None = None


def worker_pool() -> QThreadPool:
    """The studio's own pool, so that long work never starves Qt's global pool."""
    global _pool
    if _pool is None:
        _pool = QThreadPool()
        _pool.setMaxThreadCount(2)
    return _pool


class _Job(QRunnable):
    def __init__(self, worker: "Worker"):
        super().__init__()
        self.setAutoDelete(True)
        self._worker = worker

    def run(self) -> None:  # on a pool thread
        self._worker._run()


class Worker(QObject):
    """Runs `fn(progress)` on a pool thread.

    Signals (always delivered on the GUI thread):
      sigProgress(done, total, message) — throttled by `Progress(min_interval)`;
      sigPartial(value) — every value the work passes to `partial()` (a retraining round, an
      epoch), in order and never throttled, all before the end signal;
      sigFinished(result); sigFailed(message); sigCancelled().
    Exactly one of the last three fires, once, after `start()`.
    """

    sigProgress = Signal(int, int, str)
    sigPartial = Signal(object)
    sigFinished = Signal(object)
    sigFailed = Signal(str)
    sigCancelled = Signal()

    # Emitted from the pool thread; queued to the slots below on the GUI thread.
    _progressed = Signal(int, int, str)
    _partial = Signal(object)
    _ended = Signal(str, object)

    def __init__(self, fn: WorkFunction, *, min_interval: float = 0.05, name: str = "work",
                 parent: QObject | None = None):
        super().__init__(parent)
        self.fn = fn
        self.name = name
        self.progress = Progress(self._progressed.emit, min_interval=min_interval)
        self.running = False
        self.done = False
        self._progressed.connect(self._on_progressed, Qt.ConnectionType.QueuedConnection)
        self._partial.connect(self._on_partial, Qt.ConnectionType.QueuedConnection)
        self._ended.connect(self._on_ended, Qt.ConnectionType.QueuedConnection)

    def start(self, pool: QThreadPool | None = None) -> None:
        if self.running or self.done:
            raise RuntimeError("a Worker runs once")
        self.running = True
        (pool or worker_pool()).start(_Job(self))

    def cancel(self) -> None:
        """Ask the work to stop at its next progress step (thread-safe, returns at once)."""
        self.progress.cancel()

    def partial(self, value: object) -> None:
        """Send a partial result to the GUI thread (call it from the work; thread-safe)."""
        self._partial.emit(value)

    @property
    def cancelled(self) -> bool:
        return self.progress.cancelled

    def _run(self) -> None:
        try:
            result = self.fn(self.progress)
        except Cancelled:
            self._ended.emit("cancelled", None)
        except GemelError as exc:
            self._ended.emit("failed", str(exc))
        except Exception as exc:  # a bug: show type and message, keep the traceback in the log
            log.error("%s failed:\n%s", self.name, traceback.format_exc())
            self._ended.emit("failed", f"{type(exc).__name__}: {exc}")
        else:
            # The user asked to stop: a result that raced past the last check is dropped.
            self._ended.emit("cancelled" if self.progress.cancelled else "finished", result)

    @Slot(int, int, str)
    def _on_progressed(self, done: int, total: int, message: str) -> None:
        if self.running:
            self.sigProgress.emit(done, total, message)

    @Slot(object)
    def _on_partial(self, value: object) -> None:
        if self.running:
            self.sigPartial.emit(value)

    @Slot(str, object)
    def _on_ended(self, outcome: str, payload: object) -> None:
        self.running = False
        self.done = True
        if outcome == "finished":
            self.sigFinished.emit(payload)
        elif outcome == "failed":
            self.sigFailed.emit(str(payload))
        else:
            self.sigCancelled.emit()
