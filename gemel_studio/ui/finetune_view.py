"""The Fine-tune tab: train each model alone on its dataset, as `gemel finetune` does, before
anything is merged.

A workload whose models start from random weights (the quick start's) has accuracy near
chance, and targets derived from it mean nothing; this tab is the first step for such a
workload. `finetune_workload` (the function behind `gemel finetune`) runs as the panel's task
(`TaskMixin`); the training loss of each model is drawn per progress step as it trains (the
models train one after another, in workload order), and the result is a new workload
(`OUT/workload.yaml` loading `OUT/<model>.safetensors`) that one click opens.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import numpy as np
import pyqtgraph as pg
import torch
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QComboBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QProgressBar, QPushButton,
                               QSpinBox, QVBoxLayout, QWidget)

from ..merging.pipeline import finetune_workload
from ..merging.plan import RetrainSettings
from ..workload import CheckpointSource, ModelSpec, TorchvisionSource, Workload
from . import settings
from .memory_view import style_plot
from .settings import PALETTES
from .task import TaskMixin
from .worker import Worker

_EPOCH_LOSS = re.compile(r"epoch (\d+)/(\d+) loss ([0-9.eE+-]+|nan|inf)")
_EPOCH_START = re.compile(r"epoch 1/\d+$")


def has_random_weights(spec: ModelSpec) -> bool:
    """A torchvision model with no `weights:` starts from random initial weights."""
    return isinstance(spec.source, TorchvisionSource) and not spec.source.weights


def random_weight_models(workload: Workload | None) -> list[str]:
    return [m.name for m in workload.models if has_random_weights(m)] if workload is not None else []


def trainable_models(workload: Workload) -> list[str]:
    """The models `finetune_workload` trains, in the order it trains them."""
    return [m.name for m in workload.models
            if m.dataset is not None and m.dataset.labels != "distill"
            and isinstance(m.source, (TorchvisionSource, CheckpointSource))]


def default_out_dir(workload: Workload | None) -> Path:
    name = workload.name if workload is not None else "workload"
    return Path(tempfile.gettempdir()) / "gemel-studio" / f"{name}-finetuned"


class LossCurves:
    """Training loss per model over progress steps, attributed in training order: each model's
    training starts its first epoch afresh (progress 0 of 'epoch 1/N'), which marks the next model."""

    def __init__(self, names: list[str]):
        self.names = names
        self.points: dict[str, list[float]] = {n: [] for n in names}
        self._index = -1

    def add(self, done: int, message: str) -> str | None:
        """Take one progress update; the model it was about, or None if it held no loss."""
        if done == 0 and _EPOCH_START.match(message):
            self._index = min(self._index + 1, len(self.names) - 1)
            return None
        match = _EPOCH_LOSS.search(message)
        if not match or self._index < 0:
            return None
        name = self.names[self._index]
        self.points[name].append(float(match.group(3)))
        return name


class FinetunePanel(TaskMixin, QWidget):
    sigWorkerStarted = Signal(object)
    sigFinished = Signal(object)  # the path of the fine-tuned workload.yaml
    sigOpenWorkload = Signal(object)  # the same path, when the operator asks to open it
    sigError = Signal(str)

    task_noun = "fine-tune"

    def __init__(self, parent=None):
        super().__init__(parent)
        self.workload: Workload | None = None
        self.summary: dict | None = None
        self.result_path: Path | None = None
        self.curves: LossCurves | None = None
        self._items: dict[str, pg.PlotDataItem] = {}
        self._out_chosen = False
        self.colors = PALETTES["dark"]

        title = QLabel("Fine-tune", self)
        title.setObjectName("panelTitle")
        self.intro_label = QLabel("", self)
        self.intro_label.setWordWrap(True)
        self.device_combo = QComboBox(self)
        self.device_combo.addItems(["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else []))
        self.epochs_spin = QSpinBox(self)
        self.epochs_spin.setRange(1, 10_000)
        self.epochs_spin.setValue(settings.studio_settings().value("finetune/epochs", 10, type=int))
        self.out_edit = QLineEdit(self)
        self.out_edit.textEdited.connect(self._out_edited)
        form = QFormLayout()
        form.addRow("Device", self.device_combo)
        form.addRow("Epochs per model", self.epochs_spin)
        form.addRow("Output folder", self.out_edit)

        self.start_button = QPushButton("Fine-tune", self)
        self.start_button.setToolTip("Train each model alone on its dataset and write a workload of the results "
                                     "(what `gemel finetune` does)")
        self.start_button.clicked.connect(self.start)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setToolTip("Stop; nothing is written until every model is trained")
        self.cancel_button.clicked.connect(self.cancel)
        self.open_button = QPushButton("Open the fine-tuned workload", self)
        self.open_button.clicked.connect(self._open_result)
        buttons = QHBoxLayout()
        for b in (self.start_button, self.cancel_button, self.open_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        self.progress_bar = QProgressBar(self)
        self.status_label = QLabel("", self)
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.result_label = QLabel("", self)
        self.result_label.setWordWrap(True)
        self.result_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        self.loss_plot = pg.PlotWidget(self)
        self.loss_item = self.loss_plot.getPlotItem()
        self.loss_item.setTitle("Training loss per model")
        self.loss_item.setLabel("left", "loss")
        self.loss_item.setLabel("bottom", "progress step (each model in turn)")
        self.loss_item.setMenuEnabled(False)
        self.legend = self.loss_item.addLegend(offset=(-10, 10))
        self.loss_plot.setMinimumHeight(160)

        layout = QVBoxLayout(self)
        layout.addWidget(title)
        layout.addWidget(self.intro_label)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status_label)
        layout.addWidget(self.result_label)
        layout.addWidget(self.loss_plot, 1)
        self.init_task(self.status_label, self.progress_bar)
        self.set_colors(self.colors)
        self.set_workload(None)

    # --- context ----------------------------------------------------------------------------

    def set_workload(self, workload: Workload | None) -> None:
        self.workload = workload
        if not self._out_chosen:
            self.out_edit.setText(str(default_out_dir(workload)))
        if workload is None:
            self.intro_label.setText("Open a workload to fine-tune its models")
        else:
            random = random_weight_models(workload)
            trained = trainable_models(workload)
            first = (f"{', '.join(random)} {'has' if len(random) == 1 else 'have'} random weights: fine-tune "
                     f"first, or every accuracy figure and target means nothing. " if random else "")
            self.intro_label.setText(f"{first}Trains {len(trained)} of {len(workload.models)} models alone on "
                                     f"their datasets ({', '.join(trained) or 'none has a dataset'}).")
        self._update_enabled()

    def _out_edited(self, *args) -> None:
        self._out_chosen = True
        self._update_enabled()

    def out_dir(self) -> Path:
        return Path(self.out_edit.text().strip()).expanduser()

    # --- running ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.task_running

    def start(self) -> Worker | None:
        if self.running or self.workload is None or not trainable_models(self.workload):
            return None
        out = self.out_dir()
        if not str(out).strip() or str(out) == ".":
            self._fail("choose an output folder for the fine-tuned workload")
            return None
        if (out / "workload.yaml").exists() and not self.confirm(
                "Fine-tune again?", f"{out} holds a fine-tuned workload; fine-tuning again overwrites its "
                                    f"weights.", yes="Overwrite", no="Keep it"):
            return None
        workload = self.workload
        retrain = RetrainSettings(optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=self.epochs_spin.value(),
                                  device=self.device_combo.currentText())  # gemel finetune's defaults
        settings.studio_settings().setValue("finetune/epochs", self.epochs_spin.value())
        self.summary, self.result_path = None, None
        self.result_label.setText("")
        self._clear_curves(trainable_models(workload))
        worker = self.start_task(lambda progress, partial: finetune_workload(workload, out, retrain,
                                                                              progress=progress),
                                 name=f"fine-tune of {workload.name}", min_interval=0.1,
                                 message=f"Fine-tuning {workload.name} into {out}…")
        self.sigWorkerStarted.emit(worker)
        return worker

    def cancel(self) -> None:
        self.stop_task("cancel", "Cancelling at the next training step…")

    def quit_question(self) -> str:
        return "A fine-tune is running; quitting stops it and loses what it trained so far." if self.running else ""

    def on_task_progress(self, done: int, total: int, message: str) -> None:
        super().on_task_progress(done, total, message)
        if self.curves is not None:
            name = self.curves.add(done, message)
            if name is not None:
                self._redraw(name)

    def on_task_done(self, summary: dict) -> None:
        self.summary = summary
        self.result_path = self.out_dir() / "workload.yaml"
        lines = []
        for name, row in summary.items():
            if "skipped" in row:
                lines.append(f"{name}: skipped ({row['skipped']})")
            else:
                lines.append(f"{name}: {row['metric']} {row['initial_accuracy']:.3f} → {row['accuracy']:.3f} "
                             f"in {row['epochs']} epochs")
        self.result_label.setText("\n".join(lines))
        self.set_status_line(f"Done in {self.task_elapsed:.1f} s: {self.result_path}. Open it to merge the trained "
                             f"models.")
        self.sigFinished.emit(self.result_path)

    def on_task_failed(self, message: str) -> None:
        self._fail(message)

    def on_task_cancelled(self, mode: str) -> None:
        self.set_status_line("Cancelled; nothing was written")

    def _fail(self, message: str) -> None:
        self.set_status_line("Failed: the message is shown above")
        self.sigError.emit(message)

    def _open_result(self) -> None:
        if self.result_path is not None:
            self.sigOpenWorkload.emit(self.result_path)

    def update_controls(self) -> None:
        self._update_enabled()

    def _update_enabled(self) -> None:
        running = self.running
        ready = self.workload is not None and bool(trainable_models(self.workload))
        self.start_button.setEnabled(ready and not running)
        self.cancel_button.setEnabled(running and not self.task_stopping)
        self.open_button.setEnabled(not running and self.result_path is not None)
        for w in (self.device_combo, self.epochs_spin, self.out_edit):
            w.setEnabled(not running)

    # --- curves -----------------------------------------------------------------------------

    def _clear_curves(self, names: list[str]) -> None:
        for item in self._items.values():
            self.loss_item.removeItem(item)
        self.legend.clear()
        self._items = {}
        self.curves = LossCurves(names)
        series = self.colors["series"]
        for i, name in enumerate(names):
            item = pg.PlotDataItem([], [], name=name, pen=pg.mkPen(series[i % len(series)], width=2))
            self.loss_item.addItem(item)
            self.legend.addItem(item, name)
            self._items[name] = item

    def _redraw(self, name: str) -> None:
        # One x axis for all: a model's points follow those of the models trained before it.
        offset = 0
        for n in self.curves.names:
            ys = self.curves.points[n]
            if n == name:
                self._items[n].setData(np.arange(offset, offset + len(ys), dtype=float), np.asarray(ys, dtype=float))
                return
            offset += len(ys)

    def loss_series(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        x, y = self._items[name].getData()
        return (np.asarray(x if x is not None else [], dtype=float),
                np.asarray(y if y is not None else [], dtype=float))

    def set_colors(self, colors: dict) -> None:
        self.colors = colors
        self.loss_plot.setBackground(colors["background"])
        style_plot(self.loss_item, colors)
        self.loss_item.showGrid(x=True, y=True, alpha=colors["grid"] / 255)
        self.legend.setLabelTextColor(colors["foreground"])
        series = colors["series"]
        for i, item in enumerate(self._items.values()):
            item.setPen(pg.mkPen(series[i % len(series)], width=2))
