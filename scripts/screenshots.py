"""Screenshots of the studio's screens, for the docs: models table, sharing matrix, memory
view, merge proposals (with their merge risk), a fine-tune and a retraining run, and the edge
screens (export, live preview, monitor).

    QT_QPA_PLATFORM=offscreen python scripts/screenshots.py [WORKLOAD] [--out docs/screenshots]
    QT_QPA_PLATFORM=offscreen python scripts/screenshots.py --edge-only

Opens the studio on WORKLOAD (default: the quick-start sample), waits for the analysis,
proposes a plan and accepts the groups saving at least 1 MiB, and grabs the window at
1400x900 and at 1024x700 (`--sizes`), once per theme. The retraining screen comes from a
real, short merge of a tiny workload (three ResNet-18 at 16x16 on synthetic images, written to a temporary folder), so
its curves show real figures; it takes a minute or two on a CPU (--no-retraining skips it, and
the edge screens with it, since they start from its merged folder). The edge screens export
that merged folder for real (Export), run the bundle on three synthetic streams on the CPU
(Preview) and watch that run through a metrics endpoint on a free local port (Monitor), which
serves the preview's engine exactly as `gemel run --metrics-port` serves its own.
Runs headless (offscreen platform) or under xvfb-run. Settings go to a temporary folder,
never the user's own.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch  # before Qt

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", type=Path, nargs="?", default=ROOT / "sample_workloads" / "quickstart.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--themes", default="dark,light", help="comma-separated: dark, light")
    parser.add_argument("--sizes", default="1400x900,1024x700",
                        help="comma-separated window sizes; the first is the docs' (no suffix), the others "
                             "add -WxH to the file name")
    parser.add_argument("--group", type=int, default=0, help="share group (row) to select in the matrix")
    parser.add_argument("--no-risk", action="store_true",
                        help="skip measuring the merge risk for the proposals screen (about 30 s on a CPU)")
    parser.add_argument("--no-retraining", action="store_true",
                        help="skip the retraining run and its screenshot (and the edge screens, which need it)")
    parser.add_argument("--no-edge", action="store_true", help="skip the export, preview and monitor screens")
    parser.add_argument("--edge-only", action="store_true",
                        help="only the export, preview and monitor screens (still runs the tiny merge)")
    args = parser.parse_args(argv)
    if args.edge_only and (args.no_edge or args.no_retraining):
        parser.error("--edge-only needs the retraining run and the edge screens")
    if not (os.environ.get("QT_QPA_PLATFORM") or os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        os.environ["QT_QPA_PLATFORM"] = "offscreen"

    from PySide6.QtCore import QEventLoop, QSettings, QTimer
    from PySide6.QtWidgets import QWidget

    from gemel_studio.merging.plan import GroupState
    from gemel_studio.ui.app import make_app
    from gemel_studio.ui.main_window import MainWindow

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, tempfile.mkdtemp(prefix="gemel-shots-"))
    app = make_app()
    window = MainWindow()
    window.ask_before_discard = False
    window.resize(1400, 900)
    window.show()

    def settle() -> None:
        for _ in range(5):
            app.processEvents()
        pause = QEventLoop()
        QTimer.singleShot(150, pause.quit)
        pause.exec()

    args.out.mkdir(parents=True, exist_ok=True)
    themes = [t.strip() for t in args.themes.split(",") if t.strip()]
    sizes = [tuple(int(v) for v in s.strip().split("x")) for s in args.sizes.split(",") if s.strip()]
    written = []

    def grab(tabs: list[tuple[QWidget, str]]) -> None:
        for n, (width, height) in enumerate(sizes):
            window.resize(width, height)
            for theme in themes:
                window.set_theme(theme, persist=False)
                suffix = ("" if theme == "dark" else f"-{theme}") + ("" if n == 0 else f"-{width}x{height}")
                for panel, name in tabs:
                    window.tabs.setCurrentWidget(panel)
                    settle()
                    path = args.out / f"{name}{suffix}.png"
                    window.grab().save(str(path))
                    written.append(path)
        window.resize(*sizes[0])

    if not args.edge_only:
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
        proposals = window.proposals_panel
        proposals.propose()
        if not args.no_risk:
            proposals.risk_limit = 256  # samples per model: the same picture, sooner
            if proposals.measure_risk() is None or not wait_for(proposals.sigRiskMeasured):
                print(f"error: merge risk: {window.banner.message or 'not measured'}", file=sys.stderr)
                return 2
        proposals.accept_above(1024 * 1024)
        proposals.set_state([len(proposals.plan.groups) - 1], GroupState.rejected)
        proposals.select_rows([1, 2])
        window.models_panel.select_model(outcome["analysis"].models[0].name)
        window.sharing_panel.select_group(args.group)
        grab([(window.models_panel, "models"), (window.sharing_panel, "sharing"), (window.memory_panel, "memory"),
              (proposals, "proposals")])
    if not args.no_retraining:
        error = retraining_run(window)
        if error:
            print(f"error: retraining: {error}", file=sys.stderr)
            return 2
        if not args.edge_only:
            grab([(window.retraining_panel, "retraining"), (window.finetune_panel, "finetune")])
        if not args.no_edge:
            error = edge_run(window, grab, settle)
            if error:
                print(f"error: edge screens: {error}", file=sys.stderr)
                return 2
    for path in written:
        print(path)
    window.close()
    return 0


def wait_for(signal, timeout_ms: int = 600_000) -> list:
    """Run the event loop until `signal` fires (its arguments) or the timeout ([])."""
    from PySide6.QtCore import QEventLoop, QTimer

    loop, got = QEventLoop(), []
    signal.connect(lambda *a: (got.extend(a or [True]), loop.quit()))
    QTimer.singleShot(timeout_ms, loop.quit)
    loop.exec()
    return got


def retraining_run(window) -> str:
    """Open a tiny workload, propose a plan and merge it for real; '' or an error message."""
    from gemel_studio.samples import write_tiny_workload

    folder = Path(tempfile.mkdtemp(prefix="gemel-shots-merge-"))
    path = write_tiny_workload(folder)
    errors: list[str] = []
    window.sigError.connect(errors.append)
    if not window.open_path(path) or not wait_for(window.sigAnalysisChanged):
        return errors[0] if errors else "the tiny workload was not analysed"
    # The Fine-tune screen: a short fine-tune of the same models (its result is not opened).
    tune = window.finetune_panel
    tune.epochs_spin.setValue(4)
    tune.device_combo.setCurrentText("cpu")
    tune.out_edit.setText(str(folder / "tuned"))
    if tune.start() is None or not wait_for(tune.sigFinished):
        return errors[0] if errors else "the fine-tune did not finish"
    window.proposals_panel.propose()
    panel = window.retraining_panel
    panel.strategy_combo.setCurrentText("gemel")
    panel.device_combo.setCurrentText("cpu")
    panel.optimizer_combo.setCurrentText("adam")
    panel.epochs_spin.setValue(4)
    panel.batch_spin.setValue(16)
    panel.lr_edit.setText("0.001")
    panel.set_out_dir(folder / "merged")
    # Untrained models meet their near-chance targets without training; the picture is of a
    # run that retrains, so skip the zero-retraining check here.
    panel.plan.retraining.check_before_training = False
    window.tabs.setCurrentWidget(panel)
    torch.manual_seed(0)  # the untrained models' weights: the same run, and the same picture, each time
    if panel.start() is None or not wait_for(panel.sigRunFinished):
        return errors[0] if errors else "the merge did not finish"
    return ""


def edge_run(window, grab, settle) -> str:
    """Export the tiny merge, run the bundle in the Live preview and watch that run in the
    Monitor; grab the three screens. '' or an error message."""
    import time

    from gemel_studio.runtime.metrics import MetricsServer

    errors: list[str] = []
    window.sigError.connect(errors.append)
    merged = window.retraining_panel.last_out_dir
    export = window.export_panel
    export.set_merged_dir(merged)
    export.set_out_path(merged.with_name("tiny-bundle"))
    window.tabs.setCurrentWidget(export)
    if export.export() is None or not wait_for(export.sigExported):
        return errors[0] if errors else "the export did not finish"
    grab([(export, "export")])

    export.preview_button.click()  # the exported bundle, in the Live preview
    preview = window.preview_panel
    if window.tabs.currentWidget() is not preview:
        return errors[0] if errors else "the bundle did not open in the preview"
    preview.policy_combo.setCurrentText("merged")
    preview.device_budget_check.setChecked(False)  # a budget below everything, so the swaps show
    preview.budget_spin.setValue(64)
    preview.device_combo.setCurrentText("cpu")
    preview.add_synthetic_stream(10)
    preview.add_synthetic_stream(6, models=["color", "size"])
    preview.add_synthetic_stream(4, models=["shape"])
    if preview.start() is None:
        return errors[0] if errors else "the preview did not start"

    def run_for(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            settle()

    run_for(2.0)
    if preview.engine is None:
        preview.stop(wait_ms=10_000)
        return errors[0] if errors else "the preview's engine did not start"
    server = MetricsServer(preview.engine.snapshot)  # what `gemel run --metrics-port 0` serves
    try:
        monitor = window.monitor_panel
        monitor.set_address(f"127.0.0.1:{server.port}")
        monitor.connect_to()
        run_for(6.0)
        grab([(preview, "preview"), (monitor, "monitor")])
    finally:
        window.monitor_panel.disconnect()
        preview.stop(wait_ms=10_000)
        settle()
        server.close()
    return ""


if __name__ == "__main__":
    sys.exit(main())
