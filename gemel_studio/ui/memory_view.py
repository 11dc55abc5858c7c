"""The Memory tab (pyqtgraph): what each layer of a model costs, and what merging saves.

Top: one model's layers as bars, parameter bytes and output activation bytes side by side
(analytic figures from the inventory; the two are different memories and never summed). The
bars are named: layer names on the axis where they fit (every n-th where they do not), and
the layer under the pointer in the line above the plot and in its tooltip.
Bottom: parameter bytes saved as share groups are merged in order (heaviest first), with
the all-shareable bound as a horizontal line.
"""

from __future__ import annotations

import math

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QFontMetrics
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QSizePolicy, QSplitter, QVBoxLayout, QWidget

from ..analysis import WorkloadAnalysis
from ..units import human_bytes
from .settings import PALETTES

MIB = 1024 * 1024


def style_plot(plot: pg.PlotItem, colors: dict) -> None:
    for name in ("left", "bottom"):
        axis = plot.getAxis(name)
        axis.setPen(pg.mkPen(colors["axis"]))
        axis.setTextPen(pg.mkPen(colors["foreground"]))
        axis.enableAutoSIPrefix(False)
    plot.showGrid(x=False, y=True, alpha=colors["grid"] / 255)
    plot.titleLabel.setText(plot.titleLabel.text, color=colors["foreground"])


class LayerAxis(pg.AxisItem):
    """A bottom axis over bars at 0, 1, 2, ...: each bar's layer name where the names fit side by
    side, else every n-th name (n as small as keeps them apart)."""

    GAP = 12  # pixels between two names

    def __init__(self):
        super().__init__("bottom")
        self.names: list[str] = []

    def set_names(self, names: list[str]) -> None:
        self.names = list(names)
        self.picture = None
        self.update()

    def name_step(self, lo: int, hi: int, pixels_per_bar: float) -> int:
        metrics = QFontMetrics(self.style.get("tickFont") or self.font())
        widest = max(metrics.horizontalAdvance(n) for n in self.names[lo:hi + 1]) + self.GAP
        return max(1, math.ceil(widest / max(pixels_per_bar, 1e-6)))

    def tickValues(self, minVal, maxVal, size):
        if not self.names:
            return super().tickValues(minVal, maxVal, size)
        lo, hi = max(0, math.ceil(minVal)), min(len(self.names) - 1, math.floor(maxVal))
        if hi < lo or size <= 0:
            return []
        step = self.name_step(lo, hi, size / max(maxVal - minVal, 1e-6))
        return [(float(step), [float(v) for v in range(-(-lo // step) * step, hi + 1, step)])]

    def tickStrings(self, values, scale, spacing):
        if not self.names:
            return super().tickStrings(values, scale, spacing)
        out = []
        for v in values:
            i = int(round(v))
            out.append(self.names[i] if 0 <= i < len(self.names) else "")
        return out


class MemoryPanel(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.analysis: WorkloadAnalysis | None = None
        self.colors = PALETTES["dark"]

        self.model_combo = QComboBox(self)
        self.model_combo.setMinimumWidth(220)
        self.model_combo.currentIndexChanged.connect(self._draw_layers)
        self.hover = QLabel("", self)
        self.hover.setSizePolicy(QSizePolicy.Policy.Ignored, QSizePolicy.Policy.Preferred)  # never widens the window
        top = QHBoxLayout()
        top.addWidget(QLabel("Model", self))
        top.addWidget(self.model_combo)
        top.addSpacing(16)
        top.addWidget(self.hover, 1)

        self.layer_axis = LayerAxis()
        self.layers_plot = pg.PlotWidget(self, axisItems={"bottom": self.layer_axis})
        self.layers_plot.setObjectName("layersPlot")
        self.layers_item = self.layers_plot.getPlotItem()
        self.layers_item.setLabel("left", "memory (MiB)")
        self.layers_item.setLabel("bottom", "layer (execution order; hover a bar for its name)")
        self.layers_item.setTitle("Per-layer memory")
        self.layers_item.setMouseEnabled(y=False)
        self.legend = self.layers_item.addLegend(offset=(10, 10))
        self.param_bars = pg.BarGraphItem(x=[], height=[], width=0.4, name="parameters")
        self.activation_bars = pg.BarGraphItem(x=[], height=[], width=0.4, name="output activations")
        self.layers_item.addItem(self.param_bars)
        self.layers_item.addItem(self.activation_bars)
        self.layers_plot.scene().sigMouseMoved.connect(self._mouse_moved)

        self.savings_plot = pg.PlotWidget(self)
        self.savings_plot.setObjectName("savingsPlot")
        self.savings_item = self.savings_plot.getPlotItem()
        self.savings_item.setLabel("left", "parameter bytes saved (MiB)")
        self.savings_item.setLabel("bottom", "share groups merged (heaviest first)")
        self.savings_item.setTitle("Savings as groups are merged")
        self.savings_item.setMouseEnabled(y=False)
        self.savings_legend = self.savings_item.addLegend(offset=(-10, -10))
        self.savings_curve = self.savings_item.plot([], [], name="cumulative saved", stepMode=None)
        self.bound_line = pg.InfiniteLine(pos=0, angle=0, movable=False,
                                          label="all-shareable bound",
                                          labelOpts={"position": 0.7, "anchors": [(0.5, 1.0), (0.5, 1.0)]})
        self.savings_item.addItem(self.bound_line)
        self.bound_line.setVisible(False)

        splitter = QSplitter(Qt.Orientation.Vertical, self)
        splitter.addWidget(self.layers_plot)
        splitter.addWidget(self.savings_plot)
        layout = QVBoxLayout(self)
        layout.addLayout(top)
        layout.addWidget(splitter, 1)
        self.set_colors(self.colors)

    # --- data -------------------------------------------------------------------------------

    def set_analysis(self, analysis: WorkloadAnalysis | None) -> None:
        self.analysis = analysis
        current = self.model_combo.currentText()
        self.model_combo.blockSignals(True)
        self.model_combo.clear()
        if analysis is not None:
            self.model_combo.addItems([m.name for m in analysis.models])
            self.model_combo.setCurrentIndex(max(0, self.model_combo.findText(current)))
        self.model_combo.blockSignals(False)
        self._draw_layers()
        self._draw_savings()

    def show_model(self, name: str) -> None:
        index = self.model_combo.findText(name)
        if index >= 0:
            self.model_combo.setCurrentIndex(index)

    def layer_series(self) -> tuple[np.ndarray, np.ndarray]:
        """The bars shown now: parameter MiB and activation MiB per layer."""
        return (np.asarray(self.param_bars.opts["height"], dtype=float),
                np.asarray(self.activation_bars.opts["height"], dtype=float))

    def _current_inventory(self):
        if self.analysis is None or self.model_combo.currentIndex() < 0:
            return None
        return self.analysis.models[self.model_combo.currentIndex()]

    def _draw_layers(self, *args) -> None:
        inv = self._current_inventory()
        layers = inv.layers if inv else []
        x = np.arange(len(layers), dtype=float)
        params = np.array([layer.param_bytes for layer in layers], dtype=float) / MIB
        acts = np.array([layer.activation_bytes or 0 for layer in layers], dtype=float) / MIB
        self.param_bars.setOpts(x=x - 0.2, height=params, width=0.4)
        self.activation_bars.setOpts(x=x + 0.2, height=acts, width=0.4)
        self.layer_axis.set_names([layer.name for layer in layers])
        self.layers_plot.setToolTip("")
        if layers:
            self.layers_item.setTitle(f"Per-layer memory: {inv.name} ({inv.architecture}), "
                                      f"{human_bytes(inv.param_bytes)} parameters, "
                                      f"peak activations {human_bytes(inv.activation_bytes)}")
            self.layers_item.setXRange(-1, len(layers), padding=0)
            self.layers_item.setYRange(0, max(params.max(initial=0), acts.max(initial=0)) * 1.3 or 1, padding=0)
        else:
            self.layers_item.setTitle("Per-layer memory: open a workload")
        self._restyle_titles()

    def _draw_savings(self) -> None:
        if self.analysis is None or not self.analysis.groups:
            self.savings_curve.setData([], [])
            self.bound_line.setVisible(False)
            self.savings_item.setTitle("Savings as groups are merged: no share groups")
            self._restyle_titles()
            return
        cumulative = np.array([0, *self.analysis.cumulative_savings()], dtype=float) / MIB
        x = np.arange(len(cumulative), dtype=float)
        self.savings_curve.setData(x, cumulative)
        bound = self.analysis.max_savings_bytes / MIB
        self.bound_line.setVisible(True)  # first: a hidden label ignores new text
        self.bound_line.setValue(bound)
        self.bound_line.label.setFormat(f"all-shareable bound {human_bytes(self.analysis.max_savings_bytes)} "
                                        f"({self.analysis.max_savings_fraction:.1%} of "
                                        f"{human_bytes(self.analysis.total_param_bytes)})")
        self.savings_item.setTitle(f"Savings as groups are merged: {len(self.analysis.groups)} groups")
        self.savings_item.setXRange(0, len(cumulative) - 1, padding=0.02)
        self.savings_item.setYRange(0, bound * 1.15 or 1, padding=0)
        self._restyle_titles()

    def savings_series(self) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.savings_curve.getData()
        return (np.asarray(x if x is not None else [], dtype=float),
                np.asarray(y if y is not None else [], dtype=float))

    def _mouse_moved(self, pos) -> None:
        inv = self._current_inventory()
        if inv is None or not self.layers_item.sceneBoundingRect().contains(pos):
            return
        x = self.layers_item.vb.mapSceneToView(pos).x()
        row = int(round(x))
        if 0 <= row < len(inv.layers):
            text = self.layer_text(row)
            self.hover.setText(text)
            self.layers_plot.setToolTip(text)

    def layer_text(self, row: int) -> str:
        """What hovering bar `row` of the current model says."""
        layer = self._current_inventory().layers[row]
        return (f"{row}: {layer.name} ({layer.kind}) — params {human_bytes(layer.param_bytes)}, "
                f"activations {human_bytes(layer.activation_bytes)}")

    # --- theme ------------------------------------------------------------------------------

    def set_colors(self, colors: dict) -> None:
        self.colors = colors
        for widget, item in ((self.layers_plot, self.layers_item), (self.savings_plot, self.savings_item)):
            widget.setBackground(colors["background"])
            style_plot(item, colors)
        for legend in (self.legend, self.savings_legend):
            legend.setLabelTextColor(colors["foreground"])
        self.param_bars.setOpts(brush=pg.mkBrush(colors["params"]), pen=pg.mkPen(None))
        self.activation_bars.setOpts(brush=pg.mkBrush(colors["activations"]), pen=pg.mkPen(None))
        self.savings_curve.setPen(pg.mkPen(colors["savings"], width=2))
        self.bound_line.setPen(pg.mkPen(colors["bound"], width=1.5, style=Qt.PenStyle.DashLine))
        self.bound_line.label.setColor(colors["bound"])
        # Legends read their labels when items are added: rebuild them in the new colours.
        for legend, items in ((self.legend, (self.param_bars, self.activation_bars)),
                              (self.savings_legend, (self.savings_curve,))):
            legend.clear()
            for item in items:
                legend.addItem(item, item.opts.get("name") or item.name())
        self._restyle_titles()

    def _restyle_titles(self) -> None:
        for item in (self.layers_item, self.savings_item):
            item.titleLabel.setText(item.titleLabel.text, color=self.colors["foreground"])
