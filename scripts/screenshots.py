"""Screenshots of the studio's screens, for the docs: models table, sharing matrix, memory view.

    QT_QPA_PLATFORM=offscreen python scripts/screenshots.py [WORKLOAD] [--out docs/screenshots]

Opens the studio on WORKLOAD (default: the quick-start sample), waits for the analysis and
grabs the window at 1400x900, once per theme. Runs headless (offscreen platform) or under
xvfb-run. Settings go to a temporary folder, never the user's own.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch  # noqa: F401  (before Qt)

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", type=Path, nargs="?", default=ROOT / "sample_workloads" / "quickstart.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--themes", default="dark,light", help="comma-separated: dark, light")
    parser.add_argument("--group", type=int, default=0, help="share group (row) to select in the matrix")
    args = parser.parse_args(argv)
    if not (os.environ.get("QT_QPA_PLATFORM") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"

    from PySide6.QtCore import QEventLoop, QSettings, QTimer

    from gemel_studio.ui.app import make_app
    from gemel_studio.ui.main_window import MainWindow

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, tempfile.mkdtemp(prefix="gemel-shots-"))
    app = make_app()
    window = MainWindow()
    window.ask_before_discard = False
    window.resize(1400, 900)
    window.show()

    loop = QEventLoop()
    outcome: dict = {}
    window.sigAnalysisChanged.connect(lambda a: (outcome.setdefault("analysis", a), loop.quit()))
    window.sigError.connect(lambda m: (outcome.setdefault("error", m), loop.quit()))
    QTimer.singleShot(300_000, loop.quit)
    if not window.open_path(args.workload):
        print(f"error: {window.banner.message}", file=sys.stderr)
        return 2
    loop.exec()
    if "analysis" not in outcome:
        print(f"error: {outcome.get('error', 'analysis did not finish')}", file=sys.stderr)
        return 2

    def settle() -> None:
        for _ in range(5):
            app.processEvents()
        pause = QEventLoop()
        QTimer.singleShot(150, pause.quit)
        pause.exec()

    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for theme in [t.strip() for t in args.themes.split(",") if t.strip()]:
        window.set_theme(theme, persist=False)
        suffix = "" if theme == "dark" else f"-{theme}"
        window.models_panel.select_model(outcome["analysis"].models[0].name)
        window.sharing_panel.select_group(args.group)
        for index, name in ((0, "models"), (1, "sharing"), (2, "memory")):
            window.tabs.setCurrentIndex(index)
            settle()
            path = args.out / f"{name}{suffix}.png"
            window.grab().save(str(path))
            written.append(path)
    for path in written:
        print(path)
    window.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
