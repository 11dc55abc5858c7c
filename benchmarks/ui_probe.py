"""How responsive the studio stays while it works: a timer on the GUI thread records how late
each of its ticks fires, first while the Retraining tab merges a tiny workload for real, then
while the Live preview runs a bundle on four synthetic streams. Prints one JSON object with
the p50/p99/max lateness of each phase and the device. Goal: p99 under 50 ms.

    QT_QPA_PLATFORM=offscreen .venv/bin/python benchmarks/ui_probe.py [--device auto|cpu|cuda]
          [--retrain-seconds 60] [--preview-seconds 10] [--interval-ms 10] [--profile FILE]

The merge is three ResNet-18 at 16x16 on synthetic images (gemel strategy, two epochs a round);
it is paused after `--retrain-seconds` if it has not finished. The preview exports that merged
folder (with every group the merge kept) and runs it under the merged policy. With
`--retrain-seconds 0` the retraining phase is skipped and the preview runs the same models
merged by every proposed group without retraining (untrained weights: the GUI's cost is the
same, only the labels differ), with a 256 MiB budget. Lateness is the time between two ticks
beyond the interval: a tick that waits behind a long slot on the GUI thread (a redraw, a table
refresh, a queued signal storm, the GIL held by the run's thread) shows as a stall. The
wall-clock figures depend on what else the machine runs; `redraw_cpu_*` and `gui_thread_cpu_s`
(the GUI thread's own CPU time) do not, and `worst_at_s` says when the worst stalls came.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch  # before Qt

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")


class StallProbe:
    def __init__(self, interval_ms: int):
        from PySide6.QtCore import Qt, QTimer

        self.interval = interval_ms / 1000
        self.late: list[float] = []
        self.at: list[float] = []  # when each tick fired, seconds from start()
        self._last: float | None = None
        self._start = 0.0
        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.late.append(max(0.0, now - self._last - self.interval))
            self.at.append(now - self._start)
        self._last = now

    def start(self) -> None:
        self.late, self.at, self._last, self._start = [], [], None, time.perf_counter()
        self.timer.start()

    def stop(self) -> dict:
        self.timer.stop()
        ms = np.asarray(self.late, dtype=float) * 1000
        if not len(ms):
            return {"ticks": 0}
        return {"ticks": int(len(ms)), "p50_ms": round(float(np.percentile(ms, 50)), 2),
                "p99_ms": round(float(np.percentile(ms, 99)), 2), "max_ms": round(float(ms.max()), 2),
                "stalls_over_50ms": int((ms > 50).sum()),
                "worst_at_s": [[round(self.at[i], 2), round(float(ms[i]))] for i in np.argsort(ms)[::-1][:5]]}


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def _p99(values: list[float]) -> float | None:
    return _pct(values, 99)


def run_until(app, done, seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        if done():
            return True
        time.sleep(0.002)
    return done()


def untrained_merge(workload_path: Path, out: Path) -> Path:
    """The merged folder `gemel merge` would write, every proposed group kept, no retraining."""
    from gemel_studio.analysis import analyze_workload
    from gemel_studio.merging import GroupState, apply_plan, propose_plan
    from gemel_studio.merging.pipeline import write_merged_folder
    from gemel_studio.models.zoo import construct
    from gemel_studio.workload import load_workload

    torch.manual_seed(0)
    workload = load_workload(workload_path)
    plan = propose_plan(workload, analyze_workload(workload))
    for g in plan.groups:
        g.state = GroupState.kept
    models = {m.name: construct(m.source.architecture, m.num_classes, "cpu")[0].eval() for m in workload.models}
    apply_plan(models, plan)
    write_merged_folder(out, workload, models, plan, {"workload": workload.name, "models": {}})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--retrain-seconds", type=float, default=60.0)
    parser.add_argument("--preview-seconds", type=float, default=10.0)
    parser.add_argument("--interval-ms", type=int, default=10)
    parser.add_argument("--profile", type=Path, default=None,
                        help="write a cProfile of the GUI thread during the preview here (python -m pstats reads it)")
    args = parser.parse_args(argv)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device

    from PySide6.QtCore import QSettings

    from gemel_studio.export import export_bundle
    from gemel_studio.samples import write_tiny_workload
    from gemel_studio.ui.app import make_app
    from gemel_studio.ui.main_window import MainWindow

    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, tempfile.mkdtemp(prefix="gemel-probe-"))
    app = make_app()
    window = MainWindow()
    window.ask_before_discard = False
    window.offer_resume_on_open = False
    window.resize(1400, 900)
    window.show()
    errors: list[str] = []
    window.sigError.connect(errors.append)

    folder = Path(tempfile.mkdtemp(prefix="gemel-probe-merge-"))
    path = write_tiny_workload(folder)
    analysed: list = []
    window.sigAnalysisChanged.connect(analysed.append)
    window.open_path(path)
    if not run_until(app, lambda: analysed or errors, 300):
        print(json.dumps({"error": "the workload was not analysed"}))
        return 2
    window.proposals_panel.propose()
    panel = window.retraining_panel
    panel.strategy_combo.setCurrentText("gemel")
    if panel.device_combo.findText(device) >= 0:
        panel.device_combo.setCurrentText(device)
    panel.optimizer_combo.setCurrentText("adam")
    panel.epochs_spin.setValue(2)
    panel.batch_spin.setValue(16)
    panel.set_out_dir(folder / "merged")
    window.tabs.setCurrentWidget(panel)

    probe = StallProbe(args.interval_ms)
    finished: list = []
    if args.retrain_seconds > 0:
        panel.sigRunFinished.connect(finished.append)
        probe.start()
        started = time.monotonic()
        if panel.start() is None:
            print(json.dumps({"error": errors[-1] if errors else "the merge did not start"}))
            return 2
        completed = run_until(app, lambda: finished or not panel.running, args.retrain_seconds)
        if panel.running:
            panel.pause()
            run_until(app, lambda: not panel.running, 120)
        retraining = {**probe.stop(), "seconds": round(time.monotonic() - started, 1), "finished": bool(finished),
                      "completed_in_time": bool(completed and finished)}
    else:
        untrained_merge(path, folder / "merged")
        finished.append(None)
        retraining = {"skipped": "--retrain-seconds 0: the preview runs the models merged without retraining"}

    out = {"device": device, "cpus": os.cpu_count(), "interval_ms": args.interval_ms, "goal_p99_ms": 50,
           "retraining": retraining}
    if finished:
        bundle = folder / "bundle"
        export_bundle(folder / "merged", bundle)
        preview = window.preview_panel
        if not preview.set_bundle_path(bundle):
            out["preview"] = {"error": errors[-1] if errors else "the bundle did not open"}
        else:
            preview.policy_combo.setCurrentText("merged")
            preview.device_budget_check.setChecked(False)  # the same budget on every machine
            preview.budget_spin.setValue(256)
            if preview.device_combo.findText(device) >= 0:
                preview.device_combo.setCurrentText(device)
            for fps in (10, 10, 6, 4):
                preview.add_synthetic_stream(fps)
            window.tabs.setCurrentWidget(preview)
            # Where a stall comes from: the preview's redraw, and within it the engine's snapshot
            # (timed where the redraw calls it, so the probe adds no snapshot of its own).
            refresh_ms, refresh_cpu_ms, snapshot_ms = [], [], []
            original_refresh = preview.refresh
            profiler = cProfile.Profile() if args.profile else None

            def timed_snapshot(snapshot):
                def timed():
                    t0 = time.perf_counter()
                    try:
                        return snapshot()
                    finally:
                        snapshot_ms.append((time.perf_counter() - t0) * 1000)
                timed.probed = True
                return timed

            def timed_refresh():
                engine = preview.engine
                if engine is not None and not getattr(engine.snapshot, "probed", False):
                    engine.snapshot = timed_snapshot(engine.snapshot)
                t0, c0 = time.perf_counter(), time.thread_time()
                original_refresh()
                refresh_ms.append((time.perf_counter() - t0) * 1000)
                refresh_cpu_ms.append((time.thread_time() - c0) * 1000)

            preview.refresh = timed_refresh
            # The run's start on the GUI thread: the tiles made when its engine arrives.
            started_ms = []
            original_partial = preview.on_task_partial

            def timed_partial(value):
                t0 = time.perf_counter()
                original_partial(value)
                started_ms.append(round((time.perf_counter() - t0) * 1000, 1))

            preview.on_task_partial = timed_partial
            preview._timer.timeout.disconnect()
            preview._timer.timeout.connect(timed_refresh)
            probe.start()
            if preview.start() is None:
                out["preview"] = {"error": errors[-1] if errors else "the preview did not start"}
            else:
                if profiler is not None:
                    profiler.enable()
                cpu0 = time.thread_time()
                run_until(app, lambda: False, args.preview_seconds)
                gui_cpu_s = time.thread_time() - cpu0
                if profiler is not None:
                    profiler.disable()
                # Wall-clock stalls depend on what else the machine runs; the GUI thread's own CPU time
                # (per redraw, and in all) is what the studio spends, whatever the load.
                out["preview"] = {**probe.stop(), "seconds": args.preview_seconds, "streams": 4,
                                  "redraws": len(refresh_ms), "redraw_p50_ms": _pct(refresh_ms, 50),
                                  "redraw_p99_ms": _p99(refresh_ms), "redraw_cpu_p50_ms": _pct(refresh_cpu_ms, 50),
                                  "redraw_cpu_p99_ms": _p99(refresh_cpu_ms),
                                  "engine_snapshot_p99_ms": _p99(snapshot_ms), "run_start_gui_ms": started_ms,
                                  "gui_thread_cpu_s": round(gui_cpu_s, 2),
                                  "load_average_1m": round(os.getloadavg()[0], 2)}
                preview.stop(wait_ms=10_000)
                if profiler is not None:
                    profiler.dump_stats(args.profile)
                    out["preview"]["profile"] = str(args.profile)
    phases = [p for p in (out.get("retraining"), out.get("preview")) if p and "p99_ms" in p]
    out["p99_ms"] = max(p["p99_ms"] for p in phases) if phases else None
    print(json.dumps(out, indent=2))
    window.stop_work()
    return 0


if __name__ == "__main__":
    sys.exit(main())
