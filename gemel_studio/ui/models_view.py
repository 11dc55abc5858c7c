"""The Models tab: one row per model of the workload with what it costs, and the totals.

Rows come from the workload's specs; the figures come from the last analysis (one source of
truth: the inventory). A model without figures (not analysed yet) shows dashes.
"""

from __future__ import annotations

from PySide6.QtCore import QAbstractTableModel, QModelIndex, QSortFilterProxyModel, Qt, Signal
from PySide6.QtWidgets import (QAbstractItemView, QHBoxLayout, QHeaderView, QLabel, QPushButton, QTableView,
                               QVBoxLayout, QWidget)

from ..analysis import ModelInventory, WorkloadAnalysis
from ..units import human_bytes
from ..workload import ModelSpec, Workload

RAW_ROLE = Qt.ItemDataRole.UserRole + 1  # the unformatted value, used for sorting and tests


class ModelTableModel(QAbstractTableModel):
    COLUMNS = ("name", "architecture", "task", "source", "parameters", "param bytes", "buffer bytes",
               "peak activations", "layers")
    HEADERS = ("Model", "Architecture", "Task", "Source", "Parameters", "Param bytes", "Buffer bytes",
               "Peak activations", "Layers")
    TOOLTIPS = {
        "param bytes": "Weights and biases, at each tensor's dtype (analytic)",
        "buffer bytes": "Non-trainable state such as batch-norm statistics (analytic, never shared)",
        "peak activations": "Largest input+output pair of consecutive layers at the workload's input and "
                            "batch size (analytic, measured on the meta device)",
    }

    def __init__(self, parent=None):
        super().__init__(parent)
        self._specs: list[ModelSpec] = []
        self._inventories: dict[str, ModelInventory] = {}
        self._param_counts: dict[str, int] = {}

    def set_data(self, workload: Workload | None, analysis: WorkloadAnalysis | None) -> None:
        self.beginResetModel()
        self._specs = list(workload.models) if workload else []
        self._inventories = {m.name: m for m in analysis.models} if analysis else {}
        self._param_counts = {m.name: m.param_count for m in analysis.models} if analysis else {}  # O(layers) each
        self.endResetModel()

    def spec(self, row: int) -> ModelSpec:
        return self._specs[row]

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self._specs)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.COLUMNS)

    def _raw(self, row: int, column: str):
        spec = self._specs[row]
        inv = self._inventories.get(spec.name)
        if column == "name":
            return spec.name
        if column == "architecture":
            return spec.architecture
        if column == "task":
            return spec.task
        if column == "source":  # random weights are marked: nothing a random model scores means anything
            weights_random = spec.source.kind == "torchvision" and not getattr(spec.source, "weights", None)
            return f"{spec.source.kind} (random weights)" if weights_random else spec.source.kind
        if inv is None:
            return None
        if column == "parameters":  # asked for every cell a view sizes or sorts: no per-call work
            return self._param_counts[spec.name]
        return {"param bytes": inv.param_bytes, "buffer bytes": inv.buffer_bytes,
                "peak activations": inv.activation_bytes, "layers": len(inv.layers)}[column]

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        column = self.COLUMNS[index.column()]
        value = self._raw(index.row(), column)
        numeric = index.column() >= 4
        if role == Qt.ItemDataRole.DisplayRole:
            if value is None:
                return "-"
            if column == "parameters":
                return f"{value:,}"
            if column in ("param bytes", "buffer bytes", "peak activations"):
                return human_bytes(value)
            return str(value)
        if role == RAW_ROLE:
            return value
        if role == Qt.ItemDataRole.TextAlignmentRole and numeric:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.ToolTipRole:
            if column in ("param bytes", "buffer bytes", "peak activations") and value is not None:
                return f"{value:,} bytes"
            inv = self._inventories.get(self._specs[index.row()].name)
            if column == "name" and inv is not None and inv.notes:
                return "\n".join(inv.notes)
        return None

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation != Qt.Orientation.Horizontal:
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return self.HEADERS[section]
        if role == Qt.ItemDataRole.ToolTipRole:
            return self.TOOLTIPS.get(self.COLUMNS[section])
        return None


class ModelsPanel(QWidget):
    """The model table, the workload's totals and the add/remove buttons."""

    sigAddRequested = Signal()
    sigRemoveRequested = Signal(str)  # model name

    def __init__(self, parent=None):
        super().__init__(parent)
        self.model = ModelTableModel(self)
        self.proxy = QSortFilterProxyModel(self)
        self.proxy.setSourceModel(self.model)
        self.proxy.setSortRole(RAW_ROLE)

        self.table = QTableView(self)
        self.table.setObjectName("modelTable")
        self.table.setModel(self.proxy)
        self.table.setSortingEnabled(True)
        self.table.sortByColumn(-1, Qt.SortOrder.AscendingOrder)  # workload order until the user sorts
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.setAlternatingRowColors(True)
        self.table.verticalHeader().setVisible(False)
        header = self.table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setResizeContentsPrecision(100)  # widths from the visible rows and 100 more, not 1,000 per column
        header.setStretchLastSection(False)
        header.setMinimumSectionSize(70)

        self.total_label = QLabel("Total parameters: -", self, objectName="summaryLabel")
        self.bound_label = QLabel("All-shareable bound: -", self, objectName="summaryLabel")
        self.groups_label = QLabel("Share groups: -", self, objectName="summaryLabel")
        self.bound_label.setToolTip("Parameter bytes saved if every share group were merged "
                                    "(an upper bound: accuracy targets may forbid some merges)")

        self.add_button = QPushButton("Add model…", self)
        self.remove_button = QPushButton("Remove model", self)
        self.remove_button.setEnabled(False)
        self.add_button.clicked.connect(self.sigAddRequested)
        self.remove_button.clicked.connect(self._remove_clicked)
        self.table.selectionModel().selectionChanged.connect(self._selection_changed)

        summary = QHBoxLayout()
        for label in (self.total_label, self.bound_label, self.groups_label):
            summary.addWidget(label)
        summary.addStretch(1)
        summary.addWidget(self.add_button)
        summary.addWidget(self.remove_button)
        layout = QVBoxLayout(self)
        layout.addLayout(summary)
        layout.addWidget(self.table, 1)
        self.notes_label = QLabel("", self)
        self.notes_label.setWordWrap(True)
        self.notes_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(self.notes_label)

    def set_data(self, workload: Workload | None, analysis: WorkloadAnalysis | None) -> None:
        self.model.set_data(workload, analysis)
        if analysis is None:
            self.total_label.setText("Total parameters: -")
            self.bound_label.setText("All-shareable bound: -")
            self.groups_label.setText("Share groups: -")
        else:
            self.total_label.setText(f"Total parameters: {human_bytes(analysis.total_param_bytes)}")
            self.bound_label.setText(f"All-shareable bound: {human_bytes(analysis.max_savings_bytes)} "
                                     f"({analysis.max_savings_fraction:.1%})")
            self.groups_label.setText(f"Share groups: {len(analysis.groups)}")
        notes = [f"{m.name}: {note}" for m in (analysis.models if analysis else []) for note in m.notes]
        self.notes_label.setText("\n".join(f"Note — {n}" for n in notes))
        self.notes_label.setVisible(bool(notes))
        self._selection_changed()

    def selected_model(self) -> str | None:
        rows = self.table.selectionModel().selectedRows()
        if not rows:
            return None
        return self.model.spec(self.proxy.mapToSource(rows[0]).row()).name

    def select_model(self, name: str) -> None:
        for row in range(self.model.rowCount()):
            if self.model.spec(row).name == name:
                self.table.selectRow(self.proxy.mapFromSource(self.model.index(row, 0)).row())
                return

    def _selection_changed(self, *args) -> None:
        self.remove_button.setEnabled(self.selected_model() is not None and self.isEnabled())

    def _remove_clicked(self) -> None:
        name = self.selected_model()
        if name is not None:
            self.sigRemoveRequested.emit(name)
