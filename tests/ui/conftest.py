"""GUI tests: the real widgets, offscreen, with settings in a temporary folder.

The whole folder is skipped when PySide6 is not installed, so the Qt-free suite still runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import torch  # noqa: E402,F401  (torch before the QApplication exists)

try:  # a Skipped raised in a conftest is an error, so: skip the folder by not collecting it
    pytest.importorskip("PySide6")
    pytest.importorskip("pyqtgraph")
    pytest.importorskip("pytestqt")
except pytest.skip.Exception:
    collect_ignore_glob = ["test_*.py"]
    HAVE_QT = False
else:
    HAVE_QT = True
    from PySide6.QtCore import QSettings

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "sample_workloads" / "quickstart.yaml"


def write_video(path: Path, frames: int, fps: float, size=(32, 24)) -> Path:
    """Write an MJPG clip of `frames` frames at `fps` to `path` (each frame a shade redder than
    the one before, so that no two are alike) and return `path`: a video stream's source."""
    import cv2
    import numpy as np

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, size)
    assert writer.isOpened(), path
    for i in range(frames):
        image = np.zeros((size[1], size[0], 3), np.uint8)
        image[:, :, 2] = (8 * i) % 256
        writer.write(image)
    writer.release()
    return path


def open_preview(window, bundle_path: Path, policy: str):
    """The window's Live preview tab, shown, on the bundle at `bundle_path`, set to run on the
    CPU under `policy`; the panel."""
    panel = window.preview_panel
    window.tabs.setCurrentWidget(panel)
    assert panel.set_bundle_path(bundle_path), window.banner.message
    panel.policy_combo.setCurrentText(policy)
    panel.device_combo.setCurrentText("cpu")
    return panel


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path_factory, monkeypatch):
    """Every test gets its own empty settings folder, never the user's configuration."""
    folder = tmp_path_factory.mktemp("settings")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(folder))
    if HAVE_QT:
        QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(folder))
    yield folder


@pytest.fixture
def window(qtbot):
    """A shown main window with nothing open; closed (and its work stopped) after the test."""
    from gemel_studio.ui.main_window import MainWindow

    win = MainWindow()
    win.ask_before_discard = False
    qtbot.addWidget(win)
    win.show()
    yield win
    win.ask_before_discard = False
    win.stop_work(wait_ms=30_000)


@pytest.fixture
def open_and_wait(qtbot):
    """open_and_wait(window, path): open a workload and return its committed analysis."""

    def run(win, path, timeout=60_000):
        with qtbot.waitSignal(win.sigAnalysisChanged, timeout=timeout) as blocker:
            assert win.open_path(path), win.banner.message
        return blocker.args[0]

    return run


class Answers:
    """The studio's questions (`gemel_studio.ui.task.ask`), answered by the test: `answers.yes()`,
    `answers.no()`; each question asked is kept in `asked` as (title, text, yes-button)."""

    def __init__(self):
        self.asked: list[tuple[str, str, str]] = []
        self.reply: bool | None = None  # None: a question is unexpected and fails the test

    def yes(self) -> "Answers":
        self.reply = True
        return self

    def no(self) -> "Answers":
        self.reply = False
        return self

    def __call__(self, parent, title, text, yes="Yes", no="Cancel") -> bool:
        self.asked.append((title, text, yes))
        if self.reply is None:
            raise AssertionError(f"unexpected question: {title}: {text}")
        return self.reply


@pytest.fixture(autouse=True)
def answers(monkeypatch):
    """No modal question ever blocks a test: an unanswered one fails it."""
    found = Answers()
    if HAVE_QT:
        from gemel_studio.ui import task

        monkeypatch.setattr(task, "ask", found)
    return found
