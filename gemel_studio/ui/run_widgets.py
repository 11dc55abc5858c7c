"""Widgets over a run's snapshot (`Engine.snapshot()`, or the JSON a `gemel run --metrics-port`
serves), shared by the Live preview and the Monitor: the memory and drop gauges, the
per-stream and per-model tables, and a one-line state.

They read a `RunSnapshot` (runtime/telemetry.py); the JSON dict a monitor fetched over HTTP is
read through `RunSnapshot.from_dict`, so whether it came from an engine in this process or over
HTTP makes no difference. Each memory figure keeps its own name (runtime resident weights,
process RSS, torch allocated/reserved, device used): they are different memories and are
never summed or mixed.
"""

from __future__ import annotations

from typing import Callable

from PySide6.QtCore import QAbstractTableModel, QModelIndex, Qt
from PySide6.QtWidgets import (QAbstractItemView, QGridLayout, QHeaderView, QLabel, QProgressBar, QStyle,
                               QStyleOptionProgressBar, QStylePainter, QTableView, QVBoxLayout, QWidget)

from ..runtime.telemetry import ModelRow, RunSnapshot, StreamRow
from ..units import human_bytes
from .columns import MENU_HINT, column_menu

GAUGE_STEPS = 1000  # QProgressBar holds an int: gauges run over permille, not bytes


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def as_snapshot(snapshot: RunSnapshot | dict) -> RunSnapshot:
    """A snapshot, typed: an engine's as it is, a served JSON dict read with `from_dict`."""
    return snapshot if isinstance(snapshot, RunSnapshot) else RunSnapshot.from_dict(snapshot)


def dropped_totals(snapshot: RunSnapshot | dict) -> tuple[int, int, int, int]:
    """(frames in, dropped, of which late, of which refused) over every stream."""
    return as_snapshot(snapshot).dropped_totals()


def run_state_text(snapshot: RunSnapshot | dict) -> str:
    """'running, 12.3 s: policy merged, budget 256.0 MiB, device cpu, 1 CPU thread, bundle /x/b' (the
    threads once the run has said)."""
    s = as_snapshot(snapshot)
    budget = s.memory.budget_bytes
    budget_text = f"budget {human_bytes(budget)}" if budget is not None else "no budget"
    threads = "" if s.threads is None else f", {s.threads} CPU thread{'' if s.threads == 1 else 's'}"
    return (f"{s.state or '?'}, {s.elapsed_s:.1f} s: policy {s.policy}, {budget_text}, device {s.device}{threads}, "
            f"bundle {s.bundle}" + (f"; last model error: {s.last_error}" if s.last_error else ""))


class Gauge(QProgressBar):
    """A bar whose text says what it measures, in the longest of its texts that fits: `set_texts`
    takes them longest first; when even the last is too wide for the bar it is elided. The full
    text is always in the tooltip, under what the bar measures. `text()` is the full text."""

    TEXT_MARGIN = 8  # pixels kept clear of the bar's ends

    def __init__(self, tip: str, parent=None):
        super().__init__(parent)
        self.tip = tip
        self.texts: tuple[str, ...] = ("",)
        self.setRange(0, GAUGE_STEPS)
        self.setTextVisible(True)
        self.setToolTip(tip)
        self.setMinimumWidth(90)

    def set_texts(self, texts: tuple[str, ...]) -> None:
        self.texts = tuple(texts) or ("",)
        self.setFormat(self.texts[0])  # no %p/%v/%m in these texts: Qt would substitute them
        self.setToolTip(f"{self.texts[0]}\n\n{self.tip}" if self.texts[0] else self.tip)

    def text_room(self) -> int:
        """The width the bar's text may take, in pixels: the bar's inside, less a margin (the
        style's label rectangle is no help: it depends on the text it is given)."""
        return max(0, self.contentsRect().width() - self.TEXT_MARGIN)

    def shown_text(self) -> str:
        """What the bar shows now: its longest text that fits, else its shortest, elided."""
        metrics, room = self.fontMetrics(), self.text_room()
        for text in self.texts:
            if metrics.horizontalAdvance(text) <= room:
                return text
        return metrics.elidedText(self.texts[-1], Qt.TextElideMode.ElideRight, room)

    def paintEvent(self, event) -> None:
        # QProgressBar centres its text and clips it at both ends: draw the text that fits instead.
        painter = QStylePainter(self)
        option = QStyleOptionProgressBar()
        self.initStyleOption(option)
        option.text = self.shown_text()
        painter.drawControl(QStyle.ControlElement.CE_ProgressBar, option)


class RunGauges(QWidget):
    """Three gauges, each saying what it measures: the runtime's resident weights against the
    budget, GPU memory used against the device's total (when the snapshot has device figures),
    and the fraction of frames dropped; and a line with the process's own memory figures. A
    narrow bar shows a shorter text (`Gauge`); the whole one is in its tooltip."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.resident_bar = self._bar("Model weights the runtime holds resident, against the memory budget the "
                                      "scheduler keeps to (the runtime's own count, not the process's memory)")
        self.gpu_bar = self._bar("GPU memory in use on the whole device (pynvml), against its total: includes "
                                 "the CUDA context and other processes")
        self.drops_bar = self._bar("Frames dropped (late: deadline passed; refused: no model resident for them) "
                                   "out of every frame that arrived, all streams")
        self.resident_caption = QLabel("Resident weights / budget", self)
        self.gpu_caption = QLabel("GPU memory used / total", self)
        self.drops_caption = QLabel("Frames dropped", self)
        for caption in (self.resident_caption, self.gpu_caption, self.drops_caption):
            caption.setWordWrap(True)  # a narrow window wraps the captions instead of growing
        self.memory_label = QLabel("", self)
        self.memory_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.memory_label.setToolTip("Process RSS: all memory of the runtime's process (Python, torch, frames). "
                                     "torch allocated/reserved: the CUDA caching allocator's figures")
        grid = QGridLayout(self)
        grid.setContentsMargins(0, 0, 0, 0)
        grid.setHorizontalSpacing(12)
        grid.setVerticalSpacing(2)
        for column, (caption, bar) in enumerate(((self.resident_caption, self.resident_bar),
                                                 (self.gpu_caption, self.gpu_bar),
                                                 (self.drops_caption, self.drops_bar))):
            grid.addWidget(caption, 0, column)
            grid.addWidget(bar, 1, column)
            grid.setColumnStretch(column, 1)
        grid.addWidget(self.memory_label, 2, 0, 1, 3)
        self._shown: dict[int, tuple[int, tuple[str, ...], bool]] = {}  # per bar: what it shows now
        self.clear()

    def _bar(self, tip: str) -> Gauge:
        return Gauge(tip, self)

    def _set(self, bar: Gauge, fraction: float | None, *texts: str) -> None:
        """Show `fraction` and `texts` (longest first) on `bar`; a bar already showing them is
        left alone (a QProgressBar repaints at once when its value moves, on every refresh otherwise)."""
        shown = (0 if fraction is None else round(max(0.0, min(1.0, fraction)) * GAUGE_STEPS), texts,
                 fraction is not None)
        if self._shown.get(id(bar)) == shown:
            return
        self._shown[id(bar)] = shown
        bar.set_texts(texts)
        bar.setValue(shown[0])
        bar.setEnabled(shown[2])

    def clear(self) -> None:
        self._set(self.resident_bar, None, "no run")
        self._set(self.gpu_bar, None, "no run")
        self._set(self.drops_bar, None, "no run")
        self.memory_label.setText("")

    def show_snapshot(self, snapshot: RunSnapshot | dict) -> None:
        snapshot = as_snapshot(snapshot)
        mem = snapshot.memory
        resident, budget = mem.runtime_resident_bytes, mem.budget_bytes
        peak = mem.runtime_peak_resident_bytes
        if budget:
            share = f"({resident / budget:.0%})"
            self._set(self.resident_bar, resident / budget,
                      f"{human_bytes(resident)} of {human_bytes(budget)} budget {share}, peak {human_bytes(peak)}",
                      f"{human_bytes(resident)} of {human_bytes(budget)} {share}", f"{human_bytes(resident)} {share}")
        else:
            self._set(self.resident_bar, 0.0, f"{human_bytes(resident)} resident, no budget (unlimited)",
                      f"{human_bytes(resident)}, no budget", human_bytes(resident))
        used, total = mem.device_used_bytes, mem.device_total_bytes
        if used is not None and total:
            self._set(self.gpu_bar, used / total, f"{human_bytes(used)} of {human_bytes(total)} ({used / total:.0%})",
                      f"{human_bytes(used)} ({used / total:.0%})")
        elif mem.torch_allocated_bytes is not None:
            self._set(self.gpu_bar, None, "GPU: no device figures (pynvml missing)", "no device figures")
        else:
            self._set(self.gpu_bar, None, f"no GPU (device {snapshot.device})", "no GPU")
        frames_in, dropped, late, refused = snapshot.dropped_totals()
        if frames_in:
            share = f"({dropped / frames_in:.1%})"
            self._set(self.drops_bar, dropped / frames_in,
                      f"{dropped} of {frames_in} frames {share}: late {late}, refused {refused}",
                      f"{dropped} of {frames_in} frames {share}", f"{dropped} {share}")
        else:
            self._set(self.drops_bar, 0.0, "no frames yet")
        parts = [f"process RSS {human_bytes(mem.process_rss_bytes)}"]
        if mem.torch_allocated_bytes is not None:
            parts.append(f"torch allocated {human_bytes(mem.torch_allocated_bytes)}, reserved "
                         f"{human_bytes(mem.torch_reserved_bytes)}")
        self.memory_label.setText("; ".join(parts))


_DISPLAY, _TOOLTIP, _ALIGN = (int(r) for r in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.ToolTipRole,
                                                 Qt.ItemDataRole.TextAlignmentRole))
_RIGHT = int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)


class SnapshotTableModel(QAbstractTableModel):
    """Rows (a snapshot's rows, dicts, or any objects), one column per (header, text function).
    Rows are replaced in place when their number stays the same, so a selection survives the
    refreshes, and only the cells whose text changed are signalled (a view repaints, and
    measures, only those). With `ROW` set, dict rows (served JSON) are read into that row type.
    `TIPS`: a header's tooltip, saying what its column counts. `HIDDEN`: the columns a table
    (`snapshot_table`) hides until its header's menu shows them, so that it reads in a narrow window."""

    COLUMNS: tuple[tuple[str, Callable[[object], str]], ...] = ()
    ROW: type | None = None
    TEXT = frozenset({"Stream", "Models", "Model", "Ended"})  # left-aligned; the other columns are figures
    STRETCH: str | None = None  # the column that takes the spare width
    TIPS: dict[str, str] = {}
    HIDDEN: tuple[str, ...] = ()

    def __init__(self, parent=None):
        super().__init__(parent)
        self.rows: list = []
        self.cells: list[tuple[str, ...]] = []  # each row's texts, as shown (computed once per refresh)
        self._right = tuple(h not in self.TEXT for h, _ in self.COLUMNS)

    def set_rows(self, rows: list) -> None:
        if self.ROW is not None:
            rows = [r if isinstance(r, self.ROW) else self.ROW.from_dict(r) for r in rows]
        cells = [tuple(text(r) for _, text in self.COLUMNS) for r in rows]
        if len(rows) == len(self.rows) and rows:
            self.rows = list(rows)
            changed = [(i, j) for i, (new, old) in enumerate(zip(cells, self.cells))
                       for j, (a, b) in enumerate(zip(new, old)) if a != b]
            self.cells = cells
            if changed:  # one signal over the cells that changed (none: nothing to repaint)
                top, bottom = min(i for i, _ in changed), max(i for i, _ in changed)
                left, right = min(j for _, j in changed), max(j for _, j in changed)
                self.dataChanged.emit(self.index(top, left), self.index(bottom, right), [Qt.ItemDataRole.DisplayRole])
            return
        self.beginResetModel()
        self.rows, self.cells = list(rows), cells
        self.endResetModel()

    def text(self, row: int, header: str) -> str:
        """The cell under `header` in `row`, as shown."""
        headers = [h for h, _ in self.COLUMNS]
        return self.data(self.index(row, headers.index(header)))

    def rowCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.rows)

    def columnCount(self, parent=QModelIndex()) -> int:
        return 0 if parent.isValid() else len(self.COLUMNS)

    def data(self, index: QModelIndex, role=Qt.ItemDataRole.DisplayRole):
        # A view asks for a dozen roles per cell on every paint: answer from the texts made in set_rows.
        if role == _DISPLAY or role == _TOOLTIP:
            return self.cells[index.row()][index.column()] if index.isValid() else None
        if role == _ALIGN and index.isValid() and self._right[index.column()]:
            return _RIGHT
        return None

    def headerData(self, section: int, orientation, role=Qt.ItemDataRole.DisplayRole):
        if orientation == Qt.Orientation.Horizontal:
            if role == _DISPLAY:
                return self.COLUMNS[section][0]
            if role == _TOOLTIP:
                tip = self.TIPS.get(self.COLUMNS[section][0])
                if self.HIDDEN:
                    return f"{tip}\n{MENU_HINT}" if tip else MENU_HINT
                return tip
        return None


class StreamTableModel(SnapshotTableModel):
    """A snapshot's `streams`: what each stream's frames became (the counters `gemel run` prints).
    The headers are short, each explained by its tooltip; the drop causes and the source's rate
    are hidden by default (the drops gauge has the late and refused totals)."""

    ROW = StreamRow
    COLUMNS = (
        ("Stream", lambda s: s.name),
        ("Models", lambda s: ", ".join(s.models)),
        ("Source fps", lambda s: f"{s.fps:g}"),
        ("In", lambda s: str(s.frames_in)),
        ("Done", lambda s: str(s.processed)),
        ("Dropped", lambda s: str(s.dropped)),
        ("Late", lambda s: str(s.dropped_late)),
        ("Refused", lambda s: str(s.dropped_refused)),
        ("Errors", lambda s: str(s.dropped_error)),
        ("p50", lambda s: _ms(s.latency_p50_ms)),
        ("p99", lambda s: _ms(s.latency_p99_ms)),
        ("fps", lambda s: f"{s.throughput_fps:.1f}"),
        ("Ended", lambda s: s.end_reason or "-"),
    )
    STRETCH = "Ended"
    HIDDEN = ("Source fps", "Late", "Refused", "Errors")
    TIPS = {"Stream": "The stream's name",
            "Models": "The models that run on each of its frames",
            "Source fps": "The rate its source delivers frames at",
            "In": "Frames that arrived from the source",
            "Done": "Frames processed: every model of the stream ran on them",
            "Dropped": "Frames dropped: late, refused or failed",
            "Late": "Frames dropped because their deadline passed",
            "Refused": "Frames dropped because no model was resident for them",
            "Errors": "Frames dropped because a model failed on them",
            "p50": "Median latency, ms: from a frame's arrival to its last model's result",
            "p99": "99th-percentile latency, ms",
            "fps": "Frames processed per second, since the stream started",
            "Ended": "Why the stream ended ('-': it runs)"}


class ModelTableModel(SnapshotTableModel):
    """A snapshot's `models`: per model, its resident bytes, runs and what swapping it cost."""

    ROW = ModelRow
    COLUMNS = (
        ("Model", lambda m: m.name),
        ("Bytes", lambda m: human_bytes(m.bytes)),
        ("Runs", lambda m: str(m.runs)),
        ("Mean batch", lambda m: "-" if m.mean_batch_size is None else f"{m.mean_batch_size:.2f}"),
        ("Max batch", lambda m: "-" if m.max_batch is None else str(m.max_batch)),
        ("Swaps", lambda m: str(m.swaps)),
        ("Load s", lambda m: f"{m.load_seconds:.3f}"),
        ("Waited s", lambda m: f"{m.load_wait_seconds:.3f}"),
        ("Loaded", lambda m: human_bytes(m.loaded_bytes)),
        ("Infer ms", lambda m: _ms(m.mean_infer_ms)),
        ("Refused", lambda m: str(m.refused)),
        ("Loading", lambda m: m.load),
    )
    HIDDEN = ("Max batch", "Load s", "Waited s", "Loaded")
    TIPS = {"Model": "The model's name",
            "Bytes": "Its weights' size, as the runtime counts them resident",
            "Runs": "Frames the model ran on (a batch of several frames counts each)",
            "Mean batch": "Frames per batch, on average: frames of the streams that use the model that wait "
                          "together go through it as one batch",
            "Max batch": "The largest batch the start's profile found within the streams' deadlines; "
                         "the run never batches more frames than this",
            "Swaps": "Loads of the model's weights into memory",
            "Load s": "Seconds spent loading its weights, in all",
            "Waited s": "Seconds frames waited for its weights to load, in all",
            "Loaded": "Bytes of weights loaded for it, in all its swaps",
            "Infer ms": "Mean milliseconds of compute per frame it ran (a batch's time shared among its frames)",
            "Refused": "Frames refused because it was not resident",
            "Loading": "How its weights load: whole, or layer by layer"}

    def set_models(self, models: dict[str, ModelRow | dict]) -> None:
        self.set_rows([row if isinstance(row, ModelRow) else ModelRow.from_dict(row, name)
                       for name, row in models.items()])


def snapshot_table(model: QAbstractTableModel, parent: QWidget) -> QTableView:
    """A read-only table: rows selectable, columns as wide as their contents. The widths are
    fitted when the rows change; while figures tick, a column only widens when a changed cell
    no longer fits (measured by its text), never refitted: a header in ResizeToContents mode,
    or a refit per refresh, measures every cell each time and was the preview's largest stall
    (benchmarks/ui_probe.py). A model with `HIDDEN` columns gets the header's column menu
    (columns.column_menu); what it hides is kept per model type, the same in every tab.
    `view.columns_menu` builds that menu (None without one)."""
    view = QTableView(parent)
    view.setModel(model)
    view.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
    view.setAlternatingRowColors(True)
    view.setWordWrap(False)
    view.verticalHeader().setVisible(False)
    view.verticalHeader().setDefaultSectionSize(24)
    header = view.horizontalHeader()
    header.setSectionResizeMode(QHeaderView.ResizeMode.Interactive)
    header.setStretchLastSection(False)
    stretch = getattr(model, "STRETCH", None)
    stretched = [h for h, _ in model.COLUMNS].index(stretch) if stretch is not None else -1
    if stretched >= 0:
        header.setSectionResizeMode(stretched, QHeaderView.ResizeMode.Stretch)
    hidden = getattr(model, "HIDDEN", ())
    view.columns_menu = (column_menu(view, tuple(h for h, _ in model.COLUMNS), hidden,
                                     f"run_tables/{type(model).__name__}_hidden_columns") if hidden else None)
    padding = [16]  # a cell's width beyond its text (the delegate's margins), measured at each fit

    def fit() -> None:
        view.ensurePolished()  # the theme's font: a table in a tab never shown has not taken it yet
        view.resizeColumnsToContents()
        cells = getattr(model, "cells", None)
        if cells:
            metrics = view.fontMetrics()
            padding[0] = max(view.sizeHintForIndex(model.index(0, c)).width() - metrics.horizontalAdvance(cells[0][c])
                             for c in range(model.columnCount()))

    def widen(top_left: QModelIndex, bottom_right: QModelIndex, roles=()) -> None:
        cells = getattr(model, "cells", None)
        if cells is None:  # a model without texts of its own: ask the view
            return view.resizeColumnsToContents()
        metrics = view.fontMetrics()
        for c in range(top_left.column(), bottom_right.column() + 1):
            if c == stretched or header.isSectionHidden(c):  # a column shown again is fitted then
                continue
            need = padding[0] + max(metrics.horizontalAdvance(cells[r][c])
                                    for r in range(top_left.row(), bottom_right.row() + 1))
            if need > header.sectionSize(c):
                header.resizeSection(c, need)

    model.modelReset.connect(fit)
    model.dataChanged.connect(widen)
    fit()
    return view


def titled(parent: QWidget, title: str, *widgets: QWidget) -> QWidget:
    """A bold title over widgets (the look of the other panels' sections)."""
    box = QWidget(parent)
    layout = QVBoxLayout(box)
    layout.setContentsMargins(0, 0, 0, 0)
    label = QLabel(title, box)
    label.setObjectName("panelTitle")
    layout.addWidget(label)
    for w in widgets:
        layout.addWidget(w, 1 if isinstance(w, QTableView) else 0)
    return box


__all__ = ["Gauge", "ModelTableModel", "RunGauges", "SnapshotTableModel", "StreamTableModel", "as_snapshot", "dropped_totals",
           "run_state_text", "snapshot_table", "titled"]
