"""The Proposals tab: the merge plan's share groups, to accept or reject before retraining.

The plan (a `MergePlan`) is the one thing edited here; every figure shown is computed from
the plan and the workload's analysis by `merged_memory`, so the gauge can never disagree
with the table. A plan file that does not fit the workload is refused with its one-line
`PlanError` and the current plan stays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QAbstractTableModel, QModelIndex, Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QAbstractItemView, QFileDialog, QHBoxLayout, QHeaderView, QLabel, QProgressBar,
                               QPushButton, QSpinBox, QTableView, QVBoxLayout, QWidget)

from ..analysis import WorkloadAnalysis
from ..units import human_bytes
from ..errors import GemelError
from ..merging.plan import GroupState, MergePlan, PlanError, load_plan, propose_plan, save_plan, validate_plan
from ..workload import Workload
from .settings import PALETTES

RAW_ROLE = Qt.ItemDataRole.UserRole + 1  # the unformatted value, for tests and sorting
PLAN_FILTER = "Merge plans (*.yaml *.yml);;All files (*)"
MIB = 1024 * 1024


@dataclass(frozen=True)
class MergedMemory:
    """Parameter memory of the workload if the plan's merged groups share one copy."""

    total_bytes: int  # every model's parameters, unmerged
    saved_bytes: int  # accepted (and kept) groups' savings
    bound_bytes: int  # the all-shareable bound: every share group merged

    @property
    def after_bytes(self) -> int:
        return self.total_bytes - self.saved_bytes

    @property
    def fraction_of_bound(self) -> float:
        return self.saved_bytes / self.bound_bytes if self.bound_bytes else 0.0


def merged_memory(plan: MergePlan | None, analysis: WorkloadAnalysis | None) -> MergedMemory:
    total = analysis.total_param_bytes if analysis else 0
    bound = analysis.max_savings_bytes if analysis else 0
    return MergedMemory(total, plan.merged_savings_bytes if plan else 0, bound)


def signature_kind(signature: str) -> str:
    """'Conv2d(in=64,...)' -> 'Conv2d'."""
    return signature.split("(", 1)[0]


class PlanTableModel(QAbstractTableModel):
    HEADERS = ("Group", "Kind", "Models", "Saves", "State")
    TOOLTIPS = {"Saves": "Parameter bytes saved if the group's members share one copy: "
                         "bytes per copy × (members − 1)"}

    def __init__(self, parent=None):
        super().__init__(parent)
        self.plan: MergePlan | None = None
        self._colors = PALETTES["dark"]

    def set_plan(self, plan: MergePlan | None) -> None:
        self.beginResetModel()
        self.plan = plan
        self.endResetModel()

    def set_colors(self, colors: dict) -> None:
        self._colors = colors
        self.states_changed()

    def states_changed(self, rows: list[int] | None = None) -> None:
        if not self.rowCount():
            return
        first, last = (min(rows), max(rows)) if rows else (0, self.rowCount() - 1)
        self.dataChanged.emit(self.index(first, 0), self.index(last, self.columnCount() - 1))

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() or self.plan is None else len(self.plan.groups)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.HEADERS)

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid() or self.plan is None:
            return None
        group = self.plan.groups[index.row()]
        column = self.HEADERS[index.column()]
        raw = {"Group": group.id, "Kind": signature_kind(group.signature),
               "Models": [m.model for m in group.members], "Saves": group.savings_bytes,
               "State": group.state.value}[column]
        if role == RAW_ROLE:
            return raw
        if role == Qt.ItemDataRole.DisplayRole:
            if column == "Models":
                return ", ".join(raw)
            if column == "Saves":
                return human_bytes(raw)
            if column == "State":
                return raw.replace("_", " ")
            return raw
        if role == Qt.ItemDataRole.TextAlignmentRole and column == "Saves":
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ForegroundRole and column == "State":
            if group.state.merged:
                return QBrush(QColor(self._colors["savings"]))
            if group.state in (GroupState.rejected, GroupState.backed_off):
                return QBrush(QColor(self._colors["bound"]))
        if role == Qt.ItemDataRole.ToolTipRole:
            members = "<br>".join(f"{m.model}: {m.layer}" for m in group.members)
            return (f"<b>{group.id}</b> {group.signature}<br>{members}<br>{human_bytes(group.bytes_per_copy)} per "
                    f"copy, saves {human_bytes(group.savings_bytes)} ({group.savings_bytes:,} bytes)")
        return None

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation != Qt.Orientation.Horizontal:
            return str(section + 1) if role == Qt.ItemDataRole.DisplayRole else None
        if role == Qt.ItemDataRole.DisplayRole:
            return self.HEADERS[section]
        if role == Qt.ItemDataRole.ToolTipRole:
            return self.TOOLTIPS.get(self.HEADERS[section])
        return None


class ProposalsPanel(QWidget):
    sigPlanReplaced = Signal(object)  # a new MergePlan (proposed or loaded), or None
    sigPlanEdited = Signal(object)  # the same plan, with group states changed
    sigError = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.workload: Workload | None = None
        self.analysis: WorkloadAnalysis | None = None
        self.plan: MergePlan | None = None
        self.plan_path: Path | None = None
        self._note = ""  # what last happened to the plan: proposed, loaded, saved

        self.propose_button = QPushButton("Propose", self)
        self.propose_button.setToolTip("A plan with every share group of the analysis, heaviest savings first")
        self.accept_button = QPushButton("Accept", self)
        self.reject_button = QPushButton("Reject", self)
        self.threshold_spin = QSpinBox(self)
        self.threshold_spin.setRange(0, 100_000)
        self.threshold_spin.setSuffix(" MiB")
        self.threshold_spin.setValue(1)
        self.threshold_spin.setToolTip("Groups saving at least this much are accepted by 'Accept all above'")
        self.threshold_button = QPushButton("Accept all above", self)
        self.threshold_button.setToolTip("Accept every proposed group that saves at least the amount on the right; "
                                         "rejected groups stay rejected, and other groups keep their state")
        self.load_button = QPushButton("Load plan…", self)
        self.save_button = QPushButton("Save plan…", self)
        buttons = QHBoxLayout()
        for w in (self.propose_button, self.accept_button, self.reject_button, self.threshold_button,
                  self.threshold_spin):
            buttons.addWidget(w)
        buttons.addStretch(1)
        buttons.addWidget(self.load_button)
        buttons.addWidget(self.save_button)

        self.memory_label = QLabel("", self)
        self.memory_label.setObjectName("summaryLabel")
        self.memory_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.memory_label.setWordWrap(True)  # at 1024 px the summary wraps instead of widening the window
        self.bound_gauge = QProgressBar(self)
        self.bound_gauge.setRange(0, 1000)
        self.bound_gauge.setFixedWidth(260)
        self.bound_gauge.setToolTip("Accepted savings as a fraction of the all-shareable bound")
        gauge = QHBoxLayout()
        gauge.addWidget(self.memory_label, 1)
        gauge.addWidget(QLabel("of the bound", self))
        gauge.addWidget(self.bound_gauge)
        self.plan_label = QLabel("", self)
        self.plan_label.setWordWrap(True)

        self.model = PlanTableModel(self)
        self.view = QTableView(self)
        self.view.setModel(self.model)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.view.setAlternatingRowColors(True)
        self.view.setWordWrap(False)
        self.view.verticalHeader().setDefaultSectionSize(24)
        header = self.view.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)

        layout = QVBoxLayout(self)
        layout.addLayout(buttons)
        layout.addLayout(gauge)
        layout.addWidget(self.plan_label)
        layout.addWidget(self.view, 1)

        self.propose_button.clicked.connect(self.propose)
        self.accept_button.clicked.connect(lambda: self.set_state(self.selected_rows(), GroupState.accepted))
        self.reject_button.clicked.connect(lambda: self.set_state(self.selected_rows(), GroupState.rejected))
        self.threshold_button.clicked.connect(lambda: self.accept_above(self.threshold_spin.value() * MIB))
        self.load_button.clicked.connect(lambda: self.load_plan_file())
        self.save_button.clicked.connect(lambda: self.save_plan_file())
        self.view.selectionModel().selectionChanged.connect(self._update_enabled)
        self._refresh()

    # --- context ----------------------------------------------------------------------------

    def set_context(self, workload: Workload | None, analysis: WorkloadAnalysis | None) -> None:
        """A newly analysed workload: the plan stays only if it still fits."""
        self.workload, self.analysis = workload, analysis
        if self.plan is not None:
            try:
                if workload is None or analysis is None:
                    raise PlanError("no workload")
                validate_plan(self.plan, workload, analysis)
            except PlanError:
                self._replace(None, None, "The workload changed: propose or load a plan for it")
                return
        self._refresh()

    # --- edits ------------------------------------------------------------------------------

    def propose(self) -> MergePlan | None:
        if self.workload is None or self.analysis is None:
            return None
        plan = propose_plan(self.workload, self.analysis)
        self._replace(plan, None, f"Proposed {len(plan.groups)} groups from the analysis (not saved)")
        return plan

    def selected_rows(self) -> list[int]:
        return sorted(i.row() for i in self.view.selectionModel().selectedRows())

    def select_rows(self, rows: list[int]) -> None:
        self.view.clearSelection()
        flags = self.view.selectionModel().SelectionFlag
        for row in rows:
            self.view.selectionModel().select(self.model.index(row, 0), flags.Select | flags.Rows)

    def set_state(self, rows: list[int], state: GroupState) -> None:
        if self.plan is None or not rows:
            return
        for row in rows:
            self.plan.groups[row].state = state
        self._edited(rows)

    def accept_above(self, min_savings_bytes: int) -> int:
        """Accept every proposed group saving at least `min_savings_bytes` (a group the operator
        rejected stays rejected); return how many."""
        if self.plan is None:
            return 0
        rows = [i for i, g in enumerate(self.plan.groups)
                if g.savings_bytes >= min_savings_bytes and g.state is GroupState.proposed]
        for row in rows:
            self.plan.groups[row].state = GroupState.accepted
        self._edited(rows)
        return len(rows)

    def _edited(self, rows: list[int]) -> None:
        self.model.states_changed(rows)
        self._refresh()
        self.sigPlanEdited.emit(self.plan)

    def _replace(self, plan: MergePlan | None, path: Path | None, note: str) -> None:
        self.plan, self.plan_path = plan, path
        self.model.set_plan(plan)
        self._note = note
        self._refresh()
        self.sigPlanReplaced.emit(plan)

    # --- files ------------------------------------------------------------------------------

    def load_plan_file(self, path: Path | str | None = None) -> bool:
        """Load a plan; one that does not fit the workload shows its error and changes nothing."""
        if self.workload is None or self.analysis is None:
            return False
        if path is None:
            start = str(self.plan_path or (self.workload.path.parent if self.workload.path else ""))
            chosen, _ = QFileDialog.getOpenFileName(self, "Load merge plan", start, PLAN_FILTER)
            if not chosen:
                return False
            path = chosen
        path = Path(path)
        try:
            plan = load_plan(path, self.workload, self.analysis)
        except GemelError as exc:
            self.sigError.emit(str(exc))
            return False
        self._replace(plan, path, f"Loaded {path}")
        return True

    def save_plan_file(self, path: Path | str | None = None) -> bool:
        if self.plan is None:
            return False
        if path is None:
            start = str(self.plan_path or f"{self.workload.name}-plan.yaml")
            chosen, _ = QFileDialog.getSaveFileName(self, "Save merge plan", start, PLAN_FILTER)
            if not chosen:
                return False
            path = chosen
        path = Path(path)
        try:
            save_plan(self.plan, path)
        except OSError as exc:
            self.sigError.emit(f"{path}: could not save the plan ({exc.strerror or exc})")
            return False
        self.plan_path = path
        self._note = f"Saved {path}"
        self._refresh()
        return True

    # --- display ----------------------------------------------------------------------------

    def memory(self) -> MergedMemory:
        return merged_memory(self.plan, self.analysis)

    def _refresh(self) -> None:
        mem = self.memory()
        if self.analysis is None:
            self.memory_label.setText("Open a workload, then propose a plan")
        elif self.plan is None:
            self.memory_label.setText(f"Merged workload: {human_bytes(mem.total_bytes)} of parameters "
                                      "(no plan yet: press Propose)")
        else:
            self.memory_label.setText(
                f"Merged workload: {human_bytes(mem.after_bytes)} of {human_bytes(mem.total_bytes)} parameters "
                f"— accepted groups save {human_bytes(mem.saved_bytes)}, "
                f"{mem.fraction_of_bound:.1%} of the all-shareable {human_bytes(mem.bound_bytes)}")
        self.bound_gauge.setValue(round(mem.fraction_of_bound * 1000))
        self.bound_gauge.setFormat(f"{mem.fraction_of_bound:.1%}")
        if self.plan is not None:
            counts = {s: sum(g.state is s for g in self.plan.groups) for s in GroupState}
            states = ", ".join(f"{n} {s.value.replace('_', ' ')}" for s, n in counts.items() if n)
            self.plan_label.setText(f"{len(self.plan.groups)} groups: {states}. {self._note}")
        else:
            self.plan_label.setText(self._note)
        self._update_enabled()

    def _update_enabled(self, *args) -> None:
        has_plan = self.plan is not None
        self.propose_button.setEnabled(self.analysis is not None)
        self.load_button.setEnabled(self.analysis is not None)
        self.save_button.setEnabled(has_plan)
        self.threshold_button.setEnabled(has_plan)
        selected = has_plan and bool(self.view.selectionModel().selectedRows())
        self.accept_button.setEnabled(selected)
        self.reject_button.setEnabled(selected)

    def set_colors(self, colors: dict) -> None:
        self.model.set_colors(colors)
