"""The Retraining tab: run the merge search on the plan and watch it, live.

`merge_workload` (the function behind `gemel merge`) runs in a `Worker`; its rounds and
epochs come back as partial results, so the panel draws per-model accuracy (each model's
target dashed) and loss per epoch, the memory saved after each round against time, and the
heuristic's step log, and finally the report. Nothing here touches the work's thread.

Pause and Resume are the core's own resume: Pause stops at the next training step and
leaves the checkpoint in the output folder; Resume runs the same merge on that folder, which
continues exactly where it stopped. Cancel stops and, once the operator confirms, deletes the
checkpoint; Start begins afresh and asks before deleting a checkpoint or a finished report
left in the folder. The run's life (worker, state, buttons, questions) is `TaskMixin`'s; the
folder's files are `MergedFolder`'s. What the folder says is what the screen shows: a pause
that came as the last round ended shows the report the merge wrote.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import get_args

import numpy as np
import pyqtgraph as pg
import torch
from pydantic import ValidationError
from PySide6.QtCore import QAbstractTableModel, QModelIndex, Qt, Signal
from PySide6.QtGui import QBrush, QColor, QDoubleValidator
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QFileDialog, QFormLayout, QFrame, QGridLayout,
                               QHBoxLayout, QHeaderView, QLabel, QLineEdit, QProgressBar, QPushButton,
                               QScrollArea, QSizePolicy, QSpinBox, QSplitter, QTableView, QVBoxLayout, QWidget)

from ..analysis import WorkloadAnalysis
from ..units import human_bytes
from ..merging.folder import RUN_PLAN, MergedFolder
from ..merging.heuristic import candidates
from ..merging.options import STRATEGY_NAMES, MergeOptions, RetrainSettings
from ..merging.pipeline import merge_workload
from ..merging.plan import GroupState, MergePlan, PlanError, load_plan, save_plan
from ..merging.report import MergeReport, ModelOutcome
from ..merging.retrain import EpochRecord
from ..tasks import plural
from ..workload import Workload
from . import settings
from .columns import MENU_HINT, column_menu
from .memory_view import style_plot
from .settings import PALETTES
from .task import TaskMixin
from .worker import Worker

MIB = 1024 * 1024


def default_out_dir(workload: Workload | None) -> Path:
    name = workload.name if workload is not None else "workload"
    return Path(tempfile.gettempdir()) / "gemel-studio" / f"{name}-merge"


def can_resume(out_dir: Path) -> bool:
    """A search stopped before its report: the core keeps its state after finishing, too."""
    return MergedFolder(out_dir).can_resume


def groups_to_try(plan: MergePlan) -> tuple[list, str]:
    """The groups Start would merge and why, in words. A merge's outcome (kept and backed-off
    groups) merges its kept and accepted groups again, never groups nobody accepted."""
    states = [g.state for g in plan.groups]
    outcome = GroupState.kept in states or GroupState.backed_off in states
    chosen = [g for g in plan.groups if g.state in (GroupState.accepted, GroupState.kept)]
    if chosen:
        kept = sum(g.state is GroupState.kept for g in chosen)
        why = (f"its {kept} kept and {len(chosen) - kept} accepted groups" if outcome
               else f"the {plural(len(chosen), 'accepted group')}")
    elif outcome:
        why = "nothing: accept groups in the Proposals tab to merge again"
    else:
        chosen = [g for g in plan.groups if g.state is not GroupState.rejected]
        why = "every group not rejected (none is accepted yet)"
    return chosen, why


def plan_for_run(plan: MergePlan) -> MergePlan:
    """The plan as the search reads it: kept groups count as accepted (the search tries the
    accepted groups, or every group not rejected when none is)."""
    return plan.model_copy(deep=True, update={"groups": [
        g.model_copy(update={"state": GroupState.accepted}) if g.state is GroupState.kept else g
        for g in plan.groups]})


def field_range(model, name: str) -> tuple[float | None, float | None]:
    """The lowest and highest value a pydantic field allows (its ge/gt and le/lt bounds)."""
    low = high = None
    for constraint in model.model_fields[name].metadata:
        for attr in ("ge", "gt"):
            low = getattr(constraint, attr, low)
        for attr in ("le", "lt"):
            high = getattr(constraint, attr, high)
    return low, high


def field_choices(model, name: str) -> list[str]:
    """A Literal field's values, in the model's order (its default first where the model says so)."""
    return [str(v) for v in get_args(model.model_fields[name].annotation)]


def _int_range(spin: QSpinBox, model, name: str, low: int | None = None) -> None:
    """The spin box's range from the field's bounds (a whole number above gt=N starts at N+1)."""
    lo, hi = field_range(model, name)
    if low is None:
        above = any(getattr(c, "gt", None) is not None for c in model.model_fields[name].metadata)
        low = 0 if lo is None else int(lo) + above
    spin.setRange(low, int(hi) if hi is not None else 2**31 - 1)


def as_report(report) -> MergeReport | None:
    """A report as the panel reads it (a stand-in for the merge may hand back the dict)."""
    return report if report is None or isinstance(report, MergeReport) else MergeReport.from_dict(report)


# The form's row for each option, named in a bad value's message.
FORM_LABELS = {"device": "Device", "strategy": "Strategy", "optimizer": "Optimizer", "epochs": "Epochs per round",
               "lr": "Learning rate", "batch_size": "Batch size", "time_budget_s": "Time budget"}


def _lowest(accuracy: dict[str, float]) -> str:
    if not accuracy:
        return "-"
    model = min(accuracy, key=accuracy.get)
    return f"{accuracy[model]:.3f} {model}"


def step_details(s: dict) -> str:
    """Everything a round logged, one fact a line: the step log's tooltip on each of its cells."""
    accuracy = ", ".join(f"{m} {a:.3f}" for m, a in s["accuracy"].items()) or "-"
    epochs = s.get("epochs")
    trained = f" ({plural(epochs, 'epoch')})" if epochs is not None else ""
    return "\n".join([
        f"Round {s['round']}: {', '.join(s['groups'])}",
        f"Models: {', '.join(s['models'])}",
        f"Saves if kept: {human_bytes(s['savings_bytes'])}",
        f"Outcome: {s['outcome']}; next: {s['next_action']}",
        f"Accuracy: {accuracy}",
        f"Saved after the round: {human_bytes(s['saved_bytes_after'])}",
        f"Retraining {s['retrain_seconds']:.1f} s{trained}, {s['elapsed_seconds']:.1f} s into the search"])


class StepLogModel(QAbstractTableModel):
    """The search's rounds, as `Step` dicts (the report's `steps` have the same keys).

    The columns are short so the log reads in a narrow window: COLUMNS holds each one's header,
    what the header means (its tooltip) and its text. The last four are hidden until asked for
    (the header's context menu); every cell's tooltip holds the whole round (`step_details`),
    every model's accuracy included."""

    COLUMNS = (
        ("#", "Round", lambda s: str(s["round"])),
        ("Groups", "The round's candidate groups (hover a row for their ids)",
         lambda s: s["groups"][0] if len(s["groups"]) == 1 else f"{len(s['groups'])} groups"),
        ("Saves", "Saves if kept: the parameter bytes the round's groups save once merged",
         lambda s: human_bytes(s["savings_bytes"])),
        ("Outcome", "kept: every model met its target after retraining; failed: some model did not",
         lambda s: s["outcome"]),
        ("Lowest", "The lowest held-out accuracy at the end of the round, and its model (hover a row for "
                   "every model's)", lambda s: _lowest(s["accuracy"])),
        ("Next", "Next action: what the search did after this round", lambda s: s["next_action"]),
        ("Saved after", "Parameter bytes saved by every group kept so far, after this round",
         lambda s: human_bytes(s["saved_bytes_after"])),
        ("Retrain", "Seconds spent retraining in this round", lambda s: f"{s['retrain_seconds']:.1f} s"),
        ("Elapsed", "Seconds since the search started, at the end of this round",
         lambda s: f"{s['elapsed_seconds']:.1f} s"),
        ("Models", "The models retrained in this round", lambda s: ", ".join(s["models"])),
    )
    HEADERS = tuple(h for h, _, _ in COLUMNS)
    STRETCH = ("Next",)  # share the spare width, elided; the others fit their contents
    HIDDEN = ("Saved after", "Retrain", "Elapsed", "Models")  # by default: in the tooltip, the menu (and the plot)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.steps: list[dict] = []
        self._colors = PALETTES["dark"]

    def set_steps(self, steps: list[dict]) -> None:
        self.beginResetModel()
        self.steps = [dict(s) for s in steps]
        self.endResetModel()

    def add_step(self, step: dict) -> None:
        self.beginInsertRows(QModelIndex(), len(self.steps), len(self.steps))
        self.steps.append(dict(step))
        self.endInsertRows()

    def set_colors(self, colors: dict) -> None:
        self._colors = colors
        if self.steps:
            self.dataChanged.emit(self.index(0, 0), self.index(self.rowCount() - 1, self.columnCount() - 1))

    def text(self, row: int, header: str) -> str:
        """The cell under `header` in `row`, as shown."""
        return self.data(self.index(row, self.HEADERS.index(header)))

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.steps)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.COLUMNS)

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        s = self.steps[index.row()]
        header, _tip, text = self.COLUMNS[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            return text(s)
        if role == Qt.ItemDataRole.ToolTipRole:
            return step_details(s)
        if role == Qt.ItemDataRole.ForegroundRole and header == "Outcome":
            return QBrush(QColor(self._colors["savings" if s["outcome"] == "kept" else "bound"]))
        if role == Qt.ItemDataRole.TextAlignmentRole and header in ("#", "Saves", "Saved after", "Retrain",
                                                                    "Elapsed"):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation != Qt.Orientation.Horizontal:
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return self.COLUMNS[section][0]
        if role == Qt.ItemDataRole.ToolTipRole:
            return f"{self.COLUMNS[section][1]}\n{MENU_HINT}"
        return None


class ReportModel(QAbstractTableModel):
    """The report's per-model rows: accuracy before and after merging, and the target. Short
    headers, each explained by its tooltip: the table sits in the narrow column of controls."""

    HEADERS = ("Model", "Before", "After", "Target", "Met")
    TIPS = {"Model": "The model", "Before": "Held-out accuracy of the unmerged model",
            "After": "Held-out accuracy of the merged, retrained model",
            "Target": "The accuracy the merged model had to reach", "Met": "Whether it reached its target"}

    def __init__(self, parent=None):
        super().__init__(parent)
        self.rows: list[tuple[str, ModelOutcome]] = []
        self._colors = PALETTES["dark"]

    def set_report(self, report: MergeReport | None) -> None:
        self.beginResetModel()
        self.rows = list(report.models.items()) if report is not None else []
        self.endResetModel()

    def set_colors(self, colors: dict) -> None:
        self._colors = colors
        if self.rows:
            self.dataChanged.emit(self.index(0, 0), self.index(self.rowCount() - 1, self.columnCount() - 1))

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.HEADERS)

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        name, row = self.rows[index.row()]
        column = self.HEADERS[index.column()]
        if role == Qt.ItemDataRole.DisplayRole:
            if column == "Model":
                return name
            if column == "Met":
                return "yes" if row.passed else "no"
            value = {"Before": row.unmerged_accuracy, "After": row.merged_accuracy, "Target": row.target}[column]
            return f"{value:.3f}"
        if role == Qt.ItemDataRole.ForegroundRole and column == "Met":
            return QBrush(QColor(self._colors["savings" if row.passed else "bound"]))
        if role == Qt.ItemDataRole.TextAlignmentRole and column != "Model":
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return self.HEADERS[section]
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.ToolTipRole:
            return self.TIPS[self.HEADERS[section]]
        return None


class ModelCurves:
    """One model's accuracy and loss per epoch (full resolution), its plot items and target."""

    def __init__(self, name: str):
        self.name = name
        self.epochs: list[int] = []  # epochs trained in this run, counted across rounds
        self.accuracy: list[float] = []
        self.loss: list[float] = []
        self.target: float | None = None
        self.accuracy_curve = pg.PlotDataItem([], [], name=name, symbol="o", symbolSize=5)
        self.loss_curve = pg.PlotDataItem([], [], name=name, symbol="o", symbolSize=5)
        self.target_line = pg.InfiniteLine(angle=0, movable=False)
        self.target_line.setVisible(False)

    def redraw(self) -> None:
        x = np.asarray(self.epochs, dtype=float)
        self.accuracy_curve.setData(x, np.asarray(self.accuracy, dtype=float))
        self.loss_curve.setData(x, np.asarray(self.loss, dtype=float))
        if self.target is not None:
            self.target_line.setValue(self.target)
            self.target_line.setVisible(True)

    def set_color(self, color: str) -> None:
        pen = pg.mkPen(color, width=2)
        for curve in (self.accuracy_curve, self.loss_curve):
            curve.setPen(pen)
            curve.setSymbolPen(pg.mkPen(color))
            curve.setSymbolBrush(pg.mkBrush(color))
        self.target_line.setPen(pg.mkPen(color, width=1.5, style=Qt.PenStyle.DashLine))


def _plot(parent: QWidget, title: str, left: str, bottom: str,
          legend_offset=(-10, 10)) -> tuple[pg.PlotWidget, pg.PlotItem, pg.LegendItem]:
    widget = pg.PlotWidget(parent)
    item = widget.getPlotItem()
    item.setTitle(title)
    item.setLabel("left", left)
    item.setLabel("bottom", bottom)
    item.setMenuEnabled(False)
    legend = item.addLegend(offset=legend_offset)
    return widget, item, legend


class RetrainingPanel(TaskMixin, QWidget):
    sigWorkerStarted = Signal(object)  # each run's Worker as it starts
    sigRunFinished = Signal(object)  # the MergeReport
    sigError = Signal(str)
    sigPlanRestored = Signal(object)  # the path of a plan a resumed merge started with

    task_noun = "merge"

    def __init__(self, parent=None):
        super().__init__(parent)
        self.workload: Workload | None = None
        self.analysis: WorkloadAnalysis | None = None
        self.plan: MergePlan | None = None
        self.report: MergeReport | None = None
        self.curves: dict[str, ModelCurves] = {}
        self.saved_points: list[tuple[float, int]] = []  # (elapsed seconds, bytes saved) per round
        self._out_dir_chosen = False
        self._epochs_seen = 0
        self._run_out_dir: Path | None = None
        self._offered: set[str] = set()  # folders whose resume was offered in this session
        self.colors = PALETTES["dark"]

        # settings
        self.device_combo = QComboBox(self)
        self.device_combo.addItems(["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else []))
        self.device_combo.setToolTip("auto: the GPU when there is one, else the CPU")
        self.strategy_combo = QComboBox(self)
        self.strategy_combo.addItems(list(STRATEGY_NAMES))
        self.strategy_combo.setCurrentText(MergeOptions().strategy)
        self.strategy_combo.setToolTip("bisect: try every group at once, split on failure (fewer rounds when "
                                       "merges succeed)\ngemel: candidates heaviest first, halve on failure")
        self.optimizer_combo = QComboBox(self)
        self.optimizer_combo.addItems(field_choices(RetrainSettings, "optimizer"))
        self.epochs_spin = QSpinBox(self)
        _int_range(self.epochs_spin, RetrainSettings, "epochs")
        self.epochs_spin.setToolTip("Most epochs per round; a round stops early once every model meets its target")
        self.lr_edit = QLineEdit(self)
        validator = QDoubleValidator(*(float(b) for b in field_range(RetrainSettings, "lr")), 8, self)
        validator.setNotation(QDoubleValidator.Notation.ScientificNotation)
        self.lr_edit.setValidator(validator)
        self.batch_spin = QSpinBox(self)
        _int_range(self.batch_spin, RetrainSettings, "batch_size")
        self.budget_spin = QSpinBox(self)
        _int_range(self.budget_spin, RetrainSettings, "time_budget_s", low=0)  # 0: none
        self.budget_spin.setSuffix(" s")
        self.budget_spin.setSpecialValueText("none")
        self.budget_spin.setToolTip("Stop the search after this many seconds (0: no limit)")
        self.out_edit = QLineEdit(self)
        self.out_edit.textEdited.connect(self._out_dir_edited)
        self.choose_button = QPushButton("Choose…", self)
        self.choose_button.clicked.connect(self.choose_out_dir)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(self.choose_button)
        self._apply_settings(RetrainSettings())

        form = QFormLayout()
        form.addRow("Device", self.device_combo)
        form.addRow("Strategy", self.strategy_combo)
        form.addRow("Optimizer", self.optimizer_combo)
        form.addRow("Epochs per round", self.epochs_spin)
        form.addRow("Learning rate", self.lr_edit)
        form.addRow("Batch size", self.batch_spin)
        form.addRow("Time budget", self.budget_spin)
        form.addRow("Output folder", out_row)

        # run controls
        self.start_button = QPushButton("Start", self)
        self.start_button.setToolTip("Merge afresh in the output folder (asks before deleting a checkpoint or "
                                     "report there)")
        self.pause_button = QPushButton("Pause", self)
        self.pause_button.setToolTip("Stop at the next training step and keep the checkpoint; Resume continues "
                                     "exactly from there")
        self.resume_button = QPushButton("Resume", self)
        self.resume_button.setToolTip("Run again on the output folder, continuing from its checkpoint")
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setToolTip("Stop and delete the checkpoint (asks first)")
        self.start_button.clicked.connect(self.start)
        self.pause_button.clicked.connect(self.pause)
        self.resume_button.clicked.connect(self.resume)
        self.cancel_button.clicked.connect(self.cancel)
        controls = QGridLayout()
        controls.addWidget(self.start_button, 0, 0)
        controls.addWidget(self.pause_button, 0, 1)
        controls.addWidget(self.resume_button, 1, 0)
        controls.addWidget(self.cancel_button, 1, 1)
        self.progress_bar = QProgressBar(self)
        self.progress_bar.setTextVisible(True)
        self.status_label = QLabel("", self)
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.plan_label = QLabel("", self)
        self.plan_label.setWordWrap(True)
        self.random_label = QLabel("", self)  # models with random weights: their figures mean nothing
        self.random_label.setWordWrap(True)
        self.random_label.setObjectName("warningLabel")
        self.random_label.hide()

        left = QWidget(self)
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 6, 0)
        title = QLabel("Retraining", left)
        title.setObjectName("panelTitle")
        left_layout.addWidget(title)
        left_layout.addWidget(self.plan_label)
        left_layout.addWidget(self.random_label)
        left_layout.addLayout(form)
        left_layout.addLayout(controls)
        left_layout.addWidget(self.progress_bar)
        left_layout.addWidget(self.status_label)
        left.setMinimumWidth(250)
        left.setMaximumWidth(340)
        self.init_task(self.status_label, self.progress_bar)

        # live plots
        self.accuracy_plot, self.accuracy_item, self.accuracy_legend = _plot(
            self, "Accuracy", "held-out accuracy (dashed: target)", "epoch (all rounds)")
        self.accuracy_item.setYRange(0, 1.02, padding=0)
        self.loss_plot, self.loss_item, self.loss_legend = _plot(
            self, "Training loss", "cross-entropy", "epoch (all rounds)")
        self.saved_plot, self.saved_item, self.saved_legend = _plot(
            self, "Memory saved", "parameter bytes saved (MiB)", "seconds", legend_offset=(-10, -10))
        # Savings change only when a round ends: a step line, with a marker at each round's end.
        self.saved_steps = self.saved_item.plot([], [])
        self.saved_curve = pg.PlotDataItem([], [], name="saved after each round", pen=None, symbol="o", symbolSize=7)
        self.saved_item.addItem(self.saved_curve)
        self.plan_line = pg.InfiniteLine(angle=0, movable=False, label="plan's savings",
                                         labelOpts={"position": 0.03, "anchors": [(0.0, 1.0), (0.0, 1.0)]})
        self.saved_item.addItem(self.plan_line)
        self.plan_line.setVisible(False)
        self.round_lines: list[pg.InfiniteLine] = []  # where each round ended, on the epoch axis

        # step log and report
        self.steps_model = StepLogModel(self)
        self.steps_view = self._table(self.steps_model)
        header = self.steps_view.horizontalHeader()
        for name in StepLogModel.STRETCH:  # the long texts take the spare width, elided
            header.setSectionResizeMode(StepLogModel.HEADERS.index(name), QHeaderView.ResizeMode.Stretch)
        self.steps_view.setTextElideMode(Qt.TextElideMode.ElideRight)
        self.step_columns_menu = column_menu(self.steps_view, StepLogModel.HEADERS, StepLogModel.HIDDEN,
                                             "retraining/hidden_step_columns")
        self.report_model = ReportModel(self)
        self.report_view = self._table(self.report_model)
        self.report_view.horizontalHeader().setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        # The report takes the height left under the controls (a table's own size hint would
        # make the column scroll in a 700-pixel window), at least its header and two rows.
        policy = self.report_view.sizePolicy()
        policy.setVerticalPolicy(QSizePolicy.Policy.Ignored)
        self.report_view.setSizePolicy(policy)
        self.report_view.setMinimumHeight(3 * 24 + 4)
        self.report_label = QLabel("No report yet", self)
        self.report_label.setWordWrap(True)
        self.report_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        steps_box = self._titled("Step log (the search's rounds)", self.steps_view)
        report_box = self._titled("Report", self.report_label, self.report_view)

        plots = QSplitter(Qt.Orientation.Horizontal, self)
        for w in (self.accuracy_plot, self.loss_plot, self.saved_plot):
            plots.addWidget(w)
        # The report goes under the run's controls, the step log gets the width under the
        # plots: side by side, neither read in a 1024-pixel window.
        left_layout.addWidget(report_box, 1)
        right = QSplitter(Qt.Orientation.Vertical, self)
        right.addWidget(plots)
        right.addWidget(steps_box)
        right.setSizes([480, 320])

        # A short window scrolls the settings and the report rather than growing the window's
        # minimum height (every tab's minimum is the window's).
        left_scroll = QScrollArea(self)
        left_scroll.setWidget(left)
        left_scroll.setWidgetResizable(True)
        left_scroll.setFrameShape(QFrame.Shape.NoFrame)
        left_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        left_scroll.setMinimumWidth(left.minimumWidth())
        left_scroll.setMaximumWidth(left.maximumWidth())
        layout = QHBoxLayout(self)
        layout.addWidget(left_scroll)
        layout.addWidget(right, 1)
        self.set_colors(self.colors)
        self._update_enabled()

    def _table(self, model: QAbstractTableModel) -> QTableView:
        view = QTableView(self)
        view.setModel(model)
        view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        view.setAlternatingRowColors(True)
        view.setWordWrap(False)
        view.verticalHeader().setVisible(False)
        view.verticalHeader().setDefaultSectionSize(24)
        view.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        return view

    def _titled(self, title: str, *widgets: QWidget) -> QWidget:
        box = QWidget(self)
        layout = QVBoxLayout(box)
        layout.setContentsMargins(0, 0, 0, 0)
        label = QLabel(title, box)
        label.setObjectName("panelTitle")
        layout.addWidget(label)
        for w in widgets:
            layout.addWidget(w, 1 if isinstance(w, QTableView) else 0)
        return box

    # --- context ----------------------------------------------------------------------------

    def set_workload(self, workload: Workload | None, analysis: WorkloadAnalysis | None) -> None:
        self.workload, self.analysis = workload, analysis
        if not self._out_dir_chosen:
            self.out_edit.setText(str(default_out_dir(workload)))
        self._update_enabled()

    def set_plan(self, plan: MergePlan | None, replaced: bool = True) -> None:
        """The plan to merge; a new one (not an edit of the same) brings its retraining settings."""
        self.plan = plan
        if plan is not None and replaced:
            self._apply_settings(plan.retraining)
        self._update_enabled()

    def _apply_settings(self, s: RetrainSettings) -> None:
        device = s.device if self.device_combo.findText(s.device) >= 0 else "auto"
        self.device_combo.setCurrentText(device)
        self.optimizer_combo.setCurrentText(s.optimizer)
        self.epochs_spin.setValue(s.epochs)
        self.lr_edit.setText(f"{s.lr:g}")
        self.batch_spin.setValue(s.batch_size)
        self.budget_spin.setValue(round(s.time_budget_s or 0))

    def merge_options(self) -> MergeOptions:
        """The form's options, over the plan's retraining settings (momentum and weight decay
        come from the plan), validated by MergeOptions; a bad value raises ValueError naming it."""
        base = self.plan.retraining if self.plan is not None else RetrainSettings()
        text = self.lr_edit.text().strip()
        try:
            lr = float(text)
        except ValueError:
            raise ValueError(f"learning rate '{text}' is not a number; use e.g. 0.001") from None
        update = {"device": self.device_combo.currentText(), "optimizer": self.optimizer_combo.currentText(),
                  "epochs": self.epochs_spin.value(), "lr": lr, "batch_size": self.batch_spin.value(),
                  "time_budget_s": float(self.budget_spin.value()) or None}
        try:
            return MergeOptions.model_validate({"strategy": self.strategy_combo.currentText(),
                                                "retraining": {**base.model_dump(), **update}})
        except ValidationError as exc:
            err = exc.errors()[0]
            field = str(err["loc"][-1]) if err["loc"] else "?"
            raise ValueError(f"retraining setting '{field}' ({FORM_LABELS.get(field, field)}): "
                             f"{err['msg']}") from None

    def retrain_settings(self) -> RetrainSettings:
        """The retraining settings shown (see `merge_options`)."""
        return self.merge_options().retraining

    def out_dir(self) -> Path:
        return Path(self.out_edit.text().strip()).expanduser()

    def set_out_dir(self, path: Path | str) -> None:
        self.out_edit.setText(str(path))
        self._out_dir_edited()

    def _out_dir_edited(self, *args) -> None:
        self._out_dir_chosen = True
        self._update_enabled()

    def choose_out_dir(self) -> None:
        start = settings.studio_settings().value("retraining/folder", str(self.out_dir().parent), type=str)
        chosen = QFileDialog.getExistingDirectory(self, "Output folder for the merged workload", start)
        if chosen:
            settings.studio_settings().setValue("retraining/folder", chosen)
            self.set_out_dir(chosen)

    # --- running ----------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.task_running

    @property
    def worker(self) -> Worker | None:
        return self.task_worker

    def folder(self) -> MergedFolder:
        return MergedFolder(self.out_dir())

    def start(self) -> Worker | None:
        """Merge afresh: clear the folder's checkpoint and old report (asking first when there
        is one), the curves and the log, then run."""
        if self.running or not self._ready():
            return None
        folder = self.folder()
        loss = folder.describe_loss()
        if loss and not self.confirm(
                "Start a new merge?",
                f"{folder.path} holds {loss}. Starting afresh deletes it; Resume continues a paused "
                f"merge instead.", yes="Delete and start afresh", no="Keep it"):
            self.set_status_line(f"Kept {loss} in {folder.path}; nothing started")
            return None
        try:
            folder.clear()
        except OSError as exc:
            self._fail(f"{folder.path}: cannot clear the old checkpoint ({exc.strerror or exc})")
            return None
        self._clear_run()
        return self._run(folder.path, resumed=False)

    def resume(self) -> Worker | None:
        """Run the same merge again on the output folder: the core continues from its checkpoint."""
        if self.running or not self._ready():
            return None
        return self._run(self.out_dir(), resumed=True)

    def pause(self) -> None:
        self.stop_task("pause", "Pausing at the next training step…")

    def cancel(self) -> None:
        """Stop and delete the checkpoint, once the operator confirms (the question names it)."""
        if not self.running or self.task_stopping:
            return
        folder = self.folder()
        if not self.confirm(
                "Cancel the merge?",
                f"Cancelling stops the merge and deletes its checkpoint in {folder.path}; the rounds "
                f"done so far are lost. Pause keeps them.", yes="Cancel and delete the checkpoint",
                no="Keep running"):
            return
        self.stop_task("cancel", "Cancelling…")

    def quit_question(self) -> str:
        if not self.running:
            return ""
        return (f"A merge is running in {self._run_out_dir}; quitting pauses it at the next training step "
                f"(its checkpoint stays, and the next launch offers to resume it).")

    def random_models(self) -> list[str]:
        """The plan's models that start from random weights (torchvision with no `weights:`)."""
        if self.workload is None or self.plan is None:
            return []
        members = {m.model for g in self.plan.groups for m in g.members}
        return [m.name for m in self.workload.models if m.name in members and m.source.kind == "torchvision"
                and not getattr(m.source, "weights", None)]

    def _ready(self) -> bool:
        return self.workload is not None and self.plan is not None and bool(groups_to_try(self.plan)[0])

    def _run(self, out_dir: Path, resumed: bool) -> Worker | None:
        try:
            options = self.merge_options()
        except ValueError as exc:
            self._fail(str(exc))
            return None
        if not str(out_dir).strip() or str(out_dir) == ".":
            self._fail("choose an output folder for the merged workload")
            return None
        workload = self.workload
        plan = plan_for_run(self.plan).model_copy(update={"retraining": options.retraining})
        strategy = options.strategy
        self._remember_run(out_dir, plan, strategy)
        self._set_plan_line(plan)
        self.report = None
        self.report_model.set_report(None)
        self.report_label.setText("Running…")
        self._run_out_dir = out_dir

        def work(progress, partial):
            return merge_workload(workload, plan, out_dir, strategy=strategy, progress=progress,
                                  on_step=lambda step: partial(("step", asdict(step))),
                                  on_epoch=lambda record: partial(("epoch", record)),
                                  on_targets=lambda targets: partial(("targets", targets)))

        worker = self.start_task(
            work, name=f"merge of {workload.name}", min_interval=0.1,
            message=f"{'Resuming' if resumed else 'Starting'} the {strategy} search in {out_dir}…")
        self.sigWorkerStarted.emit(worker)
        return worker

    # --- what a relaunch resumes --------------------------------------------------------------

    def _remember_run(self, out_dir: Path, plan: MergePlan, strategy: str) -> None:
        """The folder keeps what this merge started with, so a relaunch can offer to resume it."""
        folder = MergedFolder(out_dir)
        try:
            folder.path.mkdir(parents=True, exist_ok=True)
            save_plan(plan, folder.path / RUN_PLAN)
            folder.write_run_settings({"workload": str(self.workload.path) if self.workload.path else None,
                                       "strategy": strategy})
        except OSError:
            return  # the run itself reports an unwritable folder
        settings.studio_settings().setValue("retraining/last_out_dir", str(folder.path))

    def resumable_run(self) -> MergedFolder | None:
        """The folder of the last merge started here when it can resume on this workload."""
        last = settings.studio_settings().value("retraining/last_out_dir", "", type=str)
        if not last or self.workload is None or self.workload.path is None:
            return None
        folder = MergedFolder(Path(last))
        run = folder.run_settings() or {}
        if not folder.can_resume or run.get("workload") != str(self.workload.path):
            return None
        if not (folder.path / RUN_PLAN).exists():
            return None
        return folder

    def offer_resume(self) -> bool:
        """Ask whether to resume the last merge of this workload, stopped before its report;
        yes restores its plan, folder and settings and resumes. Asked once a session a folder."""
        folder = self.resumable_run()
        if folder is None or self.running or str(folder.path) in self._offered:
            return False
        self._offered.add(str(folder.path))
        run = folder.run_settings() or {}
        if not self.confirm("Resume the merge?",
                            f"The merge of {self.workload.name} in {folder.path} stopped before it finished. "
                            f"Resume it with the plan and settings it started with?",
                            yes="Resume", no="Not now"):
            return False
        try:
            plan = load_plan(folder.path / RUN_PLAN, self.workload, self.analysis)
        except (PlanError, OSError, ValueError) as exc:
            self._fail(str(exc).splitlines()[0])
            return False
        self.sigPlanRestored.emit(folder.path / RUN_PLAN)  # the Proposals tab shows it, and passes it here
        if self.plan != plan:  # nobody listening (a panel on its own)
            self.set_plan(plan, replaced=True)
        self.strategy_combo.setCurrentText(run.get("strategy", self.strategy_combo.currentText()))
        self.set_out_dir(folder.path)
        return self.resume() is not None

    def _clear_run(self) -> None:
        self.steps_model.set_steps([])
        self.saved_points = []
        self._epochs_seen = 0
        for c in self.curves.values():
            for item, plot in ((c.accuracy_curve, self.accuracy_item), (c.loss_curve, self.loss_item),
                               (c.target_line, self.accuracy_item)):
                plot.removeItem(item)
        self.curves = {}
        for line in self.round_lines:
            self.accuracy_item.removeItem(line)
        self.round_lines = []
        self.accuracy_legend.clear()
        self.loss_legend.clear()
        self._draw_saved()

    # --- events from the work (on the GUI thread) -------------------------------------------

    def on_task_progress(self, done: int, total: int, message: str) -> None:
        self.progress_bar.setRange(0, max(1, total))
        self.progress_bar.setValue(done)
        round_no = len(self.steps_model.steps) + 1
        self.progress_bar.setFormat(f"round {round_no}: %v/%m")
        if not self.task_stopping:
            self.set_status_line(f"Round {round_no}: {message} ({self.task_elapsed:.0f} s)")

    def _set_targets(self, targets: dict[str, tuple[float, float]]) -> None:
        """Each model's target as the merge derived it from the measured unmerged accuracy."""
        for name, (_unmerged, target) in targets.items():
            curves = self._curves(name)
            curves.target = target
            curves.redraw()

    def _curves(self, name: str) -> ModelCurves:
        if name not in self.curves:
            c = ModelCurves(name)
            self.curves[name] = c
            self.accuracy_item.addItem(c.accuracy_curve)
            self.accuracy_item.addItem(c.target_line)
            self.loss_item.addItem(c.loss_curve)
            self._color_curves()
        return self.curves[name]

    def on_task_partial(self, value) -> None:
        kind, payload = value
        if kind == "epoch":
            self._add_epoch(payload)
        elif kind == "step":
            self._add_step(payload)
        elif kind == "targets":
            self._set_targets(payload)

    def _add_epoch(self, record: EpochRecord) -> None:
        self._epochs_seen += 1
        for name in record.accuracy:
            c = self._curves(name)
            c.epochs.append(self._epochs_seen)
            c.accuracy.append(record.accuracy[name])
            c.loss.append(record.loss[name])
            c.redraw()
        spacing = max(1, -(-self._epochs_seen // 10))  # whole epochs, ten ticks at most
        for item in (self.accuracy_item, self.loss_item):
            item.setXRange(0.5, self._epochs_seen + 0.5, padding=0.02)
            item.getAxis("bottom").setTickSpacing(spacing, spacing)

    def _add_step(self, step: dict) -> None:
        self.steps_model.add_step(step)
        self.steps_view.scrollToBottom()
        if self._epochs_seen:
            line = pg.InfiniteLine(pos=self._epochs_seen + 0.5, angle=90, movable=False,
                                   pen=pg.mkPen(self.colors["axis"], width=1, style=Qt.PenStyle.DotLine))
            self.accuracy_item.addItem(line)
            self.round_lines.append(line)
        self._draw_saved()

    def _draw_saved(self) -> None:
        steps = self.steps_model.steps
        x = np.array([0.0, *(s["elapsed_seconds"] for s in steps)], dtype=float)
        y = np.array([0.0, *(s["saved_bytes_after"] for s in steps)], dtype=float) / MIB
        if steps:
            self.saved_curve.setData(x, y)
            self.saved_steps.setData(np.repeat(x, 2)[1:], np.repeat(y, 2)[:-1])
        else:
            self.saved_curve.setData([], [])
            self.saved_steps.setData([], [])

    def _set_plan_line(self, plan: MergePlan) -> None:
        """The savings if every round succeeds: the groups the search will try."""
        bytes_ = sum(c.savings_bytes for c in candidates(plan))
        self.plan_line.setVisible(True)
        self.plan_line.setValue(bytes_ / MIB)
        self.plan_line.label.setFormat(f"plan's savings {human_bytes(bytes_)}")
        top = bytes_ / MIB * 1.15 or 1
        self.saved_item.setYRange(-0.03 * top, top, padding=0)

    @property
    def last_out_dir(self) -> Path | None:
        """The output folder of the latest run (its plan.yaml and report.json once it finished)."""
        return self._run_out_dir

    def saved_series(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.saved_curve.getData()
        return (np.asarray(x if x is not None else [], dtype=float),
                np.asarray(y if y is not None else [], dtype=float))

    def on_task_done(self, report: MergeReport) -> None:
        report = as_report(report)
        self._show_report(report)
        self.set_status_line(f"Done in {self.task_elapsed:.1f} s: {report.passed}/{len(report.models)} models meet "
                             f"their targets. Written to {self._run_out_dir}")
        self.sigRunFinished.emit(report)

    def _show_report(self, report: MergeReport) -> None:
        self.report = report
        # The report is the record: it holds every round, also those run before a pause.
        self.steps_model.set_steps(report.steps)
        self._draw_saved()
        for name, row in report.models.items():
            c = self._curves(name)
            c.target = row.target
            c.redraw()
        self.report_model.set_report(report)
        self.report_label.setText(
            f"Parameters {human_bytes(report.bytes_before)} → {human_bytes(report.bytes_after)}: saved "
            f"{human_bytes(report.saved_bytes)}, {report.fraction_of_bound:.1%} of the all-shareable "
            f"{human_bytes(report.all_shareable_bytes)}. {plural(report.rounds, 'round')}, "
            f"{report.retrain_seconds:.1f} s retraining on {report.device}; stopped: {report.stopped}.")

    def on_task_failed(self, message: str) -> None:
        self.report_label.setText("No report: the run failed")
        self._fail(message)

    def on_task_cancelled(self, mode: str) -> None:
        folder = MergedFolder(self._run_out_dir)
        report = folder.report()
        if report is not None:
            # The stop came as the search wrote its report: the merge finished, and the screen
            # shows what the folder holds.
            self._show_report(report)
            self.set_status_line(f"Finished as the {'pause' if mode != 'cancel' else 'cancel'} came: the merge "
                                 f"wrote its report to {folder.path}")
            self.sigRunFinished.emit(report)
            return
        rounds = plural(len(self.steps_model.steps), "round")
        if mode == "cancel":
            folder.delete_checkpoint()
            self.set_status_line(f"Cancelled after {rounds}; the checkpoint was deleted")
        else:
            self.set_status_line(f"Paused after {rounds}. Resume continues from the checkpoint in {folder.path}")
        self.report_label.setText("No report yet")

    def _fail(self, message: str) -> None:
        # The window shows the message (once, in its banner); the panel's line says where it went.
        self.set_status_line("Failed: the message is shown above")
        self.sigError.emit(message)

    def update_controls(self) -> None:
        self._update_enabled()

    def _update_enabled(self) -> None:
        ready = self._ready()
        running = self.running
        self.start_button.setEnabled(ready and not running)
        self.resume_button.setEnabled(ready and not running and can_resume(self.out_dir()))
        self.pause_button.setEnabled(running and not self.task_stopping)
        self.cancel_button.setEnabled(running and not self.task_stopping)
        for w in (self.device_combo, self.strategy_combo, self.optimizer_combo, self.epochs_spin, self.lr_edit,
                  self.batch_spin, self.budget_spin, self.out_edit, self.choose_button):
            w.setEnabled(not running)
        if self.plan is None:
            self.plan_label.setText("No plan: propose or load one in the Proposals tab")
        else:
            chosen, why = groups_to_try(self.plan)
            self.plan_label.setText(f"Plan: Start tries {len(chosen)} of its {plural(len(self.plan.groups), 'group')}"
                                    f": {why}")
        random = self.random_models()
        self.random_label.setText(f"Warning: {', '.join(random)} {'has' if len(random) == 1 else 'have'} random "
                                  f"weights, so the accuracy figures of this merge mean nothing until "
                                  f"{'it is' if len(random) == 1 else 'they are'} fine-tuned (Fine-tune tab)."
                                  if random else "")
        self.random_label.setVisible(bool(random))
        self.progress_bar.setVisible(running)
        self.out_edit.setToolTip(f"{self.out_dir()}\nMerged weights, plan.yaml, report.json and the checkpoint "
                                 "that Resume uses")

    # --- theme ------------------------------------------------------------------------------

    def set_colors(self, colors: dict) -> None:
        self.colors = colors
        for widget, item in ((self.accuracy_plot, self.accuracy_item), (self.loss_plot, self.loss_item),
                             (self.saved_plot, self.saved_item)):
            widget.setBackground(colors["background"])
            style_plot(item, colors)
            item.showGrid(x=True, y=True, alpha=colors["grid"] / 255)
            item.titleLabel.setText(item.titleLabel.text, color=colors["foreground"])
        self.saved_steps.setPen(pg.mkPen(colors["savings"], width=2))
        self.saved_curve.setSymbolBrush(pg.mkBrush(colors["savings"]))
        self.saved_curve.setSymbolPen(pg.mkPen(colors["savings"]))
        self.plan_line.setPen(pg.mkPen(colors["bound"], width=1.5, style=Qt.PenStyle.DashLine))
        self.plan_line.label.setColor(colors["bound"])
        for line in self.round_lines:
            line.setPen(pg.mkPen(colors["axis"], width=1, style=Qt.PenStyle.DotLine))
        self.steps_model.set_colors(colors)
        self.report_model.set_colors(colors)
        self._color_curves()

    def _color_curves(self) -> None:
        series = self.colors["series"]
        order = [m.name for m in self.workload.models] if self.workload is not None else []
        for legend in (self.accuracy_legend, self.loss_legend, self.saved_legend):
            legend.clear()
            legend.setLabelTextColor(self.colors["foreground"])
        for i, (name, c) in enumerate(self.curves.items()):
            index = order.index(name) if name in order else i
            c.set_color(series[index % len(series)])
            self.accuracy_legend.addItem(c.accuracy_curve, name)
            self.loss_legend.addItem(c.loss_curve, name)
        self.saved_legend.addItem(self.saved_curve, "saved after each round")
