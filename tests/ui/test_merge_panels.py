"""The Proposals and Retraining tabs driven through their real widgets, on a tiny workload.

Figures are checked against the core's own (the analysis, the plan file, report.json); the
merge runs for real (three ResNet-18 at 16x16 on 48 synthetic images, one epoch a round).
"""

from __future__ import annotations

import json

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt  # noqa: E402

from gemel_studio.analysis import analyze_workload  # noqa: E402
from gemel_studio.units import human_bytes  # noqa: E402
from gemel_studio.merging.plan import GroupState, load_plan, propose_plan, save_plan  # noqa: E402
from gemel_studio.merging.report import MergeReport  # noqa: E402
from gemel_studio.ui.proposals_view import RAW_ROLE  # noqa: E402
from gemel_studio.workload import load_workload  # noqa: E402

from ..conftest import tv  # noqa: E402

MIB = 2**20
FAST = {"epochs": 1, "batch": 16, "optimizer": "adam", "lr": "0.001"}


@pytest.fixture
def tiny(write_workload):
    """Three ResNet-18 heads on synthetic tasks at 16x16; every merge meets its (low) target, so
    gemel runs exactly two rounds (one per set of models) and bisect one."""
    tasks, heads = ["color", "shape", "size"], [3, 3, 2]
    entries = [tv(t, "resnet18", num_classes=n, target={"absolute": 0.01},
                  dataset={"kind": "synthetic", "task": t, "samples": 48, "seed": i})
               for i, (t, n) in enumerate(zip(tasks, heads))]
    return write_workload(entries, input_size=[3, 16, 16])


@pytest.fixture
def proposed(window, open_and_wait, tiny, qtbot):
    """The window on the tiny workload with a plan proposed through the button."""
    analysis = open_and_wait(window, tiny)
    panel = window.proposals_panel
    window.tabs.setCurrentWidget(panel)
    qtbot.mouseClick(panel.propose_button, Qt.MouseButton.LeftButton)
    assert panel.plan is not None
    return window, analysis


def _memory_text(total: int, saved: int, bound: int) -> str:
    return (f"Merged workload: {human_bytes(total - saved)} of {human_bytes(total)} parameters "
            f"— accepted groups save {human_bytes(saved)}, {saved / bound:.1%} of the all-shareable "
            f"{human_bytes(bound)}")


def test_propose_lists_the_analysis_groups_in_order(proposed):
    window, analysis = proposed
    table = window.proposals_panel.model
    assert table.rowCount() == len(analysis.groups) > 2
    headers = [table.headerData(c, Qt.Orientation.Horizontal) for c in range(table.columnCount())]
    col = {h: headers.index(h) for h in ("Group", "Kind", "Models", "Saves", "State")}
    for row, group in enumerate(analysis.groups):
        assert table.data(table.index(row, col["Group"])) == f"g{row + 1:03d}"
        assert table.data(table.index(row, col["Kind"])) == group.kind
        assert table.data(table.index(row, col["Models"]), RAW_ROLE) == group.models
        assert table.data(table.index(row, col["Saves"]), RAW_ROLE) == group.savings_bytes
        assert table.data(table.index(row, col["Saves"])) == human_bytes(group.savings_bytes)
        assert table.data(table.index(row, col["State"])) == "proposed"
    assert window.proposals_panel.memory_label.text() == _memory_text(
        analysis.total_param_bytes, 0, analysis.max_savings_bytes)
    # The Retraining tab got the plan: its Start is enabled, with the plan's settings.
    assert window.retraining_panel.start_button.isEnabled()
    assert window.retraining_panel.plan is window.proposals_panel.plan


def test_accept_reject_and_threshold_update_the_memory_at_once(proposed, qtbot):
    window, analysis = proposed
    panel = window.proposals_panel
    total, bound = analysis.total_param_bytes, analysis.max_savings_bytes
    groups = analysis.groups

    assert not panel.accept_button.isEnabled()  # nothing selected
    panel.select_rows([0, 2])
    qtbot.mouseClick(panel.accept_button, Qt.MouseButton.LeftButton)
    saved = groups[0].savings_bytes + groups[2].savings_bytes
    assert panel.memory_label.text() == _memory_text(total, saved, bound)
    assert panel.bound_gauge.value() == round(saved / bound * 1000)
    assert panel.model.data(panel.model.index(0, 4)) == "accepted"

    panel.select_rows([2])
    qtbot.mouseClick(panel.reject_button, Qt.MouseButton.LeftButton)
    saved = groups[0].savings_bytes
    assert panel.memory_label.text() == _memory_text(total, saved, bound)
    assert panel.plan.groups[2].state is GroupState.rejected

    panel.threshold_spin.setValue(1)
    qtbot.mouseClick(panel.threshold_button, Qt.MouseButton.LeftButton)
    above = {i for i, g in enumerate(groups) if g.savings_bytes >= MIB}
    assert 0 < len(above) < len(groups) and 2 in above
    # The group rejected by hand stays rejected; the others above the threshold are accepted.
    assert panel.plan.groups[2].state is GroupState.rejected
    assert panel.threshold_button.text() == "Accept all above"  # no ellipsis: it opens no dialog
    saved = sum(g.savings_bytes for i, g in enumerate(groups) if i in (above - {2}) | {0})
    assert panel.memory_label.text() == _memory_text(total, saved, bound)
    assert panel.memory().saved_bytes == panel.plan.merged_savings_bytes == saved
    assert "Plan: " in window.retraining_panel.plan_label.text()


def test_save_then_load_round_trips_and_a_bad_plan_keeps_the_current_one(proposed, tmp_path, write_workload):
    window, analysis = proposed
    panel = window.proposals_panel
    panel.select_rows([1])
    panel.set_state([1], GroupState.rejected)
    panel.accept_above(MIB)
    path = tmp_path / "plan.yaml"
    assert panel.save_plan_file(path)
    saved_states = [g.state for g in panel.plan.groups]
    assert load_plan(path, window.workload, analysis) == panel.plan

    panel.propose()  # a fresh plan, all proposed
    assert all(g.state is GroupState.proposed for g in panel.plan.groups)
    assert panel.load_plan_file(path)
    assert [g.state for g in panel.plan.groups] == saved_states
    assert panel.memory().saved_bytes == sum(g.savings_bytes for g in panel.plan.groups if g.state.merged)
    assert panel.memory_label.text().startswith(
        f"Merged workload: {human_bytes(analysis.total_param_bytes - panel.memory().saved_bytes)}")

    # A plan made for another workload: its one-line error shows and the plan stays.
    other = load_workload(write_workload([tv("a", "resnet18"), tv("b", "resnet18")], name="other.yaml",
                                         input_size=[3, 16, 16]))
    foreign = tmp_path / "foreign.yaml"
    save_plan(propose_plan(other, analyze_workload(other)), foreign)
    kept, label = panel.plan, panel.memory_label.text()
    assert not panel.load_plan_file(foreign)
    assert str(foreign) in window.banner.message and "another version of workload" in window.banner.message
    assert "\n" not in window.banner.message
    assert panel.plan is kept and panel.memory_label.text() == label
    broken = tmp_path / "broken.yaml"
    broken.write_text("groups: [unclosed\n")
    assert not panel.load_plan_file(broken)
    assert "not valid YAML" in window.banner.message and panel.plan is kept


def _configure(panel, out_dir, strategy):
    # These tests watch epochs being trained: a candidate that meets its (low) targets when tied
    # would otherwise be kept with no retraining at all.
    if "check_before_training" in type(panel.plan.retraining).model_fields:
        panel.plan.retraining.check_before_training = False
    panel.strategy_combo.setCurrentText(strategy)
    panel.device_combo.setCurrentText("cpu")
    panel.optimizer_combo.setCurrentText(FAST["optimizer"])
    panel.epochs_spin.setValue(FAST["epochs"])
    panel.batch_spin.setValue(FAST["batch"])
    panel.lr_edit.setText(FAST["lr"])
    panel.set_out_dir(out_dir)


def test_a_short_run_draws_curves_logs_rounds_and_writes_the_report(proposed, qtbot, tmp_path):
    window, analysis = proposed
    panel = window.retraining_panel
    window.tabs.setCurrentWidget(panel)
    out = tmp_path / "merged"
    _configure(panel, out, "bisect")
    with qtbot.waitSignal(panel.sigRunFinished, timeout=120_000) as blocker:
        qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)
        assert panel.running and panel.pause_button.isEnabled() and not panel.start_button.isEnabled()
    report = blocker.args[0]
    assert isinstance(report, MergeReport) and report is panel.report
    assert not panel.running and panel.start_button.isEnabled()
    assert json.loads((out / "report.json").read_text()) == report.to_dict()
    # The Proposals tab now shows the outcome: the final plan with its kept groups.
    shown = window.proposals_panel.plan
    assert window.proposals_panel.plan_path == out / "plan.yaml"
    assert sum(g.savings_bytes for g in shown.groups if g.state.value == "kept") == report.saved_bytes > 0

    assert report.strategy == "bisect" and report.rounds == len(report.steps) >= 1
    assert panel.steps_model.steps == report.steps
    assert panel.steps_view.model().rowCount() == report.rounds
    x, saved = panel.saved_series()
    assert list(saved * MIB) == pytest.approx([0] + [s["saved_bytes_after"] for s in report.steps])
    assert list(x) == pytest.approx([0] + [s["elapsed_seconds"] for s in report.steps])

    assert set(panel.curves) == set(report.models)
    for name, row in report.models.items():
        curves = panel.curves[name]
        ax, ay = curves.accuracy_curve.getData()
        lx, ly = curves.loss_curve.getData()
        assert len(ax) == len(ay) == len(ly) >= 1 and all(0 <= a <= 1 for a in ay) and all(v > 0 for v in ly)
        assert curves.target_line.isVisible() and curves.target_line.value() == pytest.approx(row.target)

    report_table = panel.report_model
    assert report_table.rowCount() == len(report.models)
    for r, (name, row) in enumerate(report.models.items()):
        assert report_table.data(report_table.index(r, 0)) == name
        assert report_table.data(report_table.index(r, 2)) == f"{row.merged_accuracy:.3f}"
        assert report_table.data(report_table.index(r, 4)) == ("yes" if row.passed else "no")
    assert human_bytes(report.bytes_before) in panel.report_label.text()
    assert human_bytes(report.bytes_after) in panel.report_label.text()
    assert not panel.resume_button.isEnabled()  # a finished search leaves nothing to resume


def test_pause_then_resume_continues_without_redoing_a_round(proposed, qtbot, tmp_path):
    window, analysis = proposed
    panel = window.retraining_panel
    out = tmp_path / "merged"
    _configure(panel, out, "gemel")
    with qtbot.waitSignal(panel.sigWorkerStarted, timeout=10_000) as started:
        panel.start()
    worker = started.args[0]
    # Pause as soon as the first round is logged: the second round is then under way.
    qtbot.waitUntil(lambda: len(panel.steps_model.steps) >= 1, timeout=120_000)
    with qtbot.waitSignal(worker.sigCancelled, timeout=30_000):
        qtbot.mouseClick(panel.pause_button, Qt.MouseButton.LeftButton)
    first = dict(panel.steps_model.steps[0])
    assert not panel.running and "Paused" in panel.status_label.text()
    assert (out / "search.state").exists() and not (out / "report.json").exists()
    assert panel.resume_button.isEnabled()
    points = len(panel.curves[first["models"][0]].epochs)

    with qtbot.waitSignal(panel.sigRunFinished, timeout=120_000) as blocker:
        qtbot.mouseClick(panel.resume_button, Qt.MouseButton.LeftButton)
    report = blocker.args[0]
    assert report.steps[0] == first  # the first round was not redone: same figures, same time
    assert report.rounds == len(report.steps) >= 2
    assert panel.steps_model.steps == report.steps
    assert sum(len(c.epochs) for c in panel.curves.values()) > points  # resumed curves go on
    assert (out / "report.json").exists()


def test_cancel_deletes_the_checkpoint_and_a_bad_setting_is_one_line(proposed, qtbot, tmp_path, answers):
    window, analysis = proposed
    answers.yes()
    panel = window.retraining_panel
    out = tmp_path / "merged"
    _configure(panel, out, "bisect")
    panel.lr_edit.setText("0")
    assert panel.start() is None
    assert "lr" in window.banner.message and "greater than 0" in window.banner.message
    panel.lr_edit.setText(FAST["lr"])
    with qtbot.waitSignal(panel.sigWorkerStarted, timeout=10_000) as started:
        panel.start()
    worker = started.args[0]
    qtbot.waitUntil(lambda: "epoch" in panel.status_label.text(), timeout=120_000)
    with qtbot.waitSignal(worker.sigCancelled, timeout=30_000):
        qtbot.mouseClick(panel.cancel_button, Qt.MouseButton.LeftButton)
    assert "Cancelled" in panel.status_label.text()
    assert [a[2] for a in answers.asked] == ["Cancel and delete the checkpoint"]
    assert not any((out / f).exists() for f in ("search.state", "search.state.round", "report.json"))
    assert not panel.resume_button.isEnabled() and panel.start_button.isEnabled()
