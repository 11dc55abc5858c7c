"""The studio's main window: a tab per view over one workload and its last analysis.

Every change (open, drop, add or remove a model, alignment) makes a *candidate* workload
that is analysed by a `Worker`; only when the analysis succeeds does the candidate become
the current workload. A failed or cancelled change leaves the window exactly as it was.
Panels are added with `add_panel`: the merge plan (Proposals) and the merge search
(Retraining) follow the analysis tabs; the retraining run has its own worker, so analysing
an edited workload and merging the last one can go on at once.
"""

from __future__ import annotations

import re
import tempfile
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Callable

from PySide6.QtCore import QByteArray, QDir, QEvent, QMimeData, QObject, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import (QAction, QActionGroup, QCloseEvent, QDesktopServices, QDragEnterEvent, QDropEvent,
                           QKeySequence)
from PySide6.QtWidgets import (QFileDialog, QFrame, QHBoxLayout, QLabel, QMainWindow, QMessageBox, QProgressBar,
                               QPushButton, QTabWidget, QVBoxLayout, QWidget)

from ..analysis import WorkloadAnalysis, analyze_workload
from ..system import gpu_info, versions
from ..units import human_bytes
from ..errors import GemelError
from ..workload import ModelSpec, OnnxSource, Workload, load_workload, parse_workload, save_workload, workload_to_dict
from . import settings
from .dialogs import AddModelDialog, about_box, unique_name
from .export_view import ExportPanel
from .memory_view import MemoryPanel
from .models_view import ModelsPanel
from .monitor_view import MonitorPanel
from .preview_view import PreviewPanel
from .proposals_view import ProposalsPanel
from .finetune_view import FinetunePanel, random_weight_models
from .retraining_view import RetrainingPanel
from .sharing_view import SharingPanel
from . import task
from .task import TaskMixin
from .worker import Worker, worker_pool

WORKLOAD_SUFFIXES = {".yaml", ".yml"}
CHECKPOINT_SUFFIXES = {".pt", ".pth", ".safetensors"}
ONNX_SUFFIXES = {".onnx"}
WORKLOAD_FILTER = "Workloads (*.yaml *.yml);;All files (*)"


def register_resources() -> None:
    """The stylesheets name their images `gemel:NAME` (resources/NAME), wherever the package lives."""
    folder = str(files("gemel_studio.resources"))
    if folder not in QDir.searchPaths("gemel"):
        QDir.addSearchPath("gemel", folder)


@dataclass
class _Change:
    """A candidate workload waiting for its analysis, and what committing it means."""

    workload: Workload
    alignment: str
    description: str  # for the status bar: 'opened quickstart.yaml', 'added model x'
    opened: Path | None = None  # a file to put in the recent list on success
    modified: bool = True  # the committed workload differs from its file


TAB_NAMED = re.compile(r"\b(Models|Sharing|Memory|Fine-tune|Proposals|Retraining|Live preview|Preview|Export|Monitor)"
                       r" tab\b")
FIXED_IN_PLAN = re.compile(r"\b(in|from) the plan\b|\bpropose or load\b")


def fixing_tab(message: str) -> str | None:
    """The tab an error says fixes it ('... in the Proposals tab'), or None."""
    named = TAB_NAMED.search(message)
    if named:
        return "Preview" if named.group(1) == "Live preview" else named.group(1)
    return "Proposals" if FIXED_IN_PLAN.search(message) else None


def readme_url() -> QUrl | None:
    """The README: the checkout's file, else the installed package's description (the same
    text, written to a temporary file); None when neither is there."""
    local = Path(__file__).resolve().parents[2] / "README.md"
    if local.is_file():
        return QUrl.fromLocalFile(str(local))
    try:
        from importlib.metadata import PackageNotFoundError, metadata

        text = metadata("gemel-studio").get_payload() or ""
    except (ImportError, PackageNotFoundError):
        text = ""
    if not text.strip():
        return None
    path = Path(tempfile.gettempdir()) / "gemel-studio-README.md"
    path.write_text(text, encoding="utf-8")
    return QUrl.fromLocalFile(str(path))


class ErrorBanner(QFrame):
    """An error floating over the bottom of the tabs (it pushes nothing), until the user closes
    it or the next success; where the message names the tab that fixes it, a button goes there."""

    WIDTH = 640

    def __init__(self, parent=None):
        super().__init__(parent)
        self.setObjectName("errorBanner")
        self.label = QLabel("", self)
        self.label.setWordWrap(True)
        self.label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.go_button = QPushButton("", self)
        self.go_button.hide()
        self.tab: str | None = None
        self.area: QWidget | None = None  # the widget it floats over (the tabs), a sibling
        close = QPushButton("✕", self)
        close.setToolTip("Dismiss")
        close.setFixedWidth(28)
        close.clicked.connect(self.hide)
        layout = QHBoxLayout(self)
        layout.setContentsMargins(10, 6, 6, 6)
        layout.addWidget(self.label, 1)
        layout.addWidget(self.go_button, 0, Qt.AlignmentFlag.AlignTop)
        layout.addWidget(close, 0, Qt.AlignmentFlag.AlignTop)
        self.hide()

    def show_message(self, message: str) -> None:
        self.label.setText(message)
        self.tab = fixing_tab(message)
        self.go_button.setText(f"Go to {self.tab}" if self.tab else "")
        self.go_button.setVisible(self.tab is not None)
        self.show()
        self.place()
        self.raise_()

    @property
    def message(self) -> str:
        return self.label.text() if not self.isHidden() else ""

    def place(self) -> None:
        """Bottom right of the tab area, as wide as fits (the parent's layout does not hold it)."""
        if self.area is None or self.isHidden():
            return
        area = self.area.geometry()
        width = max(200, min(self.WIDTH, area.width() - 24))
        height = self.heightForWidth(width) if self.hasHeightForWidth() else self.sizeHint().height()
        self.setGeometry(area.right() - width - 12, area.bottom() - height - 12, width, max(height, 36))


class _Resized(QObject):
    """Calls `fn` when the watched widget is resized."""

    def __init__(self, widget: QWidget, fn: Callable[[], None]):
        super().__init__(widget)
        self._fn = fn
        widget.installEventFilter(self)

    def eventFilter(self, watched, event) -> bool:
        if event.type() == QEvent.Type.Resize:
            self._fn()
        return False


class MainWindow(TaskMixin, QMainWindow):
    sigAnalysisChanged = Signal(object)  # the committed WorkloadAnalysis (or None)
    sigWorkerStarted = Signal(object)  # each Worker as it starts, for panels and tests
    sigError = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.workload: Workload | None = None
        self.analysis: WorkloadAnalysis | None = None
        self.alignment = "structure"
        self.ask_before_discard = True  # ask before closing or opening over unsaved edits
        self.init_task()  # the analysis: its bar and Cancel button sit in the status bar
        self._change: _Change | None = None
        self._started_at = 0.0
        self._dialog: AddModelDialog | None = None
        self._checkpoint_queue: list[Path] = []
        self._removed: tuple[str, list[dict]] | None = None  # the last model removed, and the models before
        self.offer_resume_on_open = True  # offer to resume the last merge of a workload when it opens
        self.theme = settings.saved_theme()
        register_resources()

        self.setWindowTitle("GEMEL Studio")
        self.setAcceptDrops(True)
        self.resize(1400, 900)

        self.banner = ErrorBanner(self)
        self.tabs = QTabWidget(self)
        self.tabs.setDocumentMode(True)
        self.models_panel = ModelsPanel(self)
        self.sharing_panel = SharingPanel(self)
        self.memory_panel = MemoryPanel(self)
        self.add_panel(self.models_panel, "Models")
        self.add_panel(self.sharing_panel, "Sharing")
        self.add_panel(self.memory_panel, "Memory")
        self.finetune_panel = FinetunePanel(self)
        self.add_panel(self.finetune_panel, "Fine-tune")
        self.proposals_panel = ProposalsPanel(self)
        self.retraining_panel = RetrainingPanel(self)
        self.add_panel(self.proposals_panel, "Proposals")
        self.add_panel(self.retraining_panel, "Retraining")
        self.preview_panel = PreviewPanel(self)
        self.export_panel = ExportPanel(self)
        self.monitor_panel = MonitorPanel(self)
        self.add_panel(self.preview_panel, "Preview")
        self.add_panel(self.export_panel, "Export")
        self.add_panel(self.monitor_panel, "Monitor")
        central = QWidget(self)
        layout = QVBoxLayout(central)
        layout.setContentsMargins(6, 6, 6, 0)
        layout.addWidget(self.tabs, 1)
        self.banner.setParent(central)  # floats over the tabs: showing it moves nothing
        self.banner.area = self.tabs
        self._banner_placer = _Resized(central, self.banner.place)
        self.banner.go_button.clicked.connect(self._go_to_fixing_tab)
        self.setCentralWidget(central)

        self.models_panel.sigAddRequested.connect(self.add_model_dialog)
        self.models_panel.sigRemoveRequested.connect(self.remove_model)
        self.models_panel.table.doubleClicked.connect(self._show_model_memory)
        self.sharing_panel.sigAlignmentChanged.connect(self.set_alignment)
        self.proposals_panel.sigPlanReplaced.connect(lambda plan: self.retraining_panel.set_plan(plan, replaced=True))
        self.proposals_panel.sigPlanEdited.connect(lambda plan: self.retraining_panel.set_plan(plan, replaced=False))
        self.proposals_panel.sigError.connect(self.show_error)
        self.retraining_panel.sigError.connect(self.show_error)
        self.retraining_panel.sigPlanRestored.connect(self.proposals_panel.load_plan_file)
        self.finetune_panel.sigError.connect(self.show_error)
        self.finetune_panel.sigOpenWorkload.connect(self.open_path)
        # Random weights: the Models tab offers fine-tuning first.
        self.random_hint = QLabel("", self.models_panel)
        self.random_hint.setWordWrap(True)
        self.random_hint.setObjectName("warningLabel")
        self.random_hint.linkActivated.connect(lambda _link: self.tabs.setCurrentWidget(self.finetune_panel))
        self.random_hint.hide()
        # Below the table, which gives up the line: the summary and buttons above never move.
        models_layout = self.models_panel.layout()
        models_layout.insertWidget(models_layout.indexOf(self.models_panel.table) + 1, self.random_hint)
        self.retraining_panel.sigRunFinished.connect(self._show_final_plan)
        self.retraining_panel.sigRunFinished.connect(
            lambda report: self.export_panel.set_merged_dir(self.retraining_panel.last_out_dir, chosen=False))
        for panel in (self.preview_panel, self.export_panel, self.monitor_panel):
            panel.sigError.connect(self.show_error)
        self.export_panel.sigOpenInPreview.connect(self._open_in_preview)

        self._build_status_bar()
        self._build_menus()
        self._restore_window_state()
        self.set_theme(self.theme, persist=False)
        self._update_title()
        self._set_busy(False)

    # --- shell ------------------------------------------------------------------------------

    def add_panel(self, panel: QWidget, title: str) -> int:
        """Add a view as a tab; later issues' panels come in here."""
        return self.tabs.addTab(panel, title)

    def _build_status_bar(self) -> None:
        bar = self.statusBar()
        self.progress_bar = QProgressBar(self)
        self.progress_bar.setFixedWidth(220)
        self.progress_bar.setTextVisible(True)
        self.cancel_button = QPushButton("Cancel", self)
        self.cancel_button.setToolTip("Stop the running analysis (Esc); the window keeps what it showed")
        self.cancel_button.clicked.connect(self.cancel_work)
        self.device_label = QLabel("", self)
        bar.addPermanentWidget(self.progress_bar)
        bar.addPermanentWidget(self.cancel_button)
        bar.addPermanentWidget(self.device_label)
        info = versions()
        self._gpus = info.get("gpus") or []
        self._show_device(self._gpus, info.get("device", "cpu"))
        if self._gpus:  # GPU memory moves while other work runs: refresh it now and then
            self._gpu_timer = QTimer(self)
            self._gpu_timer.timeout.connect(lambda: self._show_device(gpu_info(), "cuda"))
            self._gpu_timer.start(5000)

    def _show_device(self, gpus: list[dict], device: str) -> None:
        if gpus:
            gpu = gpus[0]
            more = f" (+{len(gpus) - 1} more)" if len(gpus) > 1 else ""
            self.device_label.setText(f"GPU: {gpu['name']}, {human_bytes(gpu['memory_used'])} / "
                                      f"{human_bytes(gpu['memory_total'])}{more}")
        else:
            self.device_label.setText("Device: CPU" if device == "cpu" else f"Device: {device}")

    def _action(self, menu, text: str, slot: Callable, shortcut=None, tip: str = "") -> QAction:
        action = QAction(text, self)
        if shortcut is not None:
            action.setShortcut(QKeySequence(shortcut))
        if tip:
            action.setStatusTip(tip)
        action.triggered.connect(lambda checked=False: slot())
        menu.addAction(action)
        return action

    def _build_menus(self) -> None:
        bar = self.menuBar()
        file_menu = bar.addMenu("&File")
        self.new_action = self._action(file_menu, "&New workload", self.new_workload, QKeySequence.StandardKey.New)
        self.open_action = self._action(file_menu, "&Open workload…", self.open_dialog, QKeySequence.StandardKey.Open)
        self.recent_menu = file_menu.addMenu("Open &recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent_menu)
        file_menu.addSeparator()
        self.save_action = self._action(file_menu, "&Save", self.save, QKeySequence.StandardKey.Save)
        self.save_as_action = self._action(file_menu, "Save &as…", self.save_as, QKeySequence.StandardKey.SaveAs)
        file_menu.addSeparator()
        self.quit_action = self._action(file_menu, "&Quit", self.close, QKeySequence.StandardKey.Quit)
        self._fill_recent_menu()

        workload_menu = bar.addMenu("&Workload")
        self.add_action = self._action(workload_menu, "&Add model…", self.add_model_dialog, "Ctrl+M")
        self.remove_action = self._action(workload_menu, "&Remove selected model", self._remove_selected,
                                          QKeySequence.StandardKey.Delete)
        self.undo_remove_action = self._action(workload_menu, "&Undo remove", self.undo_remove,
                                               QKeySequence.StandardKey.Undo, "Put back the model removed last")
        self.undo_remove_action.setEnabled(False)
        workload_menu.addSeparator()
        self.reanalyse_action = self._action(workload_menu, "Analyse a&gain", self.reanalyse,
                                             QKeySequence.StandardKey.Refresh)
        self.cancel_action = self._action(workload_menu, "&Cancel analysis", self.cancel_work, "Esc")

        view_menu = bar.addMenu("&View")
        for i in range(self.tabs.count()):
            self._action(view_menu, self.tabs.tabText(i), lambda i=i: self.tabs.setCurrentIndex(i), f"Ctrl+{i + 1}")
        view_menu.addSeparator()
        theme_menu = view_menu.addMenu("&Theme")
        self.theme_group = QActionGroup(self)
        self.theme_actions: dict[str, QAction] = {}
        for theme in settings.THEMES:
            action = QAction(theme.capitalize(), self, checkable=True)
            action.triggered.connect(lambda checked=False, t=theme: self.set_theme(t))
            self.theme_group.addAction(action)
            theme_menu.addAction(action)
            self.theme_actions[theme] = action

        help_menu = bar.addMenu("&Help")
        self.readme_action = self._action(help_menu, "&README (how to use the studio)", self.open_readme,
                                          QKeySequence.StandardKey.HelpContents, "Open the README")
        self._action(help_menu, "&About GEMEL Studio", self.show_about)

    # --- settings ---------------------------------------------------------------------------

    def _restore_window_state(self) -> None:
        s = settings.studio_settings()
        geometry = s.value("window/geometry", QByteArray(), type=QByteArray)
        if geometry is not None and not geometry.isEmpty():
            self.restoreGeometry(geometry)
        state = s.value("window/state", QByteArray(), type=QByteArray)
        if state is not None and not state.isEmpty():
            self.restoreState(state)
        self.tabs.setCurrentIndex(s.value("window/tab", 0, type=int))

    def _save_window_state(self) -> None:
        s = settings.studio_settings()
        s.setValue("window/geometry", self.saveGeometry())
        s.setValue("window/state", self.saveState())
        s.setValue("window/tab", self.tabs.currentIndex())

    def set_theme(self, theme: str, persist: bool = True) -> None:
        if theme not in settings.THEMES:
            theme = settings.DEFAULT_THEME
        self.theme = theme
        self.setStyleSheet(settings.stylesheet(theme))
        colors = settings.PALETTES[theme]
        self.memory_panel.set_colors(colors)
        self.sharing_panel.set_colors(colors)
        self.proposals_panel.set_colors(colors)
        self.retraining_panel.set_colors(colors)
        self.finetune_panel.set_colors(colors)
        self.preview_panel.set_colors(colors)
        self.export_panel.set_colors(colors)
        self.monitor_panel.set_colors(colors)
        self.theme_actions[theme].setChecked(True)
        if persist:
            settings.save_theme(theme)

    def _fill_recent_menu(self) -> None:
        self.recent_menu.clear()
        paths = settings.recent_files()
        for path in paths:
            action = self.recent_menu.addAction(path.name)
            action.setToolTip(str(path))
            action.setStatusTip(str(path))
            action.setData(str(path))
            action.triggered.connect(lambda checked=False, p=path: self._open_recent(p))
        if not paths:
            self.recent_menu.addAction("(none)").setEnabled(False)

    def recent_paths_in_menu(self) -> list[Path]:
        self._fill_recent_menu()
        return [Path(a.data()) for a in self.recent_menu.actions() if a.data()]

    def _open_recent(self, path: Path) -> None:
        if not path.exists():
            settings.forget_file(path)
            self.show_error(f"{path}: no such workload file any more (removed from the recent list)")
            return
        self.open_path(path)

    # --- messages ---------------------------------------------------------------------------

    def show_error(self, message: str) -> None:
        """Shown once, in the banner (the panel's own line only says that it failed)."""
        self.banner.show_message(message)
        self.statusBar().clearMessage()  # no stale success beside the error
        self.sigError.emit(message)

    def clear_error(self) -> None:
        self.banner.hide()

    open_url = staticmethod(QDesktopServices.openUrl)  # replaced by tests

    def open_readme(self) -> bool:
        url = readme_url()
        if url is None:
            self.show_error("the README is not installed with this copy of the studio; it is README.md in the "
                            "project's source")
            return False
        if not self.open_url(url):
            self.show_error(f"{url.toLocalFile()}: no application here opens it; read it in any text editor")
            return False
        return True

    def _go_to_fixing_tab(self) -> None:
        tab = self.banner.tab
        for i in range(self.tabs.count()):
            if self.tabs.tabText(i) == tab:
                self.tabs.setCurrentIndex(i)
                self.banner.hide()
                return

    def show_about(self) -> QMessageBox:
        box = about_box(self)
        box.open()
        return box

    def _update_title(self) -> None:
        if self.workload is None:
            self.setWindowTitle("GEMEL Studio")
            return
        where = str(self.workload.path) if self.workload.path else "not saved"
        self.setWindowTitle(f"{self.workload.name}[*] — {where} — GEMEL Studio")

    @property
    def unsaved(self) -> bool:
        """Edits not on disk: the committed workload's, or an edit still being analysed."""
        return self.isWindowModified() or (self._change is not None and self._change.modified)

    def _confirm_discard(self) -> bool:
        if not self.unsaved or not self.ask_before_discard:
            return True
        answer = QMessageBox.question(
            self, "Unsaved changes", "The workload has unsaved changes. Save them first?",
            QMessageBox.StandardButton.Save | QMessageBox.StandardButton.Discard
            | QMessageBox.StandardButton.Cancel)
        if answer == QMessageBox.StandardButton.Save:
            return self.save()
        return answer == QMessageBox.StandardButton.Discard

    # --- long work --------------------------------------------------------------------------

    task_noun = "analysis"

    @property
    def busy(self) -> bool:
        return self.task_running

    def set_status_line(self, text: str) -> None:
        self.statusBar().showMessage(text)

    def update_controls(self) -> None:
        self._set_busy(self.task_running)

    def _set_busy(self, busy: bool) -> None:
        self.progress_bar.setVisible(busy)
        self.cancel_button.setVisible(busy)
        self.cancel_action.setEnabled(busy)
        if not busy:
            self.progress_bar.reset()

    def _analyse(self, change: _Change) -> Worker:
        """Analyse a candidate; it replaces the current workload only if this succeeds."""
        candidate, alignment = change.workload, change.alignment
        self._change = change
        self._started_at = time.monotonic()
        self.progress_bar.setRange(0, max(1, len(candidate.models) + 1))
        self.progress_bar.setValue(0)
        worker = self.start_task(  # a newer change supersedes the running one
            lambda progress, partial: analyze_workload(candidate, alignment=alignment, progress=progress),
            name=f"analysis of {candidate.name}", supersede=True,
            message=f"Analysing {candidate.name} ({len(candidate.models)} models)…")
        self.sigWorkerStarted.emit(worker)
        return worker

    def _show_final_plan(self, report: dict) -> None:
        """After a merge, the Proposals tab shows its outcome: which groups were kept or backed off."""
        path = self.retraining_panel.last_out_dir / "plan.yaml" if self.retraining_panel.last_out_dir else None
        if path is not None and path.exists():
            self.proposals_panel.load_plan_file(path)

    def cancel_work(self) -> None:
        self.stop_task("cancel", "Cancelling…")

    def stop_work(self, wait_ms: int = 10_000) -> None:
        """Stop everything running (a merge is paused: its checkpoint stays; a preview run and
        the monitor's polling stop) and wait for it."""
        self.stop_task("cancel", "Cancelling…")
        self.retraining_panel.pause()
        self.finetune_panel.cancel()
        self.proposals_panel.cancel_risk()
        self.preview_panel.stop()
        self.monitor_panel.stop()
        worker_pool().waitForDone(wait_ms)
        self.proposals_panel.risk_pool.waitForDone(wait_ms)
        self.preview_panel.stop(wait_ms)
        self.monitor_panel.stop(wait_ms)

    def _open_in_preview(self, bundle: Path) -> None:
        if self.preview_panel.running:
            self.show_error("the Live preview is running: stop it before opening another bundle")
            return
        if self.preview_panel.set_bundle_path(bundle):
            self.tabs.setCurrentWidget(self.preview_panel)

    def on_task_progress(self, done: int, total: int, message: str) -> None:
        self.progress_bar.setRange(0, max(1, total))
        self.progress_bar.setValue(done)
        self.progress_bar.setFormat(f"%v/%m {message}"[:40])

    def _finish(self) -> _Change:
        change, self._change = self._change, None
        self._set_busy(False)
        return change

    def on_task_done(self, analysis: WorkloadAnalysis) -> None:
        seconds = time.monotonic() - self._started_at
        change = self._finish()
        self.workload, self.analysis, self.alignment = change.workload, analysis, change.alignment
        self.clear_error()
        if change.opened is not None:
            settings.remember_file(change.opened)
            self._fill_recent_menu()
        self.setWindowModified(change.modified)
        self._update_title()
        self._refresh_views()
        self.statusBar().showMessage(
            f"{change.description}: {len(analysis.models)} models, {len(analysis.groups)} share groups, "
            f"bound {human_bytes(analysis.max_savings_bytes)} ({analysis.max_savings_fraction:.1%}) "
            f"in {seconds:.1f} s", 15000)
        self.sigAnalysisChanged.emit(analysis)
        if self.offer_resume_on_open and change.opened is not None:
            QTimer.singleShot(0, self.retraining_panel.offer_resume)

    def on_task_failed(self, message: str) -> None:
        change = self._finish()
        self.sharing_panel.set_alignment(self.alignment)
        kept = f" (kept {self.workload.name})" if self.workload is not None else ""
        self.show_error(f"{message}{kept}" if change.opened is None else message)

    def on_task_cancelled(self, mode: str) -> None:
        change = self._finish()
        self.sharing_panel.set_alignment(self.alignment)
        kept = f"; kept {self.workload.name}" if self.workload is not None else ""
        self.statusBar().showMessage(f"Cancelled: {change.description}{kept}", 15000)

    def _refresh_views(self) -> None:
        self.models_panel.set_data(self.workload, self.analysis)
        self.sharing_panel.set_analysis(self.analysis)
        self.memory_panel.set_analysis(self.analysis)
        self.proposals_panel.set_context(self.workload, self.analysis)
        self.retraining_panel.set_workload(self.workload, self.analysis)
        self.finetune_panel.set_workload(self.workload)
        random = random_weight_models(self.workload)
        self.random_hint.setText(
            f"{', '.join(random)} {'has' if len(random) == 1 else 'have'} random weights, so accuracy and merge "
            f"targets mean nothing yet: <a href='finetune' style='color: #5aa9ff'>"
            f"fine-tune {'it' if len(random) == 1 else 'them'} "
            f"first</a> (the Fine-tune tab).")
        self.random_hint.setVisible(bool(random))

    # --- workload changes -------------------------------------------------------------------

    def _base(self) -> Workload | None:
        """What an edit applies to: a change still being analysed, else the current workload."""
        return self._change.workload if self._change is not None else self.workload

    def _edited(self, models: list[dict]) -> Workload:
        base = self._base() or Workload(name="untitled")
        data = workload_to_dict(base)
        data["models"] = models
        origin = str(base.path) if base.path else base.name
        return parse_workload(data, origin=origin, path=base.path)

    def _apply_models(self, models: list[dict], description: str) -> bool:
        try:
            candidate = self._edited(models)
        except GemelError as exc:
            self.show_error(str(exc))
            return False
        self._analyse(_Change(candidate, self.alignment, description))
        return True

    def new_workload(self) -> None:
        if not self._confirm_discard():
            return
        self._analyse(_Change(Workload(name="untitled"), self.alignment, "new workload", modified=False))

    def open_dialog(self) -> None:
        start = str(self.workload.path.parent) if self.workload and self.workload.path else ""
        path, _ = QFileDialog.getOpenFileName(self, "Open workload", start, WORKLOAD_FILTER)
        if path:
            self.open_path(Path(path))

    def open_path(self, path: Path | str) -> bool:
        """Load a workload file and analyse it. A file that fails to load changes nothing."""
        path = Path(path)
        if not self._confirm_discard():
            return False
        try:
            workload = load_workload(path)
        except GemelError as exc:
            self.show_error(str(exc))
            return False
        self._analyse(_Change(workload, self.alignment, f"Opened {path.name}", opened=path.resolve(),
                              modified=False))
        return True

    def reanalyse(self) -> None:
        if self.workload is not None:
            self._analyse(_Change(self.workload, self.alignment, "Analysed again",
                                  modified=self.isWindowModified()))

    def set_alignment(self, alignment: str) -> None:
        base = self._base()
        if base is None or alignment == self.alignment and self._change is None:
            self.alignment = alignment
            return
        self._analyse(_Change(base, alignment, f"Aligned {alignment}", modified=self.isWindowModified()))

    def _current_models(self) -> list[dict]:
        base = self._base()
        return workload_to_dict(base)["models"] if base is not None else []

    def add_model_dialog(self, checkpoint: Path | None = None) -> AddModelDialog:
        """Open the add-model dialog (window-modal, returns at once); accepting it adds the model."""
        taken = {m["name"] for m in self._current_models()}
        dialog = AddModelDialog(taken, self, checkpoint=checkpoint)
        dialog.accepted.connect(lambda: self.add_models([dialog.spec()]))
        dialog.finished.connect(lambda _result: self._dialog_closed(dialog))
        self._dialog = dialog
        dialog.open()
        return dialog

    def _dialog_closed(self, dialog: AddModelDialog) -> None:
        if self._dialog is dialog:
            self._dialog = None
        dialog.deleteLater()
        if self._checkpoint_queue:
            self.add_model_dialog(self._checkpoint_queue.pop(0))

    def add_models(self, specs: list[ModelSpec]) -> bool:
        models = self._current_models()
        taken = {m["name"] for m in models}
        for spec in specs:
            spec = spec.model_copy(update={"name": unique_name(spec.name, taken)})
            taken.add(spec.name)
            models.append(spec.model_dump(mode="json", exclude_none=True))
        names = ", ".join(s.name for s in specs)
        return self._apply_models(models, f"Added {names}")

    def remove_model(self, name: str) -> bool:
        """Remove a model; Undo remove (Ctrl+Z) puts it back."""
        before = self._current_models()
        models = [m for m in before if m["name"] != name]
        if not self._apply_models(models, f"Removed {name} (Undo remove, Ctrl+Z, puts it back)"):
            return False
        self._removed = (name, before)
        self.undo_remove_action.setEnabled(True)
        self.undo_remove_action.setText(f"&Undo remove of {name}")
        return True

    def undo_remove(self) -> bool:
        if self._removed is None:
            return False
        name, before = self._removed
        self._removed = None
        self.undo_remove_action.setEnabled(False)
        self.undo_remove_action.setText("&Undo remove")
        return self._apply_models(before, f"Put back {name}")

    def _remove_selected(self) -> None:
        name = self.models_panel.selected_model()
        if name is not None:
            self.remove_model(name)

    def _show_model_memory(self, index) -> None:
        name = self.models_panel.selected_model()
        if name is not None:
            self.memory_panel.show_model(name)
            self.tabs.setCurrentWidget(self.memory_panel)

    def save(self) -> bool:
        """Save what the user sees last: an edit still being analysed included."""
        base = self._base()
        if base is None:
            return False
        if base.path is None:
            return self.save_as()
        return self._write(base.path)

    def save_as(self, path: Path | str | None = None) -> bool:
        base = self._base()
        if base is None:
            return False
        if path is None:
            start = str(base.path) if base.path else f"{base.name}.yaml"
            chosen, _ = QFileDialog.getSaveFileName(self, "Save workload as", start, WORKLOAD_FILTER)
            if not chosen:
                return False
            path = chosen
        return self._write(Path(path))

    def _write(self, path: Path) -> bool:
        base = self._base()
        if not base.models:
            self.show_error("a workload with no models cannot be saved (it could not be opened again); "
                            "add a model first")
            return False
        try:
            save_workload(base, path)
        except (OSError, GemelError) as exc:
            self.show_error(f"{path}: could not save ({exc})")
            return False
        if self._change is not None and self._change.workload is base:
            self._change.modified = False  # the pending edit is on disk now: its commit must not mark it unsaved
        settings.remember_file(path)
        self._fill_recent_menu()
        self.setWindowModified(False)
        self._update_title()
        self.statusBar().showMessage(f"Saved {path}", 10000)
        return True

    # --- drag and drop ----------------------------------------------------------------------

    @staticmethod
    def _paths(mime: QMimeData) -> list[Path]:
        return [Path(url.toLocalFile()) for url in mime.urls() if url.isLocalFile()]

    @staticmethod
    def _accepted(path: Path) -> bool:
        return path.suffix.lower() in WORKLOAD_SUFFIXES | CHECKPOINT_SUFFIXES | ONNX_SUFFIXES

    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if any(self._accepted(p) for p in self._paths(event.mimeData())):
            event.acceptProposedAction()
        else:
            event.ignore()

    def dragMoveEvent(self, event) -> None:
        event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        paths = self._paths(event.mimeData())
        if paths:
            event.acceptProposedAction()
            self.open_paths(paths)
        else:
            event.ignore()

    def open_paths(self, paths: list[Path]) -> None:
        """What a drop does: open a workload, or add ONNX models and checkpoints to this one."""
        paths = [Path(p).resolve() for p in paths]
        workloads = [p for p in paths if p.suffix.lower() in WORKLOAD_SUFFIXES]
        onnx = [p for p in paths if p.suffix.lower() in ONNX_SUFFIXES]
        checkpoints = [p for p in paths if p.suffix.lower() in CHECKPOINT_SUFFIXES]
        unknown = [p for p in paths if not self._accepted(p)]
        if unknown:
            self.show_error(f"{unknown[0].name}: not a workload (.yaml), checkpoint (.pt, .pth, .safetensors) "
                            "or ONNX (.onnx) file")
        if workloads:
            if len(workloads) > 1 or onnx or checkpoints:
                self.statusBar().showMessage(f"Opened {workloads[0].name} only: drop one workload at a time", 10000)
            self.open_path(workloads[0])
            return
        if onnx:
            self.add_models([ModelSpec(name=p.stem, source=OnnxSource(kind="onnx", path=p)) for p in onnx])
        if checkpoints:
            self._checkpoint_queue.extend(checkpoints[1:])
            self.add_model_dialog(checkpoints[0])

    # --- closing ----------------------------------------------------------------------------

    def quit_questions(self) -> list[str]:
        """One sentence for each task whose work quitting now would lose (a live preview or the
        monitor loses nothing: they just stop)."""
        out = [self.retraining_panel.quit_question(), self.finetune_panel.quit_question()]
        if self.export_panel.running:
            out.append("An export is running; quitting stops it and leaves the bundle unfinished.")
        return [q for q in out if q]

    def closeEvent(self, event: QCloseEvent) -> None:
        questions = self.quit_questions()
        if questions and not task.ask(self, "Quit while work runs?", " ".join(questions) + " Quit anyway?",
                                      yes="Quit", no="Keep working"):
            event.ignore()
            return
        if not self._confirm_discard():
            event.ignore()
            return
        self.stop_work()
        self._save_window_state()
        event.accept()
