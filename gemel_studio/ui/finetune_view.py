"""The Fine-tune tab: train each model alone on its dataset, as `gemel finetune` does, before
anything is merged.

A workload whose models start from random weights (the quick start's) has accuracy near
chance, and targets derived from it mean nothing; this tab is the first step for such a
workload. `finetune_workload` (the function behind `gemel finetune`) runs as the panel's task
(`TaskMixin`); its `on_epoch` records come back as partial results, and each model's held-out
accuracy and mean training loss are drawn per epoch as it trains (the models train one after
another, in workload order). The result is a new workload (`OUT/workload.yaml` loading
`OUT/<model>.safetensors`) that one click opens.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pyqtgraph as pg
import torch
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (QComboBox, QFormLayout, QHBoxLayout, QLabel, QLineEdit, QProgressBar, QPushButton,
                               QSpinBox, QSplitter, QVBoxLayout, QWidget)

from ..merging.pipeline import finetune_workload
from ..merging.plan import RetrainSettings
from ..merging.retrain import EpochRecord
from ..workload import CheckpointSource, ModelSpec, TorchvisionSource, Workload
from . import settings
from .memory_view import style_plot
from .settings import PALETTES
from .task import TaskMixin
from .worker import Worker

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


class EpochCurves:
    """Per model, one point per epoch: its epoch number, held-out accuracy and mean training
    loss, from the `EpochRecord`s `finetune_workload` reports (each names its model)."""

    def __init__(self, names: list[str]):
        self.names = names
        self.epochs: dict[str, list[int]] = {n: [] for n in names}
        self.accuracy: dict[str, list[float]] = {n: [] for n in names}
        self.loss: dict[str, list[float]] = {n: [] for n in names}

    def add(self, record: EpochRecord) -> list[str]:
        """Take one epoch's record; the models it was about."""
        names = [n for n in record.loss if n in self.loss]
        for n in names:
            self.epochs[n].append(record.epoch)
            self.loss[n].append(float(record.loss[n]))
            self.accuracy[n].append(float(record.accuracy[n]))
        return names


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
        self.curves: EpochCurves | None = None
        self._items: dict[str, tuple[pg.PlotDataItem, pg.PlotDataItem]] = {}  # model: (accuracy, loss)
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

        self.accuracy_plot, self.accuracy_item, self.legend = self._plot("Held-out accuracy", "accuracy")
        self.loss_plot, self.loss_item, self.loss_legend = self._plot("Training loss", "mean loss")
        self.accuracy_item.setYRange(0, 1.02, padding=0)  # a fraction: the same scale for every model and run
        plots = QSplitter(Qt.Orientation.Horizontal, self)
        plots.setChildrenCollapsible(False)
        plots.addWidget(self.accuracy_plot)
        plots.addWidget(self.loss_plot)

        layout = QVBoxLayout(self)
        layout.addWidget(title)
        layout.addWidget(self.intro_label)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.progress_bar)
        layout.addWidget(self.status_label)
        layout.addWidget(self.result_label)
        layout.addWidget(plots, 1)
        self.init_task(self.status_label, self.progress_bar)
        self.set_colors(self.colors)
        self.set_workload(None)

    def _plot(self, title: str, left: str):
        widget = pg.PlotWidget(self)
        item = widget.getPlotItem()
        item.setTitle(title)
        item.setLabel("left", left)
        item.setLabel("bottom", "epoch")
        item.setMenuEnabled(False)
        legend = item.addLegend(offset=(-10, 10))
        widget.setMinimumSize(200, 160)
        return widget, item, legend

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
                                                                              progress=progress, on_epoch=partial),
                                 name=f"fine-tune of {workload.name}", min_interval=0.1,
                                 message=f"Fine-tuning {workload.name} into {out}…")
        self.sigWorkerStarted.emit(worker)
        return worker

    def cancel(self) -> None:
        self.stop_task("cancel", "Cancelling at the next training step…")

    def quit_question(self) -> str:
        return "A fine-tune is running; quitting stops it and loses what it trained so far." if self.running else ""

    def on_task_partial(self, record: EpochRecord) -> None:
        if self.curves is not None:
            for name in self.curves.add(record):
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
        for accuracy, loss in self._items.values():
            self.accuracy_item.removeItem(accuracy)
            self.loss_item.removeItem(loss)
        self.legend.clear()
        self.loss_legend.clear()
        self._items = {}
        self.curves = EpochCurves(names)
        series = self.colors["series"]
        for i, name in enumerate(names):
            pen = pg.mkPen(series[i % len(series)], width=2)
            pair = tuple(pg.PlotDataItem([], [], name=name, pen=pen, symbol="o", symbolSize=5,
                                         symbolBrush=series[i % len(series)], symbolPen=None) for _ in range(2))
            for item, plot in zip(pair, (self.accuracy_item, self.loss_item)):
                plot.addItem(item)  # a named item joins the plot's legend by itself
            self._items[name] = pair

    def _redraw(self, name: str) -> None:
        x = np.asarray(self.curves.epochs[name], dtype=float)
        accuracy, loss = self._items[name]
        accuracy.setData(x, np.asarray(self.curves.accuracy[name], dtype=float))
        loss.setData(x, np.asarray(self.curves.loss[name], dtype=float))

    def curve(self, name: str, which: str = "accuracy") -> tuple[np.ndarray, np.ndarray]:
        """The points drawn for a model: `which` is 'accuracy' or 'loss'."""
        x, y = self._items[name][0 if which == "accuracy" else 1].getData()
        return (np.asarray(x if x is not None else [], dtype=float),
                np.asarray(y if y is not None else [], dtype=float))

    def set_colors(self, colors: dict) -> None:
        self.colors = colors
        for widget, item, legend in ((self.accuracy_plot, self.accuracy_item, self.legend),
                                     (self.loss_plot, self.loss_item, self.loss_legend)):
            widget.setBackground(colors["background"])
            style_plot(item, colors)
            item.showGrid(x=True, y=True, alpha=colors["grid"] / 255)
            legend.setLabelTextColor(colors["foreground"])
        series = colors["series"]
        for i, pair in enumerate(self._items.values()):
            for item in pair:
                item.setPen(pg.mkPen(series[i % len(series)], width=2))
                item.setSymbolBrush(series[i % len(series)])
        # Legends read their labels' colour when items are added: add them again in the new one.
        for legend, which in ((self.legend, 0), (self.loss_legend, 1)):
            legend.clear()
            for name, pair in self._items.items():
                legend.addItem(pair[which], name)
