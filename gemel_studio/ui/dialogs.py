"""Small dialogs: add a torchvision model, describe a dropped checkpoint, About.

Each dialog is opened with `open()` (window-modal, never a nested event loop) and hands
back a `ModelSpec` through `spec()` once accepted.
"""

from __future__ import annotations

from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (QComboBox, QDialog, QDialogButtonBox, QFormLayout, QLabel, QLineEdit, QMessageBox,
                               QSpinBox, QVBoxLayout, QWidget)

from ..system import versions
from ..units import human_bytes
from ..models import known_architectures
from ..workload import CheckpointSource, ModelSpec, TorchvisionSource


def unique_name(base: str, taken: set[str]) -> str:
    base = base.strip() or "model"
    if base not in taken:
        return base
    k = 2
    while f"{base}_{k}" in taken:
        k += 1
    return f"{base}_{k}"


class AddModelDialog(QDialog):
    """Name, torchvision architecture, task and number of classes of a new model.

    With `checkpoint` set, the model's weights come from that file (a CheckpointSource):
    the studio infers nothing from the file, the user names its architecture.
    """

    def __init__(self, taken_names: set[str], parent: QWidget | None = None, checkpoint: Path | None = None,
                 default_architecture: str = "resnet18"):
        super().__init__(parent)
        self.checkpoint = checkpoint
        self.taken = set(taken_names)
        self._architectures = known_architectures()
        self.setWindowTitle("Add checkpoint" if checkpoint else "Add model")

        self.name_edit = QLineEdit(self)
        self.architecture_combo = QComboBox(self)
        self.architecture_combo.addItems(list(self._architectures))
        self.architecture_combo.setEditable(True)  # type to filter the long list
        self.architecture_combo.setInsertPolicy(QComboBox.InsertPolicy.NoInsert)
        self.task_combo = QComboBox(self)
        self.task_combo.addItems(["classification", "detection"])
        self.task_combo.setEnabled(False)  # follows the architecture
        self.classes_spin = QSpinBox(self)
        self.classes_spin.setRange(1, 100_000)
        self.classes_spin.setValue(1000)
        self.problem = QLabel("", self)
        self.problem.setStyleSheet("color: #e05d5d;")

        form = QFormLayout()
        if checkpoint is not None:
            file_label = QLabel(f"{checkpoint.name} ({human_bytes(checkpoint.stat().st_size)})"
                                if checkpoint.exists() else checkpoint.name, self)
            file_label.setToolTip(str(checkpoint))
            form.addRow("Checkpoint", file_label)
        form.addRow("Name", self.name_edit)
        form.addRow("Architecture", self.architecture_combo)
        form.addRow("Task", self.task_combo)
        form.addRow("Classes", self.classes_spin)
        self.buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Ok | QDialogButtonBox.StandardButton.Cancel,
                                        self)
        self.buttons.accepted.connect(self.accept)
        self.buttons.rejected.connect(self.reject)
        layout = QVBoxLayout(self)
        if checkpoint is not None:
            hint = QLabel("The file's architecture cannot be read from its weights: choose it.", self)
            hint.setWordWrap(True)
            layout.addWidget(hint)
        layout.addLayout(form)
        layout.addWidget(self.problem)
        layout.addWidget(self.buttons)

        self.name_edit.textChanged.connect(self._validate)
        self.architecture_combo.currentTextChanged.connect(self._architecture_changed)
        self.architecture_combo.setCurrentText(default_architecture)
        base = checkpoint.stem if checkpoint is not None else default_architecture
        self.name_edit.setText(unique_name(base, self.taken))
        self._architecture_changed(self.architecture_combo.currentText())

    def _architecture_changed(self, architecture: str) -> None:
        task = self._architectures.get(architecture)
        if task:
            self.task_combo.setCurrentText(task)
            if self.checkpoint is None and (not self.name_edit.isModified()):
                self.name_edit.setText(unique_name(architecture, self.taken))
        self._validate()

    def problem_text(self) -> str:
        name = self.name_edit.text().strip()
        if not name:
            return "give the model a name"
        if name in self.taken:
            return f"'{name}' is taken: every model needs its own name"
        if self.architecture_combo.currentText() not in self._architectures:
            return "choose a torchvision architecture from the list"
        return ""

    def _validate(self, *args) -> None:
        problem = self.problem_text()
        self.problem.setText(problem)
        self.buttons.button(QDialogButtonBox.StandardButton.Ok).setEnabled(not problem)

    def accept(self) -> None:
        if self.problem_text():
            return
        super().accept()

    def spec(self) -> ModelSpec:
        architecture = self.architecture_combo.currentText()
        if self.checkpoint is not None:
            source = CheckpointSource(kind="checkpoint", architecture=architecture, path=self.checkpoint)
        else:
            source = TorchvisionSource(kind="torchvision", architecture=architecture)
        return ModelSpec(name=self.name_edit.text().strip(), source=source, task=self.task_combo.currentText(),
                         num_classes=self.classes_spin.value())


def about_box(parent: QWidget) -> QMessageBox:
    info = versions()
    rows = "".join(f"<tr><td>{key}</td><td>&nbsp;{info.get(key) or 'not installed'}</td></tr>"
                   for key in ("gemel_studio", "python", "torch", "torchvision", "onnx", "onnxruntime",
                               "pyside6", "qt", "device"))
    for gpu in info.get("gpus", []):
        rows += (f"<tr><td>gpu {gpu.get('index', '')}</td><td>&nbsp;{gpu['name']}, "
                 f"{human_bytes(gpu['memory_used'])} used of {human_bytes(gpu['memory_total'])}</td></tr>")
    box = QMessageBox(parent)
    box.setWindowTitle("About GEMEL Studio")
    box.setTextFormat(Qt.TextFormat.RichText)
    box.setText("<h3>GEMEL Studio</h3><p>Share layers across vision models to fit them onto one "
                "memory-starved edge GPU (GEMEL, NSDI'23).</p>"
                f"<table>{rows}</table>")
    box.setStandardButtons(QMessageBox.StandardButton.Ok)
    return box
