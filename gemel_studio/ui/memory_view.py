"""The Memory tab (pyqtgraph): what each layer of a model costs, and what merging saves.

Top: one model's layers as bars, parameter bytes and output activation bytes side by side
(analytic figures from the inventory; the two are different memories and never summed).
Bottom: parameter bytes saved as share groups are merged in order (heaviest first), with
the all-shareable bound as a horizontal line.
"""

from __future__ import annotations

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QComboBox, QHBoxLayout, QLabel, QSplitter, QVBoxLayout, QWidget

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


class MemoryPanel(QWidget):
    def __init__(self, parent=None):
        super().__init__(parent)
        self.analysis: WorkloadAnalysis | None = None
        self.colors = PALETTES["dark"]

        self.model_combo = QComboBox(self)
        self.model_combo.setMinimumWidth(220)
        self.model_combo.currentIndexChanged.connect(self._draw_layers)
        self.hover = QLabel("", self)
        top = QHBoxLayout()
        top.addWidget(QLabel("Model", self))
        top.addWidget(self.model_combo)
        top.addSpacing(16)
        top.addWidget(self.hover, 1)

        self.layers_plot = pg.PlotWidget(self)
        self.layers_plot.setObjectName("layersPlot")
        self.layers_item = self.layers_plot.getPlotItem()
        self.layers_item.setLabel("left", "memory (MiB)")
        self.layers_item.setLabel("bottom", "layer (execution order)")
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
            layer = inv.layers[row]
            self.hover.setText(f"{row}: {layer.name} ({layer.kind}) — params {human_bytes(layer.param_bytes)}, "
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
