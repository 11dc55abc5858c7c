"""The Sharing tab: share groups (rows, heaviest savings first) by models (columns).

A row is named by its first member's layer, kind, models and savings; a filled cell means the
model holds a layer of that group, and its tooltip names the signature, the layer and the
bytes. The line above the matrix gives the all-shareable bound (every group merged).
Selecting a group highlights its layer in every model's layer list shown below the matrix,
side by side, so the models can be compared like a diff.

Workloads of any size: the matrix is a QTableView over a QAbstractTableModel, so Qt draws
only the visible cells and no cell owns a widget. What the tab draws is capped: at most
MAX_MODELS models as columns (the first, in workload order), MAX_GROUPS groups as rows (the
heaviest), and the layer lists of the first MAX_LAYER_LISTS models (each list is a widget).
When a cap cuts something, a one-line note above the matrix says what and points to
`gemel analyze WORKLOAD --json`, which lists everything.
"""

from __future__ import annotations

from PySide6.QtCore import QAbstractTableModel, QItemSelectionModel, QModelIndex, Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QAbstractItemView, QComboBox, QHBoxLayout, QHeaderView, QLabel, QScrollArea,
                               QSplitter, QTableView, QVBoxLayout, QWidget)

from ..analysis import ModelInventory, ShareGroup, WorkloadAnalysis
from ..units import human_bytes
from .settings import PALETTES

MEMBER_ROLE = Qt.ItemDataRole.UserRole + 1  # bool: the model holds a layer of the group
LAYER_ROLE = Qt.ItemDataRole.UserRole + 2  # str | None: that layer's name
HIGHLIGHT_ROLE = Qt.ItemDataRole.UserRole + 3  # bool: the layer belongs to the selected group

MAX_MODELS = 200  # models drawn as matrix columns
MAX_GROUPS = 2000  # groups drawn as matrix rows, heaviest first
MAX_LAYER_LISTS = 12  # models whose layer list is shown below the matrix


def group_name(group: ShareGroup) -> str:
    """A group as a person names it: its first member's layer and the layers' kind, e.g.
    'layer1.0.conv1 (Conv2d)' (the counterparts in the other models may be named otherwise)."""
    return f"{group.members[0].layer} ({group.kind})"


def bound_text(analysis: WorkloadAnalysis | None) -> str:
    """The all-shareable bound in one line: what merging every group would save."""
    if analysis is None or not analysis.models:
        return ""
    return (f"{len(analysis.groups):,} groups; all-shareable bound {human_bytes(analysis.max_savings_bytes)} "
            f"({analysis.max_savings_fraction:.1%} of {human_bytes(analysis.total_param_bytes)} parameters)")


class ShareMatrixModel(QAbstractTableModel):
    def __init__(self, parent=None, max_models: int = MAX_MODELS, max_groups: int = MAX_GROUPS):
        super().__init__(parent)
        self.max_models, self.max_groups = max_models, max_groups
        self.groups: list[ShareGroup] = []  # the groups drawn: the first max_groups
        self.model_names: list[str] = []  # the models drawn: the first max_models
        self.total_groups = 0
        self.total_models = 0
        self._colors = PALETTES["dark"]

    def set_analysis(self, analysis: WorkloadAnalysis | None) -> None:
        self.beginResetModel()
        self.groups = list(analysis.groups[:self.max_groups]) if analysis else []
        self.model_names = [m.name for m in analysis.models[:self.max_models]] if analysis else []
        self.total_groups = len(analysis.groups) if analysis else 0
        self.total_models = len(analysis.models) if analysis else 0
        self.endResetModel()

    def set_colors(self, colors: dict) -> None:
        self._colors = colors
        if self.groups:
            self.dataChanged.emit(self.index(0, 0), self.index(self.rowCount() - 1, self.columnCount() - 1))

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.groups)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.model_names)

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        group = self.groups[index.row()]
        model = self.model_names[index.column()]
        layer = group.layer_of(model)
        if role == MEMBER_ROLE:
            return layer is not None
        if role == LAYER_ROLE:
            return layer
        if layer is None:
            return None
        if role == Qt.ItemDataRole.DisplayRole:
            return "●"  # stays visible when the row's selection colour covers the fill
        if role == Qt.ItemDataRole.TextAlignmentRole:
            return int(Qt.AlignmentFlag.AlignCenter)
        if role == Qt.ItemDataRole.BackgroundRole:
            return QBrush(QColor(self._colors["member"]))
        if role == Qt.ItemDataRole.ForegroundRole:
            return QBrush(QColor(self._colors["member_text"]))
        if role == Qt.ItemDataRole.ToolTipRole:
            return (f"<b>{model}</b>: {layer}<br>{group.kind}, {human_bytes(group.bytes_per_copy)} per copy "
                    f"({group.bytes_per_copy:,} bytes)<br>group saves {human_bytes(group.savings_bytes)} "
                    f"across {len(group.members)} models<br><small>{group.signature}</small>")
        return None

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal:
            if role == Qt.ItemDataRole.DisplayRole:
                return self.model_names[section]
            return None
        group = self.groups[section]
        if role == Qt.ItemDataRole.DisplayRole:
            return f"{section + 1}. {group_name(group)} · {len(group.members)} models · saves " \
                   f"{human_bytes(group.savings_bytes)}"
        if role == Qt.ItemDataRole.ToolTipRole:
            return (f"{group.members[0].layer} ({group.members[0].model}) and its counterparts\n{group.signature}\n"
                    f"{len(group.members)} members, {human_bytes(group.bytes_per_copy)} per copy")
        return None


class LayerTableModel(QAbstractTableModel):
    """The layers of one model; the layer of the selected group is highlighted."""

    HEADERS = ("Layer", "Kind", "Params")  # activations: see the Memory tab and the tooltip

    def __init__(self, inventory: ModelInventory, parent=None):
        super().__init__(parent)
        self.inventory = inventory
        self.highlighted: str | None = None
        self._colors = PALETTES["dark"]

    def set_colors(self, colors: dict) -> None:
        self._colors = colors
        self._changed_all()

    def set_highlighted(self, layer: str | None) -> int | None:
        """Highlight `layer` (None: nothing); return its row. Only the rows whose highlight
        changed are signalled: a signal over every cell makes each view repaint them all."""
        before = self.row_of(self.highlighted) if self.highlighted else None
        self.highlighted = layer
        row = self.row_of(layer) if layer else None
        for changed in {before, row} - {None}:
            self.dataChanged.emit(self.index(changed, 0), self.index(changed, self.columnCount() - 1))
        return row

    def row_of(self, layer: str) -> int | None:
        for row, record in enumerate(self.inventory.layers):
            if record.name == layer:
                return row
        return None

    def _changed_all(self) -> None:
        if self.inventory.layers:
            self.dataChanged.emit(self.index(0, 0), self.index(self.rowCount() - 1, self.columnCount() - 1))

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.inventory.layers)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.HEADERS)

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if not index.isValid():
            return None
        record = self.inventory.layers[index.row()]
        if role == HIGHLIGHT_ROLE:
            return record.name == self.highlighted
        if role == LAYER_ROLE:
            return record.name
        if role == Qt.ItemDataRole.DisplayRole:
            return (record.name, record.kind, human_bytes(record.param_bytes))[index.column()]
        if role == Qt.ItemDataRole.TextAlignmentRole and index.column() >= 2:
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == Qt.ItemDataRole.BackgroundRole and record.name == self.highlighted:
            return QBrush(QColor(self._colors["highlight"]))
        if role == Qt.ItemDataRole.ToolTipRole:
            return (f"{record.name}\n{record.signature}\nparameters {record.param_bytes:,} B, buffers "
                    f"{record.buffer_bytes:,} B, output activations {human_bytes(record.activation_bytes)}")
        return None

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal and role == Qt.ItemDataRole.DisplayRole:
            return self.HEADERS[section]
        return None


class LayerListPanel(QWidget):
    """One model's layer table with its name above it."""

    def __init__(self, inventory: ModelInventory, parent=None):
        super().__init__(parent)
        self.model_name = inventory.name
        self.layers = LayerTableModel(inventory, self)
        self.view = QTableView(self)
        self.view.setModel(self.layers)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.view.verticalHeader().setVisible(False)
        self.view.verticalHeader().setDefaultSectionSize(22)
        header = self.view.horizontalHeader()
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)
        self.view.setTextElideMode(Qt.TextElideMode.ElideLeft)  # the end of a qualified name says most
        self.view.setWordWrap(False)
        self._fit_columns(inventory)
        title = QLabel(f"{inventory.name} — {inventory.architecture}", self, objectName="panelTitle")
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.addWidget(title)
        layout.addWidget(self.view)
        self.setMinimumWidth(300)

    def _fit_columns(self, inventory: ModelInventory) -> None:
        """Kind and Params as wide as their widest text, measured once from the inventory. Not
        ResizeToContents: that mode asks the model for every cell of both columns whenever the
        view lays out or a cell changes, in a hidden tab too (the lists are made when an analysis
        arrives, whatever tab is shown: benchmarks/ui_probe.py caught it during a preview)."""
        self.view.ensurePolished()  # the theme's font: the tab may never have been shown
        header = self.view.horizontalHeader()
        metrics = self.view.fontMetrics()
        padding = 16  # the cell's margins beyond its text
        for column, texts in ((1, {r.kind for r in inventory.layers}),
                              (2, {human_bytes(r.param_bytes) for r in inventory.layers})):
            widest = max((metrics.horizontalAdvance(t) for t in texts), default=0) + padding
            header.setSectionResizeMode(column, QHeaderView.ResizeMode.Interactive)
            header.resizeSection(column, max(widest, header.sectionSizeHint(column)))

    def highlight(self, layer: str | None) -> None:
        row = self.layers.set_highlighted(layer)
        selection = self.view.selectionModel()
        if row is None:
            selection.clearSelection()
            return
        index = self.layers.index(row, 0)
        selection.setCurrentIndex(index, QItemSelectionModel.SelectionFlag.ClearAndSelect
                                  | QItemSelectionModel.SelectionFlag.Rows)
        self.view.scrollTo(index, QAbstractItemView.ScrollHint.PositionAtCenter)

    def highlighted_rows(self) -> list[int]:
        return [row for row in range(self.layers.rowCount())
                if self.layers.data(self.layers.index(row, 0), HIGHLIGHT_ROLE)]


class SharingPanel(QWidget):
    sigAlignmentChanged = Signal(str)
    sigGroupSelected = Signal(int)  # row in the matrix, -1 for none

    def __init__(self, parent=None):
        super().__init__(parent)
        self.matrix = ShareMatrixModel(self)
        self.view = QTableView(self)
        self.view.setObjectName("shareMatrix")
        self.view.setModel(self.matrix)
        self.view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.view.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.view.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.view.setMouseTracking(True)
        self.view.verticalHeader().setDefaultSectionSize(22)
        self.view.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
        self.view.horizontalHeader().setDefaultSectionSize(110)
        self.view.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
        self.view.selectionModel().selectionChanged.connect(self._selection_changed)

        self.alignment = QComboBox(self)
        self.alignment.addItem("by structure", "structure")
        self.alignment.addItem("by order (GEMEL reference)", "order")
        self.alignment.setToolTip("How layers are matched across models")
        self.alignment.currentIndexChanged.connect(
            lambda _i: self.sigAlignmentChanged.emit(self.alignment.currentData()))
        self.bound_label = QLabel("", self)  # what merging every group would save
        self.bound_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.bound_label.setToolTip("The all-shareable bound: the parameter bytes saved if every group below "
                                    "were merged (one copy of each shared layer)")
        self.detail = QLabel("Select a group to see its layer in every model.", self)
        self.detail.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.max_layer_lists = MAX_LAYER_LISTS
        self.limit_note = QLabel("", self, objectName="limitNote")  # what the caps left out, if anything
        self.limit_note.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.limit_note.setWordWrap(True)
        self.limit_note.setTextFormat(Qt.TextFormat.RichText)
        self.limit_note.hide()

        top = QHBoxLayout()
        top.addWidget(QLabel("Align layers", self))
        top.addWidget(self.alignment)
        top.addSpacing(16)
        top.addWidget(self.bound_label, 1)

        self.lists_host = QWidget(self)
        self.lists_layout = QHBoxLayout(self.lists_host)
        self.lists_layout.setContentsMargins(0, 0, 0, 0)
        self.layer_lists: dict[str, LayerListPanel] = {}
        scroll = QScrollArea(self)
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.lists_host)

        splitter = QSplitter(Qt.Orientation.Vertical, self)
        splitter.addWidget(self.view)
        splitter.addWidget(scroll)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        splitter.setSizes([480, 320])
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(self.detail)  # a line of its own: a layer's name may be long
        layout.addWidget(self.limit_note)
        layout.addWidget(splitter, 1)
        self._colors = PALETTES["dark"]

    def set_alignment(self, alignment: str) -> None:
        """Show `alignment` in the combo without asking for a new analysis."""
        self.alignment.blockSignals(True)
        self.alignment.setCurrentIndex(max(0, self.alignment.findData(alignment)))
        self.alignment.blockSignals(False)

    def set_colors(self, colors: dict) -> None:
        self._colors = colors
        self.matrix.set_colors(colors)
        for panel in self.layer_lists.values():
            panel.layers.set_colors(colors)

    def set_analysis(self, analysis: WorkloadAnalysis | None) -> None:
        self.matrix.set_analysis(analysis)
        for panel in self.layer_lists.values():
            self.lists_layout.removeWidget(panel)
            panel.setParent(None)  # gone from the widget tree now, freed at the next event loop turn
            panel.deleteLater()
        self.layer_lists = {}
        if analysis is not None:
            self.set_alignment(analysis.alignment)
            for inventory in analysis.models[:self.max_layer_lists]:
                panel = LayerListPanel(inventory, self.lists_host)
                panel.layers.set_colors(self._colors)
                self.lists_layout.addWidget(panel)
                self.layer_lists[inventory.name] = panel
        self._update_limit_note(analysis)
        self.bound_label.setText(bound_text(analysis))
        header = self.view.horizontalHeader()
        if self.matrix.columnCount() <= 8:  # few models: use the width; many: fixed columns and scroll
            header.setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        else:
            # One width for every column from the names alone: measuring the cells
            # (resizeColumnsToContents) would visit every cell of every column.
            header.setSectionResizeMode(QHeaderView.ResizeMode.Fixed)
            metrics = header.fontMetrics()
            widest = max(metrics.horizontalAdvance(name) for name in self.matrix.model_names)
            header.setDefaultSectionSize(max(90, min(220, widest + 24)))
        self._selection_changed()

    def _update_limit_note(self, analysis: WorkloadAnalysis | None) -> None:
        parts = []
        if analysis is not None:
            shown_models, models = self.matrix.columnCount(), self.matrix.total_models
            shown_groups, groups = self.matrix.rowCount(), self.matrix.total_groups
            if shown_models < models:
                parts.append(f"the first {shown_models:,} of {models:,} models")
            if shown_groups < groups:
                parts.append(f"the heaviest {shown_groups:,} of {groups:,} groups")
            if len(self.layer_lists) < models:
                parts.append(f"layer lists of the first {len(self.layer_lists):,}")
        if parts:
            self.limit_note.setText(f"Showing {', '.join(parts)}. "
                                    "<code>gemel analyze WORKLOAD --json</code> lists every model and group.")
            self.limit_note.show()
        else:
            self.limit_note.clear()
            self.limit_note.hide()

    def select_group(self, row: int) -> None:
        if 0 <= row < self.matrix.rowCount():
            self.view.selectRow(row)
        else:
            self.view.clearSelection()

    def selected_group(self) -> int:
        rows = self.view.selectionModel().selectedRows()
        return rows[0].row() if rows else -1

    def _selection_changed(self, *args) -> None:
        row = self.selected_group()
        group = self.matrix.groups[row] if row >= 0 else None
        for name, panel in self.layer_lists.items():
            panel.highlight(group.layer_of(name) if group else None)
        if group is None:
            self.detail.setText("Select a group to see its layer in every model.")
        else:
            self.detail.setText(f"Group {row + 1}: {group_name(group)} in {len(group.members)} models, "
                                f"{human_bytes(group.bytes_per_copy)} per copy, saves "
                                f"{human_bytes(group.savings_bytes)}")
            self.detail.setToolTip(group.signature)
        self.sigGroupSelected.emit(row)
