"""One way for a panel to run a long task (after Orange3's `ConcurrentWidgetMixin`).

`TaskMixin` owns the task's life: the `Worker`, its `TaskStatus`, the status line and the
progress bar, which controls are enabled, the stop request (pause or cancel), the quit guard
and the questions asked before anything is lost. A panel only says what the work is
(`start_task(fn)`, where `fn(progress, partial)` is a plain function of the core) and what to
do with what comes back:

    on_task_partial(value)      every partial result, in order
    on_task_done(result)        the result
    on_task_failed(message)     a one-line error
    on_task_cancelled(mode)     stopped on request ('pause', 'cancel', or '' for a plain stop)
    update_controls()           enable the panel's buttons from `task_running`/`task_stopping`

Questions go through `ask()`, one function, so that tests answer them (monkeypatch
`gemel_studio.ui.task.ask`) and nothing modal ever blocks a headless run.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from PySide6.QtWidgets import QLabel, QMessageBox, QProgressBar, QWidget

from ..progress import Progress
from ..tasks import TaskStatus
from .worker import Worker

TaskFunction = Callable[[Progress, Callable[[object], None]], Any]


def ask(parent: QWidget | None, title: str, text: str, yes: str = "Yes", no: str = "Cancel") -> bool:
    """A modal question with named buttons; True when the operator chose `yes`. The safe
    answer (`no`) is the default, so Enter never deletes anything."""
    box = QMessageBox(QMessageBox.Icon.Question, title, text, QMessageBox.StandardButton.NoButton, parent)
    yes_button = box.addButton(yes, QMessageBox.ButtonRole.AcceptRole)
    no_button = box.addButton(no, QMessageBox.ButtonRole.RejectRole)
    box.setDefaultButton(no_button)
    box.setEscapeButton(no_button)
    box.exec()
    return box.clickedButton() is yes_button


class TaskMixin:
    """Mixed into a QWidget panel before QWidget: `class Panel(TaskMixin, QWidget)`."""

    task_noun = "task"  # 'merge', 'export': what the quit question calls it

    def init_task(self, status_label: QLabel | None = None, progress_bar: QProgressBar | None = None) -> None:
        self.task_worker: Worker | None = None
        self.task_status = TaskStatus.IDLE
        self.task_stop_mode = ""
        self.task_started_at = 0.0
        self._task_status_label = status_label
        self._task_progress_bar = progress_bar
        if progress_bar is not None:
            progress_bar.setVisible(False)

    # --- state ------------------------------------------------------------------------------

    @property
    def task_running(self) -> bool:
        return self.task_status.active

    @property
    def task_stopping(self) -> bool:
        return self.task_status is TaskStatus.STOPPING

    @property
    def task_elapsed(self) -> float:
        return time.monotonic() - self.task_started_at

    def set_status_line(self, text: str) -> None:
        if self._task_status_label is not None:
            self._task_status_label.setText(text)

    def update_controls(self) -> None:  # the panel's buttons
        pass

    # --- running ----------------------------------------------------------------------------

    def start_task(self, fn: TaskFunction, *, name: str, message: str = "", min_interval: float = 0.05,
                   pool=None, supersede: bool = False) -> Worker:
        """Run `fn(progress, partial)` on the worker pool (or the panel's own `pool`, for work that
        holds a thread for as long as it runs); at most one task per panel. With `supersede`, a
        running task is cancelled and forgotten (no hook hears of its end), as Orange's mixin
        does when a widget starts anew."""
        if self.task_running:
            if not supersede:
                raise RuntimeError(f"a {self.task_noun} is already running")
            old = self.task_worker
            for signal in (old.sigProgress, old.sigPartial, old.sigFinished, old.sigFailed, old.sigCancelled):
                signal.disconnect()
            old.cancel()
        worker = Worker(lambda progress: fn(progress, worker.partial), name=name, min_interval=min_interval)
        worker.sigProgress.connect(self._task_progressed)
        worker.sigPartial.connect(self.on_task_partial)
        worker.sigFinished.connect(self._task_finished)
        worker.sigFailed.connect(self._task_failed)
        worker.sigCancelled.connect(self._task_cancelled)
        self.task_worker, self.task_status, self.task_stop_mode = worker, TaskStatus.RUNNING, ""
        self.task_started_at = time.monotonic()
        bar = self._task_progress_bar
        if bar is not None:
            bar.setRange(0, 0)
            bar.setVisible(True)
        if message:
            self.set_status_line(message)
        self.update_controls()
        worker.start(pool)
        return worker

    def stop_task(self, mode: str = "", message: str = "Stopping…") -> bool:
        """Ask the work to stop at its next step; False when nothing runs or a stop is under way."""
        if self.task_status is not TaskStatus.RUNNING or self.task_worker is None:
            return False
        self.task_status, self.task_stop_mode = TaskStatus.STOPPING, mode
        self.task_worker.cancel()
        self.set_status_line(message)
        self.update_controls()
        return True

    def quit_question(self) -> str:
        """What quitting now would do to the running task, in one sentence ('' when idle)."""
        if not self.task_running:
            return ""
        return f"A {self.task_noun} is running; quitting stops it."

    def confirm(self, title: str, text: str, yes: str, no: str = "Cancel") -> bool:
        return ask(self, title, text, yes, no)

    # --- hooks (override) -------------------------------------------------------------------

    def on_task_progress(self, done: int, total: int, message: str) -> None:
        bar = self._task_progress_bar
        if bar is not None:
            bar.setRange(0, max(1, total))
            bar.setValue(done)
        if not self.task_stopping and message:
            self.set_status_line(f"{message} ({self.task_elapsed:.0f} s)")

    def on_task_partial(self, value: object) -> None:
        pass

    def on_task_done(self, result: object) -> None:
        pass

    def on_task_failed(self, message: str) -> None:
        """The default: the panel's line says it failed; the window shows the message once."""
        self.set_status_line("Failed: the message is shown above")

    def on_task_cancelled(self, mode: str) -> None:
        self.set_status_line("Stopped")

    # --- the worker's end signals -----------------------------------------------------------

    def _task_progressed(self, done: int, total: int, message: str) -> None:
        self.on_task_progress(done, total, message)

    def _task_end(self, status: TaskStatus) -> str:
        mode = self.task_stop_mode
        self.task_worker, self.task_status, self.task_stop_mode = None, status, ""
        bar = self._task_progress_bar
        if bar is not None:
            bar.setRange(0, 1)
            bar.setValue(0)
            bar.setFormat("")
            bar.setVisible(False)
        return mode

    def _task_finished(self, result: object) -> None:
        self._task_end(TaskStatus.FINISHED)
        try:
            self.on_task_done(result)
        finally:
            self.update_controls()

    def _task_failed(self, message: str) -> None:
        self._task_end(TaskStatus.FAILED)
        try:
            self.on_task_failed(message)
        finally:
            self.update_controls()

    def _task_cancelled(self) -> None:
        mode = self._task_end(TaskStatus.CANCELLED)
        try:
            self.on_task_cancelled(mode)
        finally:
            self.update_controls()


__all__ = ["TaskMixin", "TaskStatus", "ask"]
