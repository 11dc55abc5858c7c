"""The Export tab: write the deployable bundle for a merged folder, as `gemel export` does, and
show the export's own checks.

`export_bundle` (the function behind `gemel export`) runs as the panel's task (`TaskMixin`); its result's checks
(onnx checker, onnxruntime against torch, weights stored once, sharing as the plan says, no
weight copied into a graph) are listed as they came out, with the byte counts and notes. An
exported bundle can be opened in the Live preview with one click.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import QModelIndex, Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (QCheckBox, QFileDialog, QFormLayout, QHBoxLayout, QLabel, QLineEdit,
                               QProgressBar, QPushButton, QSplitter, QVBoxLayout, QWidget)

from ..units import human_bytes
from ..export import ExportResult, export_bundle
from . import settings
from .run_widgets import SnapshotTableModel, snapshot_table, titled
from .settings import PALETTES
from .task import TaskMixin
from .worker import Worker


def default_bundle_path(merged_dir: Path) -> Path:
    """Next to the merged folder: `<name>-bundle` (the archive adds .tar)."""
    return merged_dir.with_name(f"{merged_dir.name}-bundle")


class ChecksModel(SnapshotTableModel):
    """The export's checks, in the order it ran them; the result coloured."""

    COLUMNS = (
        ("Check", lambda c: c.name),
        ("Result", lambda c: "passed" if c.passed else "FAILED"),
        ("Detail", lambda c: c.detail),
    )
    TEXT = frozenset({"Check", "Result", "Detail"})
    STRETCH = "Detail"

    def __init__(self, parent=None):
        super().__init__(parent)
        self._colors = PALETTES["dark"]

    def set_colors(self, colors: dict) -> None:
        self._colors = colors
        if self.rows:
            self.dataChanged.emit(self.index(0, 0), self.index(self.rowCount() - 1, self.columnCount() - 1))

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        if role == Qt.ItemDataRole.ForegroundRole and index.isValid() and self.COLUMNS[index.column()][0] == "Result":
            return QBrush(QColor(self._colors["savings" if self.rows[index.row()].passed else "bound"]))
        return super().data(index, role)


def _graph(text):
    """A column about the model's ONNX graph: '-' for a model exported without one."""
    return lambda m: "-" if m.onnx is None else text(m)


class ModelsExportModel(SnapshotTableModel):
    """Per model: its ONNX graph, how many initializers point into the weights file, and what
    the graph holds of its own."""

    COLUMNS = (
        ("Model", lambda m: m.name),
        ("ONNX graph", lambda m: m.onnx or "none (torch backend only)"),
        ("Graph bytes", _graph(lambda m: human_bytes(m.onnx_bytes))),
        ("External initializers", _graph(lambda m: str(m.external_initializers))),
        ("Copied tensors", _graph(lambda m: human_bytes(m.copied_tensor_bytes))),
        ("Own constants", _graph(lambda m: human_bytes(m.constant_bytes))),
        ("Max |ort - torch|", _graph(lambda m: "-" if m.max_abs_diff is None else f"{m.max_abs_diff:.2g}")),
    )
    TEXT = frozenset({"Model", "ONNX graph"})


def _fit_headers(view) -> None:
    """Each column at least as wide as its header text and the theme's padding (an empty table's
    header sizes leave the padding out and cut the titles)."""
    header, model = view.horizontalHeader(), view.model()
    metrics = header.fontMetrics()
    for column in range(model.columnCount()):
        text = str(model.headerData(column, Qt.Orientation.Horizontal) or "")
        header.resizeSection(column, max(header.sectionSize(column), metrics.horizontalAdvance(text) + 28))


class ExportPanel(TaskMixin, QWidget):
    sigWorkerStarted = Signal(object)
    sigExported = Signal(object)  # the ExportResult
    sigOpenInPreview = Signal(object)  # the bundle's path (folder or archive)
    sigError = Signal(str)

    task_noun = "export"

    def __init__(self, parent=None):
        super().__init__(parent)
        self.result: ExportResult | None = None
        self._out_chosen = False

        self.merged_edit = QLineEdit(self)
        self.merged_edit.setPlaceholderText("the folder a merge wrote (the Retraining tab, or `gemel merge --out`)")
        self.merged_edit.textEdited.connect(lambda text: self.set_merged_dir(text, chosen=True))
        self.merged_button = QPushButton("Choose…", self)
        self.merged_button.clicked.connect(self.choose_merged_dir)
        self.out_edit = QLineEdit(self)
        self.out_edit.setPlaceholderText("a new or empty folder (or a .tar with Archive)")
        self.out_edit.textEdited.connect(self._out_edited)
        self.out_button = QPushButton("Choose…", self)
        self.out_button.clicked.connect(self.choose_out)
        self.archive_check = QCheckBox("Archive: one .tar file instead of a folder", self)
        self.archive_check.setToolTip("'.tar' is added to the destination unless it ends in .tar or .tar.gz")
        merged_row = QHBoxLayout()
        merged_row.addWidget(self.merged_edit, 1)
        merged_row.addWidget(self.merged_button)
        out_row = QHBoxLayout()
        out_row.addWidget(self.out_edit, 1)
        out_row.addWidget(self.out_button)
        form = QFormLayout()
        form.addRow("Merged folder", merged_row)
        form.addRow("Bundle", out_row)
        form.addRow("", self.archive_check)

        self.export_button = QPushButton("Export", self)
        self.export_button.setToolTip("Write manifest, weights (each tensor once) and ONNX graphs, then check them")
        self.export_button.clicked.connect(self.export)
        self.preview_button = QPushButton("Open in Live preview", self)
        self.preview_button.setToolTip("Set this bundle in the Live preview tab")
        self.preview_button.clicked.connect(self._open_in_preview)
        self.progress_bar = QProgressBar(self)
        self.progress_bar.setRange(0, 0)
        self.progress_bar.setMaximumWidth(160)
        self.progress_bar.setTextVisible(False)
        buttons = QHBoxLayout()
        buttons.addWidget(self.export_button)
        buttons.addWidget(self.preview_button)
        buttons.addWidget(self.progress_bar)
        buttons.addStretch(1)
        self.status_label = QLabel("", self)
        self.init_task(self.status_label, self.progress_bar)
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.summary_label = QLabel("No export yet", self)
        self.summary_label.setWordWrap(True)
        self.summary_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.notes_label = QLabel("", self)
        self.notes_label.setWordWrap(True)
        self.notes_label.hide()

        self.checks_model = ChecksModel(self)
        self.checks_view = snapshot_table(self.checks_model, self)
        self.checks_view.setWordWrap(True)
        self.models_model = ModelsExportModel(self)
        self.models_view = snapshot_table(self.models_model, self)
        self.models_view.horizontalHeader().setStretchLastSection(False)
        for view in (self.checks_view, self.models_view):
            _fit_headers(view)

        top = QWidget(self)
        top_layout = QVBoxLayout(top)
        top_layout.setContentsMargins(0, 0, 0, 0)
        title = QLabel("Export a bundle", top)
        title.setObjectName("panelTitle")
        top_layout.addWidget(title)
        top_layout.addLayout(form)
        top_layout.addLayout(buttons)
        top_layout.addWidget(self.status_label)
        top_layout.addWidget(self.summary_label)
        top_layout.addWidget(self.notes_label)
        top.setMaximumWidth(900)
        tables = QSplitter(Qt.Orientation.Vertical, self)
        tables.addWidget(titled(self, "Checks (run on the written files)", self.checks_view))
        tables.addWidget(titled(self, "Models", self.models_view))
        tables.setSizes([380, 220])
        layout = QVBoxLayout(self)
        layout.addWidget(top)
        layout.addWidget(tables, 1)
        self.set_colors(PALETTES["dark"])
        self._update_enabled()

    # --- paths ------------------------------------------------------------------------------

    def merged_dir(self) -> Path:
        return Path(self.merged_edit.text().strip()).expanduser()

    def out_path(self) -> Path:
        return Path(self.out_edit.text().strip()).expanduser()

    def set_merged_dir(self, path: Path | str, chosen: bool = True) -> None:
        """The merged folder to export; the destination follows it until the user picks one.
        `chosen=False` (a merge that just finished) does not replace a folder the user chose."""
        if not chosen and self.merged_edit.text().strip():
            return
        text = str(path)
        if self.merged_edit.text() != text:
            self.merged_edit.setText(text)
        if not self._out_chosen and text.strip():
            self.out_edit.setText(str(default_bundle_path(self.merged_dir())))
        self._update_enabled()

    def set_out_path(self, path: Path | str) -> None:
        self.out_edit.setText(str(path))
        self._out_edited()

    def _out_edited(self, *args) -> None:
        self._out_chosen = True
        self._update_enabled()

    def choose_merged_dir(self) -> None:
        chosen = settings.ask_existing(self, "export/merged", "Merged folder (written by gemel merge --out)")
        if chosen:
            self.set_merged_dir(chosen)

    def choose_out(self) -> None:
        start = self.out_edit.text().strip() or str(Path.home())
        if self.archive_check.isChecked():
            chosen, _ = QFileDialog.getSaveFileName(self, "Bundle archive", start, "Archives (*.tar *.tar.gz)")
        else:
            chosen = QFileDialog.getExistingDirectory(self, "Bundle folder (new or empty)", start)
        if chosen:
            self.set_out_path(chosen)

    # --- exporting --------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return self.task_running

    @property
    def worker(self) -> Worker | None:
        return self.task_worker

    def export(self) -> Worker | None:
        if self.running:
            return None
        merged_text, out_text = self.merged_edit.text().strip(), self.out_edit.text().strip()
        if not merged_text:
            self._fail("choose the merged folder: what a merge on the Retraining tab (or `gemel merge --out`) wrote")
            return None
        if not out_text:
            self._fail("choose where the bundle goes (a new or empty folder)")
            return None
        merged, out, archive = self.merged_dir(), self.out_path(), self.archive_check.isChecked()
        self.result = None
        self.checks_model.set_rows([])
        self.models_model.set_rows([])
        self.summary_label.setText("Exporting…")
        self.notes_label.setText("")
        self.notes_label.hide()
        worker = self.start_task(lambda progress, partial: export_bundle(merged, out, archive=archive),
                                 name=f"export of {merged}",
                                 message=f"Exporting {merged} to {out}{' (archive)' if archive else ''}…")
        self.sigWorkerStarted.emit(worker)
        return worker

    def on_task_done(self, result: ExportResult) -> None:
        self.result = result
        self.checks_model.set_rows(result.checks)
        self.models_model.set_rows(result.models)
        self.checks_view.resizeRowsToContents()
        passed = sum(c.passed for c in result.checks)
        self.summary_label.setText(
            f"Weights stored once: {human_bytes(result.weights_data_bytes)} of tensor data "
            f"({human_bytes(result.sum_model_bytes)} if each model kept its own); bundle on disk "
            f"{human_bytes(result.bundle_bytes)}. Checks: {passed} of {len(result.checks)} passed.")
        self.notes_label.setText("\n".join(f"Note: {n}" for n in result.notes))
        self.notes_label.setVisible(bool(result.notes))
        verdict = "written" if result.ok else "written, but checks FAILED (see below)"
        self.set_status_line(f"{result.bundle}: {verdict} in {self.task_elapsed:.1f} s")
        self.sigExported.emit(result)

    def on_task_failed(self, message: str) -> None:
        self.summary_label.setText("No export")
        self._fail(message)

    def on_task_cancelled(self, mode: str) -> None:  # export has no cancel; only a quit stops it
        self.summary_label.setText("No export")
        self._fail("the export stopped")

    def _fail(self, message: str) -> None:
        # The window shows the message (once, in its banner); the panel's line says where it went.
        self.set_status_line("Failed: the message is shown above")
        self.sigError.emit(message)

    def update_controls(self) -> None:
        self._update_enabled()

    def _open_in_preview(self) -> None:
        if self.result is not None:
            self.sigOpenInPreview.emit(self.result.bundle)

    def _update_enabled(self) -> None:
        running = self.running
        ready = bool(self.merged_edit.text().strip() and self.out_edit.text().strip())
        self.export_button.setEnabled(ready and not running)
        self.preview_button.setEnabled(not running and self.result is not None and self.result.ok)
        for w in (self.merged_edit, self.merged_button, self.out_edit, self.out_button, self.archive_check):
            w.setEnabled(not running)

    def set_colors(self, colors: dict) -> None:
        self.checks_model.set_colors(colors)
