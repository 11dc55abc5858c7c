"""The Proposals tab: the merge plan's share groups, to accept or reject before retraining.

The plan (a `MergePlan`) is the one thing edited here; every figure shown is computed from
the plan and the workload's analysis by `merged_memory`, so the gauge can never disagree
with the table. A plan file that does not fit the workload is refused with its one-line
`PlanError` and the current plan stays.

Each group's merge risk (`groups[].risk`, from `merging/risk.py`: the members' linear CKA and
the accuracy drop when the group alone is tied) is shown as two sortable, colour-scaled
columns. A plan written by `gemel propose` carries it; otherwise "Measure risk" runs
`measure_risk` as the panel's task (progress and Cancel). It is a button, not started when a
workload opens: on the quick start it keeps both cores of a 2-core CPU busy for about 30 s
(it rebuilds the models, draws their data and evaluates each model once per heavy group),
there is no plan to measure until one is proposed or loaded, and it would compete with the
analysis, fine-tuning and retraining for the same cores.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt, QThreadPool, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QAbstractItemView, QDoubleSpinBox, QFileDialog, QHBoxLayout, QHeaderView, QLabel,
                               QProgressBar, QPushButton, QSpinBox, QTableView, QVBoxLayout, QWidget)

from ..analysis import WorkloadAnalysis
from ..units import human_bytes
from ..errors import GemelError
from ..merging.heuristic import LOW_RISK
from ..merging.plan import (GroupState, MergePlan, PlanError, PlannedGroup, load_plan, propose_plan, save_plan,
                            validate_plan)
from ..tasks import plural
from ..workload import Workload
from .settings import PALETTES
from .task import TaskMixin

RAW_ROLE = Qt.ItemDataRole.UserRole + 1  # the unformatted value, for tests
SORT_ROLE = Qt.ItemDataRole.UserRole + 2  # a comparable key; None (not measured) sorts last either way
PLAN_FILTER = "Merge plans (*.yaml *.yml);;All files (*)"
MIB = 1024 * 1024
RISK_MIN_FRACTION = 0.01  # as `gemel propose`: the drop only for groups saving >= 1% of the bound

CKA_TIP = ("CKA: how alike the members' outputs at this layer are on the same inputs (lowest linear CKA over "
           "pairs; 1 = the same up to rotation and scale, near 0 = unrelated). A ranking signal, not a promise.")
DROP_TIP = ("Drop: the most accuracy a member loses on its held-out split when this group alone is tied, "
            "before any retraining, against the untied model with its batch-norm statistics re-estimated the "
            "same way (what retraining must repair). Drops do not add up across groups. "
            "≤: a group too small for its own, showing the drop of all such groups tied together (one "
            "group's own is usually less).")


def risk_level_of_drop(drop: float) -> float:
    """0 (safe, green) to 1 (risky, red); yellow at the `predict` strategy's low-risk line."""
    return min(1.0, max(0.0, drop / (2 * LOW_RISK)))


def risk_level_of_cka(cka: float) -> float:
    """0 (green) for identical features, 1 (red) for a CKA of 0.5 or less."""
    return min(1.0, max(0.0, (1.0 - cka) / 0.5))


def risk_color(level: float, alpha: int = 120) -> QColor:
    """Green (0) through yellow to red (1), translucent so that text reads in both themes."""
    color = QColor.fromHsvF((1.0 - level) / 3.0, 0.75, 0.85)
    color.setAlpha(alpha)
    return color


def _readable(note: str) -> str:
    """The core's notes count bytes exactly; the panel's line reads them as sizes."""
    return re.sub(r"\b(\d{4,}) bytes\b", lambda m: human_bytes(int(m.group(1))), note)


def largest_drop(group: PlannedGroup) -> float | None:
    """The group's largest drop tied alone, else (a group too small for its own) tied together
    with the other small groups; None when neither was measured."""
    if group.risk is None:
        return None
    alone = group.risk.max_drop
    return alone if alone is not None else group.risk.max_joint_drop


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
    HEADERS = ("Group", "Kind", "Models", "Saves", "State", "CKA", "Drop")
    TOOLTIPS = {"Saves": "Parameter bytes saved if the group's members share one copy: "
                         "bytes per copy × (members − 1)",
                "CKA": CKA_TIP, "Drop": DROP_TIP + " In accuracy points."}

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
        risk = group.risk
        raw = {"Group": group.id, "Kind": signature_kind(group.signature),
               "Models": [m.model for m in group.members], "Saves": group.savings_bytes,
               "State": group.state.value, "CKA": risk.cka if risk is not None else None,
               "Drop": largest_drop(group)}[column]
        if role == RAW_ROLE:
            return raw
        if role == SORT_ROLE:
            return ", ".join(raw) if column == "Models" else raw
        if role == Qt.ItemDataRole.DisplayRole:
            if column == "Models":
                return ", ".join(raw)
            if column == "Saves":
                return human_bytes(raw)
            if column == "State":
                return raw.replace("_", " ")
            if column == "CKA":
                return "" if risk is None else "—" if raw is None else f"{raw:.2f}"
            if column == "Drop":
                if risk is None:
                    return ""
                # A joint drop (the small groups tied together): this group's own is usually less, "≤".
                return "—" if raw is None else f"{'' if risk.drop else '≤'}{raw * 100:+.1f} pts"
            return raw
        if role == Qt.ItemDataRole.TextAlignmentRole and column in ("Saves", "CKA", "Drop"):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.BackgroundRole and raw is not None and column in ("CKA", "Drop"):
            level = risk_level_of_cka(raw) if column == "CKA" else risk_level_of_drop(raw)
            return QBrush(risk_color(level))
        if role == Qt.ItemDataRole.ForegroundRole and column == "State":
            if group.state.merged:
                return QBrush(QColor(self._colors["savings"]))
            if group.state in (GroupState.rejected, GroupState.backed_off):
                return QBrush(QColor(self._colors["bound"]))
        if role == Qt.ItemDataRole.ToolTipRole:
            if column in ("CKA", "Drop"):
                return self._risk_tooltip(group, column)
            members = "<br>".join(f"{m.model}: {m.layer}" for m in group.members)
            return (f"<b>{group.id}</b> {group.signature}<br>{members}<br>{human_bytes(group.bytes_per_copy)} per "
                    f"copy, saves {human_bytes(group.savings_bytes)} ({group.savings_bytes:,} bytes)")
        return None

    @staticmethod
    def _risk_tooltip(group: PlannedGroup, column: str) -> str:
        risk = group.risk
        if risk is None:
            return "Not measured: press Measure risk"
        if column == "CKA":
            return CKA_TIP if risk.cka is not None else "Not comparable: the members' inputs or outputs differ"
        if not risk.drop and risk.joint_drop:
            lines = "<br>".join(f"{model}: {drop * 100:+.1f} pts" for model, drop in risk.joint_drop.items())
            return (f"<b>{group.id}</b> saves too little for a drop of its own (under 1% of the bound by default): "
                    f"tied together with all {risk.joint_groups} such groups (init {risk.init or '?'}), before "
                    f"retraining, its members lose:<br>{lines}<br>This group's own share is usually less")
        if not risk.drop:
            return ("Not measured: the group saves too little of the all-shareable bound (under 1% by "
                    "default) to be worth a few forward passes; only its CKA was measured")
        lines = "<br>".join(f"{model}: {drop * 100:+.1f} pts" for model, drop in risk.drop.items())
        return f"<b>{group.id}</b> tied alone (init {risk.init or '?'}), before retraining:<br>{lines}"

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation != Qt.Orientation.Horizontal:
            return str(section + 1) if role == Qt.ItemDataRole.DisplayRole else None
        if role == Qt.ItemDataRole.DisplayRole:
            return self.HEADERS[section]
        if role == Qt.ItemDataRole.ToolTipRole:
            return self.TOOLTIPS.get(self.HEADERS[section])
        return None


class PlanSortModel(QSortFilterProxyModel):
    """Sorts on SORT_ROLE; a group whose risk was not measured sorts last in either order."""

    def lessThan(self, left: QModelIndex, right: QModelIndex) -> bool:
        a, b = left.data(SORT_ROLE), right.data(SORT_ROLE)
        if a is None or b is None:
            if a is None and b is None:
                return False
            return (a is None) == (self.sortOrder() == Qt.SortOrder.DescendingOrder)
        return a < b


class ProposalsPanel(TaskMixin, QWidget):
    sigPlanReplaced = Signal(object)  # a new MergePlan (proposed or loaded), or None
    sigPlanEdited = Signal(object)  # the same plan, with group states (or its measured risk) changed
    sigError = Signal(str)
    sigRiskMeasured = Signal(object)  # the plan, its risk filled in
    sigWorkerStarted = Signal(object)

    task_noun = "risk measurement"

    def __init__(self, parent=None):
        super().__init__(parent)
        self.workload: Workload | None = None
        self.analysis: WorkloadAnalysis | None = None
        self.plan: MergePlan | None = None
        self.plan_path: Path | None = None
        self._note = ""  # what last happened to the plan: proposed, loaded, saved
        self.risk_limit: int | None = None  # samples per model for the risk (None: all, as `gemel propose`)
        self.risk_min_fraction = RISK_MIN_FRACTION  # the drop only for groups saving this much of the bound
        self._measured_plan: MergePlan | None = None  # the plan the running measurement is for
        # Its own thread: the measurement holds one for half a minute, the shared pool stays free.
        self.risk_pool = QThreadPool(self)
        self.risk_pool.setMaxThreadCount(1)

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

        self.risk_button = QPushButton("Measure risk", self)
        self.risk_button.setToolTip("Measure each group's merge risk without retraining (what `gemel propose` "
                                    "records): the CKA of every group, the accuracy drop of each group saving at "
                                    "least 1% of the bound")
        self.risk_cancel_button = QPushButton("Cancel", self)
        self.risk_cancel_button.setToolTip("Stop measuring; the table keeps what it showed")
        self.risk_progress = QProgressBar(self)
        self.risk_progress.setFixedWidth(160)
        self.risk_status = QLabel("", self)
        self.risk_status.setWordWrap(True)  # a long note wraps instead of widening the window
        self.drop_spin = QDoubleSpinBox(self)
        self.drop_spin.setRange(0.0, 100.0)
        self.drop_spin.setDecimals(1)
        self.drop_spin.setSingleStep(0.5)
        self.drop_spin.setSuffix(" pts")
        self.drop_spin.setValue(LOW_RISK * 100)
        self.drop_spin.setToolTip("Accuracy points: groups whose largest drop is under this are accepted")
        self.drop_button = QPushButton("Accept drop under", self)
        self.drop_button.setToolTip("Accept every proposed group whose measured drop (tied alone, before "
                                    "retraining) is under the value on the right for every member; rejected "
                                    "groups and groups without a measured drop keep their state")
        risk_row = QHBoxLayout()
        risk_row.addWidget(QLabel("Merge risk", self))
        for w in (self.risk_button, self.risk_cancel_button, self.risk_progress):
            risk_row.addWidget(w)
        risk_row.addWidget(self.risk_status, 1)
        risk_row.addWidget(self.drop_button)
        risk_row.addWidget(self.drop_spin)

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
        self.risk_help = QLabel(f"{CKA_TIP} {DROP_TIP} Colours: green low risk, red high.", self)
        self.risk_help.setObjectName("hintLabel")
        self.risk_help.setWordWrap(True)

        self.model = PlanTableModel(self)
        self.sorted_model = PlanSortModel(self)
        self.sorted_model.setSourceModel(self.model)
        self.view = QTableView(self)
        self.view.setModel(self.sorted_model)
        self.view.horizontalHeader().setSortIndicator(-1, Qt.SortOrder.AscendingOrder)  # the plan's order first
        self.view.setSortingEnabled(True)
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
        layout.addLayout(risk_row)
        layout.addLayout(gauge)
        layout.addWidget(self.plan_label)
        layout.addWidget(self.risk_help)
        layout.addWidget(self.view, 1)

        self.propose_button.clicked.connect(self.propose)
        self.accept_button.clicked.connect(lambda: self.set_state(self.selected_rows(), GroupState.accepted))
        self.reject_button.clicked.connect(lambda: self.set_state(self.selected_rows(), GroupState.rejected))
        self.threshold_button.clicked.connect(lambda: self.accept_above(self.threshold_spin.value() * MIB))
        self.load_button.clicked.connect(lambda: self.load_plan_file())
        self.save_button.clicked.connect(lambda: self.save_plan_file())
        self.risk_button.clicked.connect(lambda: self.measure_risk())
        self.risk_cancel_button.clicked.connect(self.cancel_risk)
        self.drop_button.clicked.connect(lambda: self.accept_drop_under(self.drop_spin.value() / 100))
        self.view.selectionModel().selectionChanged.connect(self._update_enabled)
        self.init_task(self.risk_status, self.risk_progress)
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
        """The selected groups as rows of the plan (whatever order the table is sorted in)."""
        return sorted(self.sorted_model.mapToSource(i).row() for i in self.view.selectionModel().selectedRows())

    def select_rows(self, rows: list[int]) -> None:
        self.view.clearSelection()
        flags = self.view.selectionModel().SelectionFlag
        for row in rows:
            index = self.sorted_model.mapFromSource(self.model.index(row, 0))
            self.view.selectionModel().select(index, flags.Select | flags.Rows)

    def view_order(self) -> list[str]:
        """Group ids in the order the table shows them."""
        return [self.sorted_model.index(r, 0).data() for r in range(self.sorted_model.rowCount())]

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

    def accept_drop_under(self, max_drop: float) -> int:
        """Accept every proposed group whose measured largest drop is under `max_drop` (a
        fraction: 0.05 is 5 points); a rejected group stays rejected, a group with no measured
        drop keeps its state. Return how many."""
        if self.plan is None:
            return 0
        rows = [i for i, g in enumerate(self.plan.groups)
                if g.state is GroupState.proposed and largest_drop(g) is not None and largest_drop(g) < max_drop]
        for row in rows:
            self.plan.groups[row].state = GroupState.accepted
        unmeasured = sum(largest_drop(g) is None for g in self.plan.groups)
        self._note = (f"Accepted {plural(len(rows), 'group')} with a drop under {max_drop * 100:.1f} pts"
                      + (f" ({unmeasured} without a measured drop kept their state)" if unmeasured else ""))
        self._edited(rows)
        return len(rows)

    def _edited(self, rows: list[int]) -> None:
        self.model.states_changed(rows)
        self._refresh()
        self.sigPlanEdited.emit(self.plan)

    def _replace(self, plan: MergePlan | None, path: Path | None, note: str) -> None:
        if self.task_running and plan is not self.plan:
            self.cancel_risk()  # it measures the plan being replaced
        self.plan, self.plan_path = plan, path
        self.model.set_plan(plan)
        if not self.task_running:
            self.set_status_line(self.risk_summary())
        self._note = note
        self._refresh()
        self.sigPlanReplaced.emit(plan)

    # --- merge risk (the panel's task) -------------------------------------------------------

    def measure_risk(self):
        """Measure every group's risk in the worker (`merging.risk.measure_risk`, as `gemel
        propose` does); the plan's group states are left alone, edits made meanwhile included."""
        if self.plan is None or self.workload is None or self.analysis is None or self.task_running:
            return None
        from ..merging.risk import measure_risk

        workload, limit = self.workload, self.risk_limit
        # Risk is a property of a group, not of its state: measure every group, on a copy.
        snapshot = self.plan.model_copy(deep=True)
        for g in snapshot.groups:
            g.state = GroupState.proposed
        floor = int(self.risk_min_fraction * self.analysis.max_savings_bytes)
        self._measured_plan = self.plan
        worker = self.start_task(
            lambda progress, partial: measure_risk(workload, snapshot, limit=limit, drop_min_savings=floor,
                                                   progress=progress),
            name=f"merge risk of {workload.name}", pool=self.risk_pool,
            message=f"Measuring the merge risk of {plural(len(snapshot.groups), 'group')}…")
        self.sigWorkerStarted.emit(worker)
        return worker

    def cancel_risk(self) -> None:
        self.stop_task("cancel", "Cancelling at the next step…")

    def on_task_done(self, result) -> None:
        measured, notes = result
        if self.plan is None or self.plan is not self._measured_plan:
            self.set_status_line("The plan changed while measuring: measure again")
            return
        by_id = {g.id: g for g in measured.groups}
        count = 0
        for g in self.plan.groups:
            m = by_id.get(g.id)
            if m is not None and m.members == g.members and m.risk is not None:
                g.risk = m.risk
                count += 1
        self.set_status_line(f"Measured {plural(count, 'group')} in {self.task_elapsed:.0f} s (init "
                             f"{measured.init.method})" + "".join(f"; {_readable(n)}" for n in notes))
        self.model.states_changed()
        self._refresh()
        self.sigPlanEdited.emit(self.plan)
        self.sigRiskMeasured.emit(self.plan)

    def on_task_failed(self, message: str) -> None:
        self.set_status_line("Failed: the message is shown above")
        self.sigError.emit(message)

    def on_task_cancelled(self, mode: str) -> None:
        if self.plan is not self._measured_plan:  # cancelled because the plan was replaced
            self.set_status_line(self.risk_summary())
        else:
            self.set_status_line("Cancelled; the table keeps what it showed")

    def risk_summary(self) -> str:
        """What the plan holds of merge risk, for the line beside Measure risk."""
        if self.plan is None:
            return ""
        measured = [g for g in self.plan.groups if g.risk is not None]
        if not measured:
            return "not measured: press Measure risk"
        inits = sorted({g.risk.init for g in measured if g.risk.init})
        return (f"{len(measured)} of {plural(len(self.plan.groups), 'group')} measured"
                + (f" (init {', '.join(inits)})" if inits else ""))

    def update_controls(self) -> None:
        self._update_enabled()

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
        running = self.task_running
        self.risk_button.setEnabled(has_plan and self.workload is not None and not running)
        self.risk_cancel_button.setEnabled(running and not self.task_stopping)
        self.risk_cancel_button.setVisible(running)
        has_drop = has_plan and any(largest_drop(g) is not None for g in self.plan.groups)
        self.drop_button.setEnabled(has_drop)
        self.drop_spin.setEnabled(has_drop)
        self.risk_help.setVisible(has_plan and any(g.risk is not None for g in self.plan.groups))
        selected = has_plan and bool(self.view.selectionModel().selectedRows())
        self.accept_button.setEnabled(selected)
        self.reject_button.setEnabled(selected)

    def set_colors(self, colors: dict) -> None:
        self.model.set_colors(colors)
