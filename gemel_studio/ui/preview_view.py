"""The Live preview tab: a bundle's models on live streams under a memory budget, watched as
they run.

It runs the edge runtime exactly as `gemel run` does: `load_bundle` (which verifies every
checksum), an `Engine` over the chosen streams, policy, budget and device, and
`engine.run(progress=...)` in a `Worker` until Stop cancels it; the bundle is closed when the
run ends. The form's settings are one `RunOptions` (the options `gemel run` takes, validated the
same way). A timer on the GUI thread reads `engine.snapshot()` (a `RunSnapshot`: the counters
the metrics endpoint serves) and `engine.latest` (each stream's last frame processed in time
and what its models said) a few times a second; nothing here touches the run's thread.

The run has its own thread pool, so a long preview never holds a thread that an analysis or a
merge is waiting for.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from PySide6.QtCore import QPointF, QRectF, QThreadPool, Qt, QTimer, Signal
from PySide6.QtGui import QColor, QImage, QPainter, QPen
from PySide6.QtWidgets import (QCheckBox, QComboBox, QDoubleSpinBox, QFormLayout, QFrame, QGridLayout,
                               QHBoxLayout, QLabel, QLineEdit, QListWidget, QListWidgetItem, QPushButton, QScrollArea,
                               QSizePolicy, QSpinBox, QSplitter, QVBoxLayout, QWidget)

from ..units import human_bytes
from ..errors import GemelError
from ..runtime.bundle import BundleManifest, peek_manifest
from ..runtime.options import RunOptions, choices
from ..runtime.sources import StreamSpec
from ..runtime.telemetry import RunSnapshot, RunSummary, StreamRow
from . import settings
from .run_widgets import ModelTableModel, RunGauges, StreamTableModel, run_state_text, snapshot_table, titled
from .settings import PALETTES
from .task import TaskMixin
from .worker import Worker

MIB = 1024 * 1024
SYNTHETIC_SIZE = (64, 64)  # height, width: what `gemel run --stream synthetic:FPS` generates
REFRESH_MS = 125  # the preview redraws its frames at 8 Hz, whatever the streams' frame rates
FIGURES_EVERY = 4  # and its tables, gauges and state line every 4th time (2 Hz): figures to read, not to flicker
BUNDLE_FILTER = "Bundle archives (*.tar *.tar.gz *.tgz);;All files (*)"
VIDEO_FILTER = "Videos (*.mp4 *.avi *.mkv *.mov *.webm);;All files (*)"


@dataclass
class StreamChoice:
    """A stream as the user set it up: its source and the models its frames go through
    (empty: every model of the bundle, as `gemel run --stream SOURCE` without `=MODELS`)."""

    kind: str  # 'synthetic' or 'video'
    fps: float = 10.0  # synthetic: its rate; a video file: the rate it says it has (read when added)
    path: Path | None = None
    loop: bool = False
    models: list[str] = field(default_factory=list)

    def describe(self) -> str:
        rate = f", {self.fps:g} fps" if self.kind == "synthetic" or self.path.is_file() else ""
        source = f"synthetic{rate}" if self.kind == "synthetic" else \
            f"{self.path.name}{'/' if self.path.is_dir() else ''}{rate}{' (loop)' if self.loop else ''}"
        return f"{source} → {', '.join(self.models) if self.models else 'all models'}"

    def spec(self) -> StreamSpec:
        """The stream as `gemel run --stream` names it (a video file, a folder of images or an
        image sequence such as frames/%04d.png are told apart as the command does)."""
        source = f"synthetic:{self.fps!r}" if self.kind == "synthetic" else str(self.path)
        return StreamSpec(source, tuple(self.models))

    def source(self, seed: int):
        """A fresh frame source (a source runs once)."""
        return self.spec().open(loop=self.loop, seed=seed, size=SYNTHETIC_SIZE)


def frame_image(frame: torch.Tensor) -> QImage:
    """A CHW RGB (or grey) frame in [0, 1] as an RGB888 QImage that owns its pixels."""
    t = frame.detach().to("cpu", torch.float32).clamp(0, 1)
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    pixels = (t[:3] * 255).round().to(torch.uint8).permute(1, 2, 0).contiguous().numpy()
    h, w, _ = pixels.shape
    return QImage(pixels.tobytes(), w, h, 3 * w, QImage.Format.Format_RGB888).copy()


@dataclass
class DeviceBudget:
    """The memory budget a run read from its device as it started (no budget set)."""

    bytes: int
    where: str  # what was read: 'free GPU memory on cuda:0', 'available memory'


@dataclass
class Detections:
    """One detector's boxes on a frame, in the model's colour."""

    model: str
    color: str
    boxes: list[list[float]]  # x1, y1, x2, y2 as fractions of the frame
    labels: list[str]
    scores: list[float]


class FrameView(QWidget):
    """A frame scaled to fit (nearest neighbour: a 64x64 frame is shown as its pixels, not a
    blur), with detection boxes drawn over it."""

    def __init__(self, parent=None):
        super().__init__(parent)
        self.image: QImage | None = None
        self.detections: list[Detections] = []
        self.placeholder = "no frame processed yet"
        self.background = QColor("#111214")
        self.foreground = QColor("#a0a4ab")
        self.setMinimumSize(160, 120)
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)

    @property
    def has_frame(self) -> bool:
        return self.image is not None

    def set_frame(self, image: QImage | None, detections: list[Detections]) -> None:
        self.image, self.detections = image, detections
        self.update()

    def image_rect(self) -> QRectF:
        """Where the frame is drawn: as large as fits, aspect kept, centred."""
        if self.image is None:
            return QRectF()
        iw, ih = self.image.width(), self.image.height()
        scale = min(self.width() / iw, self.height() / ih)
        w, h = iw * scale, ih * scale
        return QRectF((self.width() - w) / 2, (self.height() - h) / 2, w, h)

    def paintEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        p = QPainter(self)
        p.fillRect(self.rect(), self.background)
        if self.image is None:
            p.setPen(self.foreground)
            p.drawText(self.rect(), Qt.AlignmentFlag.AlignCenter, self.placeholder)
            return
        target = self.image_rect()
        p.drawImage(target, self.image)
        for det in self.detections:
            pen = QPen(QColor(det.color), 2)
            p.setPen(pen)
            for (x1, y1, x2, y2), label, score in zip(det.boxes, det.labels, det.scores):
                box = QRectF(target.x() + x1 * target.width(), target.y() + y1 * target.height(),
                             (x2 - x1) * target.width(), (y2 - y1) * target.height())
                p.drawRect(box)
                baseline = max(box.top() - 3, target.top() + p.fontMetrics().ascent())  # inside the frame
                p.drawText(QPointF(box.left() + 2, baseline), f"{det.model}: {label} {score:.2f}")


def output_text(model: str, output: dict | None) -> str:
    """One line for what a model said about the last frame."""
    if output is None:
        return f"{model}: -"
    if output["task"] == "detection":
        if not output["boxes"]:
            return f"{model}: no box"
        best = ", ".join(f"{lab} {s:.2f}" for lab, s in zip(output["labels"][:3], output["scores"][:3]))
        n = len(output["boxes"])
        return f"{model}: {n} {'box' if n == 1 else 'boxes'} ({best})"
    return f"{model}: {output['label']} ({output['score']:.2f})"


class StreamTile(QFrame):
    """One stream: its last processed frame with what each model said, its rate and drops."""

    def __init__(self, name: str, models: list[str], parent=None):
        super().__init__(parent)
        self.setObjectName("streamTile")
        self.setFrameShape(QFrame.Shape.StyledPanel)
        self.name, self.models = name, models
        self.timestamp: float | None = None
        shown = Path(name).name if "/" in name or "\\" in name else name  # a video: its file name
        self.title = QLabel(f"{shown} → {', '.join(models)}", self)
        self.title.setObjectName("panelTitle")
        self.title.setToolTip(name)
        self.frame_view = FrameView(self)
        self.outputs_label = QLabel("", self)
        self.outputs_label.setWordWrap(True)
        self.stats_label = QLabel("", self)
        self.stats_label.setWordWrap(True)
        self.ended_label = QLabel("", self)
        self.ended_label.setWordWrap(True)
        self.ended_label.hide()
        layout = QVBoxLayout(self)
        layout.setContentsMargins(6, 4, 6, 6)
        layout.setSpacing(3)
        layout.addWidget(self.title)
        layout.addWidget(self.frame_view, 1)
        layout.addWidget(self.outputs_label)
        layout.addWidget(self.stats_label)
        layout.addWidget(self.ended_label)

    def set_colors(self, colors: dict) -> None:
        self.frame_view.background = QColor(colors["background"]).darker(130)
        self.frame_view.foreground = QColor(colors["axis"])
        self.ended_label.setStyleSheet(f"color: {colors['bound']};")
        self.frame_view.update()

    def show_state(self, stats: StreamRow, latest: dict | None, model_colors: dict[str, str],
                   figures: bool = True) -> None:
        """Counters from the snapshot's stream row (when `figures`: they are redrawn less often
        than the frames); the frame from `engine.latest` (None before the first frame processed
        in time)."""
        if latest is not None and latest["timestamp"] != self.timestamp:
            self.timestamp = latest["timestamp"]
            outputs = latest["outputs"]
            detections = [Detections(m, model_colors.get(m, "#e8d44d"), o["boxes"], o["labels"], o["scores"])
                          for m, o in outputs.items() if o["task"] == "detection"]
            self.frame_view.set_frame(frame_image(latest["frame"]), detections)
            self.outputs_label.setText("\n".join(output_text(m, outputs.get(m)) for m in self.models))
        elif latest is None and not self.outputs_label.text():
            self.outputs_label.setText("\n".join(output_text(m, None) for m in self.models))
        if not figures:
            return
        frames_in, dropped = stats.frames_in, stats.dropped
        drop = f"{dropped / frames_in:.1%} dropped ({dropped}/{frames_in})" if frames_in else "no frames yet"
        self.stats_label.setText(f"{stats.throughput_fps:.1f} of {stats.fps:g} fps processed · {drop}")
        if stats.end_reason:
            self.ended_label.setText(f"ended: {stats.end_reason}")
            self.ended_label.show()


class PreviewPanel(TaskMixin, QWidget):
    sigWorkerStarted = Signal(object)  # the run's Worker as it starts
    sigRunEnded = Signal(object)  # the last RunSnapshot of a run that got as far as running
    sigError = Signal(str)

    def __init__(self, parent=None):
        super().__init__(parent)
        self.manifest: BundleManifest | None = None
        self.streams: list[StreamChoice] = []
        self.engine = None  # the running (or last) Engine, once the worker has made it
        self.tiles: list[StreamTile] = []
        self.last_snapshot: RunSnapshot | None = None
        self.refreshes = 0  # redraws since the run's engine came (every FIGURES_EVERY-th redraws the figures)
        self.colors = PALETTES["dark"]
        self._pool = QThreadPool(self)  # the run holds a thread for as long as it runs
        self._pool.setMaxThreadCount(1)
        self._timer = QTimer(self)
        self._timer.setInterval(REFRESH_MS)
        self._timer.timeout.connect(self.refresh)

        # bundle
        self.bundle_edit = QLineEdit(self)
        self.bundle_edit.setPlaceholderText("a folder or .tar written by `gemel export`")
        self.bundle_edit.editingFinished.connect(lambda: self.set_bundle_path(self.bundle_edit.text()))
        self.folder_button = QPushButton("Folder…", self)
        self.folder_button.clicked.connect(self.choose_bundle_folder)
        self.archive_button = QPushButton("Archive…", self)
        self.archive_button.clicked.connect(self.choose_bundle_archive)
        bundle_row = QHBoxLayout()
        bundle_row.addWidget(self.folder_button)
        bundle_row.addWidget(self.archive_button)
        self.bundle_label = QLabel("No bundle", self)
        self.bundle_label.setWordWrap(True)

        # streams
        self.streams_list = QListWidget(self)
        self.streams_list.currentRowChanged.connect(self._show_stream_models)
        self.streams_list.setMinimumHeight(70)
        self.fps_spin = QDoubleSpinBox(self)
        self.fps_spin.setRange(0.5, 240.0)
        self.fps_spin.setDecimals(1)
        self.fps_spin.setValue(10.0)
        self.fps_spin.setSuffix(" fps")
        self.fps_spin.setToolTip("Frame rate of a new synthetic stream (a moving square over noise, "
                                 f"{SYNTHETIC_SIZE[1]}x{SYNTHETIC_SIZE[0]})")
        self.add_synthetic_button = QPushButton("Add synthetic", self)
        self.add_synthetic_button.clicked.connect(lambda: self.add_synthetic_stream(self.fps_spin.value()))
        self.add_video_button = QPushButton("Add video…", self)
        self.add_video_button.clicked.connect(self.choose_video)
        self.add_images_button = QPushButton("Add images…", self)
        self.add_images_button.setToolTip("A folder of still images, played in name order at 30 fps")
        self.add_images_button.clicked.connect(self.choose_image_folder)
        self.loop_check = QCheckBox("Loop", self)
        self.loop_check.setToolTip("Start the selected video or images stream over at its end (and new ones)")
        self.loop_check.toggled.connect(self._loop_toggled)
        self.remove_button = QPushButton("Remove", self)
        self.remove_button.clicked.connect(self.remove_selected_stream)
        synthetic_row = QHBoxLayout()
        synthetic_row.addWidget(self.fps_spin, 1)
        synthetic_row.addWidget(self.add_synthetic_button)
        video_row = QHBoxLayout()
        video_row.addWidget(self.add_video_button)
        video_row.addWidget(self.add_images_button)
        video_row.addWidget(self.loop_check)
        video_row.addStretch(1)
        video_row.addWidget(self.remove_button)
        self.models_list = QListWidget(self)
        self.models_list.setToolTip("The models the selected stream's frames go through")
        self.models_list.itemChanged.connect(self._stream_models_edited)
        self.models_list.setMinimumHeight(70)

        # run settings
        self.policy_combo = QComboBox(self)
        self.policy_combo.addItems(choices("policy"))
        self.policy_combo.setToolTip("merged: shared layers resident once · time-sharing: whole models swapped "
                                     "(the usual baseline) · space-sharing: the models that fit stay, frames for "
                                     "the others are dropped · unlimited: everything resident, no budget")
        self.policy_combo.currentTextChanged.connect(lambda _: self._update_enabled())
        self.budget_spin = QSpinBox(self)
        self.budget_spin.setRange(1, 10_000_000)
        self.budget_spin.setValue(256)
        self.budget_spin.setSuffix(" MiB")
        self.budget_spin.setToolTip("Model weights the runtime may hold resident (--memory-budget)")
        self.device_budget_check = QCheckBox("What the device can hold", self)
        self.device_budget_check.setToolTip(
            "The budget `gemel run` takes without --memory-budget: what the device can hold when the run starts "
            "(free GPU memory on CUDA, the system's available memory on a CPU). Uncheck to set one")
        self.device_budget_check.setChecked(True)
        self.device_budget_check.toggled.connect(lambda _: self.show_device_budget())
        self.budget_note = QLabel("", self)  # how the budget is chosen
        self.budget_note.setWordWrap(True)
        self.device_combo = QComboBox(self)
        self.device_combo.addItems(["auto", "cpu"] + (["cuda"] if torch.cuda.is_available() else []))
        self.device_combo.setToolTip("auto: the GPU when there is one, else the CPU")
        self.device_combo.currentTextChanged.connect(lambda _: self.show_device_budget())
        self.backend_combo = QComboBox(self)
        self.backend_combo.addItems(choices("backend"))
        self.backend_combo.setToolTip("torch, or onnxruntime (CPU) on the bundle's ONNX graphs")
        self.backend_combo.currentTextChanged.connect(lambda _: self._update_enabled())
        self.backend_combo.currentTextChanged.connect(lambda _: self.show_device_budget())  # onnxruntime: the CPU's
        self.load_combo = QComboBox(self)
        self.load_combo.addItems(choices("load"))
        self.load_combo.setToolTip("whole: a model's missing weights load before it runs · layered (MemA): each "
                                   "layer's weights load while the layers before it run (torch backend)")
        self.threads_spin = QSpinBox(self)
        self.threads_spin.setRange(0, max(1, os.cpu_count() or 1))
        self.threads_spin.setSpecialValueText("one per core")  # 0: torch's and onnxruntime's own
        self.threads_spin.setValue(0)
        self.threads_spin.setToolTip("CPU threads one inference may use (--threads). One per core is torch's own "
                                     "default; 1 leaves the other cores to the studio and other work on a shared box")
        form = QFormLayout()
        form.addRow("Policy", self.policy_combo)
        form.addRow("Memory budget", self.budget_spin)
        form.addRow("", self.device_budget_check)
        form.addRow("", self.budget_note)
        form.addRow("Device", self.device_combo)
        form.addRow("Backend", self.backend_combo)
        form.addRow("Loading", self.load_combo)
        form.addRow("CPU threads", self.threads_spin)

        self.start_button = QPushButton("Start", self)
        self.start_button.setToolTip("Load and verify the bundle, then run the streams until Stop")
        self.start_button.clicked.connect(self.start)
        self.stop_button = QPushButton("Stop", self)
        self.stop_button.clicked.connect(self.stop)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.stop_button)
        self.status_label = QLabel("", self)
        self.init_task(self.status_label)
        self.status_label.setWordWrap(True)
        self.status_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)

        left = QWidget(self)
        left_layout = QVBoxLayout(left)
        left_layout.setContentsMargins(0, 0, 6, 0)
        title = QLabel("Live preview", left)
        title.setObjectName("panelTitle")
        left_layout.addWidget(title)
        left_layout.addWidget(QLabel("Bundle", left))
        left_layout.addWidget(self.bundle_edit)
        left_layout.addLayout(bundle_row)
        left_layout.addWidget(self.bundle_label)
        left_layout.addWidget(titled(left, "Streams"))
        left_layout.addWidget(self.streams_list, 1)
        left_layout.addLayout(synthetic_row)
        left_layout.addLayout(video_row)
        left_layout.addWidget(QLabel("Models of the selected stream", left))
        left_layout.addWidget(self.models_list, 1)
        left_layout.addLayout(form)
        left_layout.addLayout(buttons)
        left_layout.addWidget(self.status_label)
        # The settings scroll rather than hold the window taller than the other tabs need.
        self.settings_scroll = settings_scroll = QScrollArea(self)
        settings_scroll.setWidgetResizable(True)
        settings_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        settings_scroll.setWidget(left)
        self._fit_settings()
        for lst in (self.streams_list, self.models_list):  # they share the spare height, and scroll
            lst.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Ignored)

        # the run
        self.state_label = QLabel("Not running", self)
        self.state_label.setWordWrap(True)
        self.gauges = RunGauges(self)
        self.tiles_widget = QWidget(self)
        self.tiles_grid = QGridLayout(self.tiles_widget)
        self.tiles_grid.setContentsMargins(0, 0, 0, 0)
        self.tiles_grid.setSpacing(6)
        self.tiles_hint = QLabel("Choose a bundle, add streams and press Start", self.tiles_widget)
        self.tiles_hint.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.tiles_grid.addWidget(self.tiles_hint, 0, 0)
        self.tiles_scroll = scroll = QScrollArea(self)
        scroll.setWidgetResizable(True)
        scroll.setWidget(self.tiles_widget)
        self.stream_model = StreamTableModel(self)
        self.stream_view = snapshot_table(self.stream_model, self)
        self.model_model = ModelTableModel(self)
        self.model_view = snapshot_table(self.model_model, self)
        right = QSplitter(Qt.Orientation.Vertical, self)
        right.addWidget(scroll)
        right.addWidget(titled(self, "Streams", self.stream_view))
        right.addWidget(titled(self, "Models (swaps: loads of a model's weights)", self.model_view))
        right.setStretchFactor(0, 1)
        right.setSizes([470, 150, 150])
        right_box = QWidget(self)
        right_layout = QVBoxLayout(right_box)
        right_layout.setContentsMargins(0, 0, 0, 0)
        right_layout.addWidget(self.state_label)
        right_layout.addWidget(self.gauges)
        right_layout.addWidget(right, 1)

        layout = QHBoxLayout(self)
        layout.addWidget(settings_scroll)
        layout.addWidget(right_box, 1)
        self._update_enabled()  # the device's budget is read when the tab is first shown

    # --- settings ---------------------------------------------------------------------------

    def set_bundle_path(self, path: Path | str) -> bool:
        """Read the bundle's manifest (its models); the whole bundle is verified on Start."""
        text = str(path).strip()
        self.bundle_edit.setText(text)
        self.bundle_edit.setToolTip(text)
        if not text:
            self.manifest = None
            self.bundle_label.setText("No bundle")
            self._update_enabled()
            return False
        try:
            manifest = peek_manifest(Path(text).expanduser())
        except GemelError as exc:
            self.manifest = None
            self.bundle_label.setText("No bundle")
            self._fail(str(exc))
            self._update_enabled()
            return False
        self.manifest = manifest
        names = [m.name for m in manifest.models]
        weights = manifest.files.get(manifest.weights)
        stored = f"; weights file {human_bytes(weights.bytes)} (each shared tensor once)" if weights else ""
        self.bundle_label.setText(f"{manifest.workload}: {len(names)} models ({', '.join(names)}){stored}")
        for choice in self.streams:  # keep what still exists in this bundle
            choice.models = [m for m in choice.models if m in names]
        self._refill_streams(self.streams_list.currentRow())
        self.status_label.setText("")
        self._update_enabled()
        return True

    def bundle_path(self) -> Path:
        return Path(self.bundle_edit.text().strip()).expanduser()

    def model_names(self) -> list[str]:
        return [m.name for m in self.manifest.models] if self.manifest is not None else []

    def choose_bundle_folder(self) -> None:
        chosen = settings.ask_existing(self, "preview/folder", "Bundle folder (written by gemel export)")
        if chosen:
            self.set_bundle_path(chosen)

    def choose_bundle_archive(self) -> None:
        chosen = settings.ask_existing(self, "preview/folder", "Bundle archive (gemel export --archive)",
                                       BUNDLE_FILTER)
        if chosen:
            self.set_bundle_path(chosen)

    def add_synthetic_stream(self, fps: float, models: list[str] | None = None) -> StreamChoice:
        return self._add_stream(StreamChoice("synthetic", fps=float(fps), models=list(models or [])))

    def add_video_stream(self, path: Path | str, loop: bool = False,
                         models: list[str] | None = None) -> StreamChoice | None:
        """A video file, a folder of images or an image sequence. A file OpenCV cannot open as a
        video is refused here, in one line, rather than listed until Start finds out."""
        path = Path(path)
        choice = StreamChoice("video", path=path, loop=loop, models=list(models or []))
        if path.is_file():
            from ..runtime.sources import VideoSource

            probe = VideoSource(path, realtime=False)
            problem = probe._open()
            if probe._cap is not None:
                probe._cap.release()
            if problem:
                self.sigError.emit(f"{path}: not a video OpenCV can open; add a video file, a folder of images "
                                   f"or an image sequence such as frames/%04d.png")
                return None
            choice.fps = probe.fps
        return self._add_stream(choice)

    def set_stream_loop(self, row: int, loop: bool) -> None:
        """Loop stream `row` (a video or images) at its end; the Loop box shows the selected stream's."""
        if 0 <= row < len(self.streams) and self.streams[row].kind != "synthetic":
            self.streams[row].loop = bool(loop)
            self.streams_list.item(row).setText(f"{row + 1}. {self.streams[row].describe()}")

    def _loop_toggled(self, checked: bool) -> None:
        self.set_stream_loop(self.streams_list.currentRow(), checked)

    def choose_video(self) -> None:
        chosen = settings.ask_existing(self, "preview/videos", "Video file", VIDEO_FILTER)
        if chosen:
            self.add_video_stream(chosen, loop=self.loop_check.isChecked())

    def choose_image_folder(self) -> None:
        chosen = settings.ask_existing(self, "preview/images", "Folder of images")
        if chosen:
            self.add_video_stream(chosen, loop=self.loop_check.isChecked())

    def _add_stream(self, choice: StreamChoice) -> StreamChoice:
        self.streams.append(choice)
        self._refill_streams(len(self.streams) - 1)
        self._update_enabled()
        return choice

    def remove_selected_stream(self) -> None:
        row = self.streams_list.currentRow()
        if 0 <= row < len(self.streams):
            del self.streams[row]
            self._refill_streams(min(row, len(self.streams) - 1))
            self._update_enabled()

    def set_stream_models(self, row: int, models: list[str]) -> None:
        """The models stream `row`'s frames go through (empty: all of the bundle's)."""
        self.streams[row].models = list(models)
        self._refill_streams(row)

    def _refill_streams(self, current: int) -> None:
        self.streams_list.blockSignals(True)
        self.streams_list.clear()
        for i, choice in enumerate(self.streams):
            item = QListWidgetItem(f"{i + 1}. {choice.describe()}")
            item.setToolTip(str(choice.path) if choice.path else f"synthetic frames at {choice.fps:g} fps")
            self.streams_list.addItem(item)
        self.streams_list.blockSignals(False)
        if 0 <= current < len(self.streams):
            self.streams_list.setCurrentRow(current)
        self._show_stream_models(self.streams_list.currentRow())

    def _show_stream_models(self, row: int) -> None:
        if 0 <= row < len(self.streams) and self.streams[row].kind != "synthetic":
            self.loop_check.blockSignals(True)
            self.loop_check.setChecked(self.streams[row].loop)
            self.loop_check.blockSignals(False)
        self.models_list.blockSignals(True)
        self.models_list.clear()
        if 0 <= row < len(self.streams):
            chosen = self.streams[row].models
            for name in self.model_names():
                item = QListWidgetItem(name)
                item.setFlags(item.flags() | Qt.ItemFlag.ItemIsUserCheckable)
                item.setCheckState(Qt.CheckState.Checked if not chosen or name in chosen else Qt.CheckState.Unchecked)
                self.models_list.addItem(item)
        self.models_list.blockSignals(False)

    def _stream_models_edited(self, item: QListWidgetItem) -> None:
        row = self.streams_list.currentRow()
        if not 0 <= row < len(self.streams):
            return
        items = [self.models_list.item(i) for i in range(self.models_list.count())]
        checked = [i.text() for i in items if i.checkState() == Qt.CheckState.Checked]
        if not checked:  # an empty list means every model to the engine: never let it get there
            self.models_list.blockSignals(True)
            item.setCheckState(Qt.CheckState.Checked)
            self.models_list.blockSignals(False)
            self.status_label.setText("A stream needs at least one model")
            return
        self.streams[row].models = [] if len(checked) == len(items) else checked
        self.streams_list.item(row).setText(f"{row + 1}. {self.streams[row].describe()}")

    @property
    def uses_device_budget(self) -> bool:
        """The budget is the device's, read when the run starts (as `gemel run` without
        --memory-budget)."""
        return self.device_budget_check.isChecked() and self.policy_combo.currentText() != "unlimited"

    def budget_bytes(self) -> int | None:
        """The budget set here; None for no budget (unlimited) or the device's (read at Start)."""
        if self.policy_combo.currentText() == "unlimited" or self.uses_device_budget:
            return None
        return self.budget_spin.value() * MIB

    def budget_device(self):
        """The device the memory budget is about (onnxruntime's 'auto' is the CPU), resolved."""
        from ..devices import resolve_device

        options = RunOptions(device=self.device_combo.currentText(), backend=self.backend_combo.currentText())
        return resolve_device(options.budget_device)

    def show_device_budget(self) -> None:
        """With the device's budget chosen, fill the budget field with what the device can hold
        now and say how that was read. A GPU that this process has not touched yet is read at
        Start, on the run's thread (reading it here would make a CUDA context on the GUI thread)."""
        if not self.device_budget_check.isChecked():
            self.budget_note.setText("Set here (--memory-budget)")
            self._update_enabled()
            return
        from ..runtime.telemetry import device_capacity

        try:
            device = self.budget_device()
        except GemelError as exc:
            self.budget_note.setText(str(exc))
            return
        if device.type == "cuda" and not torch.cuda.is_initialized():
            self.budget_note.setText(f"Free GPU memory on {device}, read at Start")
        else:
            budget, where = device_capacity(device)
            self._show_budget(budget, f"{where[0].upper()}{where[1:]} now: {human_bytes(budget)}; read again at Start")
        self._update_enabled()

    def _show_budget(self, budget: int, note: str) -> None:
        self.budget_spin.setValue(max(1, min(self.budget_spin.maximum(), budget // MIB)))
        self.budget_note.setText(note)

    def run_options(self) -> RunOptions:
        """The form's settings, validated as `gemel run` validates its flags."""
        from ..options import validate

        return validate(RunOptions, {"policy": self.policy_combo.currentText(), "memory_budget": self.budget_bytes(),
                                     "device": self.device_combo.currentText(),
                                     "backend": self.backend_combo.currentText(),
                                     "load": self.load_combo.currentText(),
                                     "threads": self.threads_spin.value() or None})

    # --- running ----------------------------------------------------------------------------

    task_noun = "preview"

    @property
    def running(self) -> bool:
        return self.task_running

    @property
    def worker(self) -> Worker | None:
        return self.task_worker

    def start(self) -> Worker | None:
        """Load the bundle and run the streams in a Worker until `stop()`."""
        if self.running:
            return None
        if self.manifest is None and not self.set_bundle_path(self.bundle_edit.text()):
            if not self.bundle_edit.text().strip():
                self._fail("choose a bundle (a folder or .tar written by `gemel export`)")
            return None
        if not self.streams:
            self._fail("add a stream first (a synthetic stream, or a video file)")
            return None
        try:
            options = self.run_options()
        except GemelError as exc:
            self._fail(str(exc))
            return None
        path, streams = self.bundle_path(), [replace(c, models=list(c.models)) for c in self.streams]

        def work(progress, partial):
            from ..runtime import load_bundle
            from ..runtime.engine import Engine
            from ..runtime.telemetry import process_rss

            process_rss()  # psutil's first import, here rather than in the GUI thread's first redraw
            run, where = options.with_device_budget()  # as `gemel run` chooses it
            if where is not None:
                partial(DeviceBudget(run.memory_budget, where))
            with load_bundle(path) as bundle:  # closed (an archive's extraction removed) when the run ends
                engine = Engine(bundle, [(c.source(seed=i), list(c.models)) for i, c in enumerate(streams)], run)
                partial(engine)
                return engine.run(progress=progress)

        self.engine = None
        self.last_snapshot = None
        self._clear_tiles()
        self.gauges.clear()
        self.stream_model.set_rows([])
        self.model_model.set_rows([])
        self.state_label.setText("Starting")
        worker = self.start_task(work, name=f"preview of {path.name}", pool=self._pool,
                                 message=f"Loading and verifying {path.name}…")
        self.sigWorkerStarted.emit(worker)
        return worker

    def stop(self, wait_ms: int = 0) -> bool:
        """Ask the run to stop; with `wait_ms`, also wait that long for its thread (closing the
        window). True when nothing is left running."""
        self.stop_task("stop", "Stopping…")
        return self._pool.waitForDone(wait_ms) if wait_ms else self.worker is None

    def refresh(self, force: bool = False) -> None:
        """Read the engine's counters and last frames (GUI thread; the engine is thread-safe).
        Only what can be seen is redrawn: nothing while the tab is hidden (it catches up when
        shown), and only the tiles scrolled into view; the figures every FIGURES_EVERY-th time.
        `force` redraws everything (the run's final counters)."""
        engine = self.engine
        if engine is None or not (force or self.isVisible()):
            return
        snap = engine.snapshot()
        self.last_snapshot = snap
        figures = force or self.refreshes % FIGURES_EVERY == 0
        if figures:
            self.state_label.setText(run_state_text(snap))
            self.gauges.show_snapshot(snap)
            self.stream_model.set_rows(snap.streams)
            self.model_model.set_models(snap.models)
        self.refreshes += 1
        colors = self._model_colors()
        for tile, stats, latest in zip(self.tiles, snap.streams, list(engine.latest)):
            if force or not tile.visibleRegion().isEmpty():
                tile.show_state(stats, latest, colors, figures)

    def _fit_settings(self) -> None:
        """The settings column as wide as its widgets need in the current style and font
        (nothing cut at its right edge), with room for its scroll bar."""
        scroll = self.settings_scroll
        bar = scroll.verticalScrollBar().sizeHint().width()
        scroll.setFixedWidth(max(300, scroll.widget().minimumSizeHint().width() + bar + 2 * scroll.frameWidth()))

    def showEvent(self, event) -> None:  # noqa: N802 (Qt's name)
        super().showEvent(event)
        self._fit_settings()  # the theme's font is known now
        if self.engine is not None:
            self.refresh(force=True)  # what changed while another tab was shown
        elif not self.running:
            self.show_device_budget()  # the memory free now

    def _model_colors(self) -> dict[str, str]:
        series = self.colors["series"]
        return {name: series[i % len(series)] for i, name in enumerate(self.model_names())}

    def _on_engine(self, engine) -> None:
        self.engine = engine
        self.refreshes = 0
        self._clear_tiles()
        self.tiles_hint.hide()
        n = len(engine.stats)
        columns = self._columns(n)
        for i, stats in enumerate(engine.stats):
            tile = StreamTile(stats.name, stats.models, self.tiles_widget)
            tile.set_colors(self.colors)
            self.tiles_grid.addWidget(tile, i // columns, i % columns)
            self.tiles.append(tile)
        for c in range(columns):
            self.tiles_grid.setColumnStretch(c, 1)
        self.status_label.setText(f"Running {n} stream(s); Stop ends the run")
        self._timer.start()
        self.refresh()

    def _columns(self, n: int) -> int:
        """As many columns as make the frames largest in the space there is (frames taken as
        about square; each tile's text takes some 100 pixels under its frame)."""
        size = self.tiles_scroll.viewport().size()
        width, height = max(size.width(), 200), max(size.height(), 200)

        def side(columns: int) -> float:
            rows = math.ceil(n / columns)
            return min(width / columns, height / rows - 100)

        return max(range(1, max(1, n) + 1), key=side)

    def _clear_tiles(self) -> None:
        for tile in self.tiles:
            self.tiles_grid.removeWidget(tile)
            tile.deleteLater()
        self.tiles = []
        for c in range(self.tiles_grid.columnCount()):
            self.tiles_grid.setColumnStretch(c, 0)
        if self.engine is None:
            self.tiles_hint.show()

    def _end(self) -> None:
        self._timer.stop()
        if self.engine is not None:
            self.refresh(force=True)  # the final counters: every frame that came in, processed or dropped
            self.sigRunEnded.emit(self.last_snapshot)

    def on_task_partial(self, value) -> None:
        if isinstance(value, DeviceBudget):
            self._show_budget(value.bytes, f"{human_bytes(value.bytes)}: {value.where} at Start")
        else:
            self._on_engine(value)

    def on_task_progress(self, done: int, total: int, message: str) -> None:
        pass  # the engine's counters, read by the refresh timer, are the progress

    def on_task_done(self, summary: RunSummary) -> None:
        self._end()
        self.set_status_line(f"Stopped: {summary.stopped} after {summary.elapsed_s:.1f} s")

    def on_task_cancelled(self, mode: str) -> None:
        self._end()
        elapsed = self.last_snapshot.elapsed_s if self.last_snapshot else 0.0
        self.set_status_line(f"Stopped after {elapsed:.1f} s" if self.last_snapshot else "Stopped")

    def on_task_failed(self, message: str) -> None:
        self._end()
        self._fail(message)

    def update_controls(self) -> None:
        self._update_enabled()

    def _fail(self, message: str) -> None:
        self.status_label.setText("Failed: the message is shown above")  # shown once, in the banner
        self.sigError.emit(message)

    def _update_enabled(self) -> None:
        running = self.running
        self.start_button.setEnabled(not running and self.manifest is not None and bool(self.streams))
        self.stop_button.setEnabled(running and not self.task_stopping)
        for w in (self.bundle_edit, self.folder_button, self.archive_button, self.add_synthetic_button,
                  self.add_video_button, self.add_images_button, self.remove_button, self.fps_spin, self.loop_check, self.models_list,
                  self.policy_combo, self.device_combo, self.backend_combo, self.threads_spin):
            w.setEnabled(not running)
        self.load_combo.setEnabled(not running and self.backend_combo.currentText() == "torch")
        if self.backend_combo.currentText() != "torch":
            self.load_combo.setCurrentText("whole")
        budgeted = self.policy_combo.currentText() != "unlimited"
        self.device_budget_check.setEnabled(not running and budgeted)
        self.budget_spin.setEnabled(not running and budgeted and not self.device_budget_check.isChecked())
        self.remove_button.setEnabled(not running and bool(self.streams))
        if not running and self.engine is None:
            self.state_label.setText("Not running")

    # --- theme ------------------------------------------------------------------------------

    def set_colors(self, colors: dict) -> None:
        self.colors = colors
        for tile in self.tiles:
            tile.set_colors(colors)
        if self.engine is not None:
            self.refresh()
