"""Starting the studio: the QApplication, the main window and the first workload."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

# torch before Qt: importing it after a QApplication exists can clash over shared libraries.
import torch  # noqa: F401

# Imported here, not lazily: without the GUI extras `from gemel_studio.ui.app import run_studio`
# raises ImportError, which the CLI turns into its one-line "needs the GUI extras" message.
import pyqtgraph  # noqa: F401
from PySide6.QtWidgets import QApplication

from ..samples import DEFAULT_WORKLOAD
from .settings import APPLICATION, ORGANIZATION

NO_DISPLAY = "no display: run on a desktop, or under xvfb-run, or set QT_QPA_PLATFORM=offscreen"


def has_display() -> bool:
    """False on a Linux box with no X or Wayland display and no Qt platform chosen."""
    if os.environ.get("QT_QPA_PLATFORM"):
        return True
    if not sys.platform.startswith("linux"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def make_app(argv: list[str] | None = None):
    """The QApplication (created once), with the studio's names and a neutral style."""
    app = QApplication.instance()
    if app is None:
        app = QApplication(argv if argv is not None else [sys.argv[0]])
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    app.setApplicationDisplayName("GEMEL Studio")
    app.setStyle("Fusion")
    return app


def run_studio(path: Path | None = None) -> int:
    """Open the studio on `path` (default: the quick-start workload); return the exit code."""
    if not has_display():
        print(NO_DISPLAY, file=sys.stderr)
        return 2
    from .main_window import MainWindow  # after the display check: it pulls in the whole core

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app = make_app()
    window = MainWindow()
    window.show()
    window.open_path(Path(path) if path is not None else DEFAULT_WORKLOAD)
    return app.exec()
