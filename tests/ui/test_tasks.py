"""Ways to lose work, driven through the real widgets: a pause that lands as the merge ends,
Start over a finished or paused merge, quitting during a task, a relaunch that resumes,
Cancel with a checkpoint, Del on the Models tab, and the Retraining header after a merge.

The merge itself is replaced by a stand-in (`merge_workload` as the panel calls it) that
holds a checkpoint and stops only when asked, so these tests check states and files, never
timing; the real search is driven in test_merge_panels.py.
"""

from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import Qt  # noqa: E402

from gemel_studio.merging.plan import GroupState  # noqa: E402
from gemel_studio.tasks import TaskStatus  # noqa: E402
from gemel_studio.ui import retraining_view  # noqa: E402

from .test_merge_panels import _configure, proposed, tiny  # noqa: E402,F401  (fixtures)


def fake_report(models: list[str]) -> dict:
    step = {"round": 1, "groups": ["g001"], "models": models, "savings_bytes": 2048, "outcome": "kept",
            "next_action": "done", "accuracy": {m: 0.5 for m in models}, "retrain_seconds": 1.0,
            "saved_bytes_after": 2048, "elapsed_seconds": 2.0}
    return {"workload": "test", "strategy": "gemel", "stopped": "done", "device": "cpu",
            "models": {m: {"unmerged_accuracy": 0.6, "merged_accuracy": 0.5, "target": 0.01, "passed": True}
                       for m in models},
            "bytes_before": 10_000, "bytes_after": 7_952, "saved_bytes": 2048, "all_shareable_bytes": 4096,
            "fraction_of_bound": 0.5, "retrain_seconds": 1.0, "rounds": 1, "steps": [step]}


class FakeMerge:
    """Writes a checkpoint, then runs until asked to stop; with `finish_on_stop`, the stop
    lands just as the search writes its report (what a pause at the last round's end does)."""

    def __init__(self, finish_on_stop: bool = False):
        self.finish_on_stop = finish_on_stop
        self.calls: list[dict] = []

    def __call__(self, workload, plan, out_dir, *, strategy, progress, on_step, on_epoch, on_targets):
        self.calls.append({"plan": plan, "out_dir": out_dir, "strategy": strategy})
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "search.state").write_bytes(b"checkpoint")
        progress.start(100, "epoch 1")
        while not progress.cancelled:
            time.sleep(0.01)
        if self.finish_on_stop:
            report = fake_report([m.name for m in workload.models])
            (out_dir / "report.json").write_text(json.dumps(report))
            return report  # the worker reports this as cancelled: the stop raced past the end
        progress.check()


@pytest.fixture
def fake_merge(monkeypatch):
    def install(**kwargs) -> FakeMerge:
        fake = FakeMerge(**kwargs)
        monkeypatch.setattr(retraining_view, "merge_workload", fake)
        return fake

    return install


def _start(panel, qtbot):
    with qtbot.waitSignal(panel.sigWorkerStarted, timeout=10_000) as started:
        qtbot.mouseClick(panel.start_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: "epoch 1" in panel.status_label.text(), timeout=30_000)
    return started.args[0]


def test_a_pause_as_the_last_round_ends_shows_the_report_and_start_asks_before_deleting_it(
        proposed, qtbot, tmp_path, fake_merge, answers):  # noqa: F811
    window, _ = proposed
    panel = window.retraining_panel
    out = tmp_path / "merged"
    _configure(panel, out, "gemel")
    fake_merge(finish_on_stop=True)
    worker = _start(panel, qtbot)
    with qtbot.waitSignal(panel.sigRunFinished, timeout=30_000) as finished:
        qtbot.mouseClick(panel.pause_button, Qt.MouseButton.LeftButton)
    assert worker.done and panel.task_status is TaskStatus.CANCELLED
    on_disk = json.loads((out / "report.json").read_text())
    assert finished.args[0] == on_disk == panel.report
    assert "Finished" in panel.status_label.text() and "Paused" not in panel.status_label.text()
    assert panel.report_model.rowCount() == len(on_disk["models"])
    assert "1 round," in panel.report_label.text() and "1 rounds" not in panel.report_label.text()
    assert panel.steps_model.steps == on_disk["steps"]
    assert not panel.resume_button.isEnabled() and panel.start_button.isEnabled()

    # Start over a finished merge asks, naming what it would delete; "Keep it" keeps it.
    answers.no()
    assert panel.start() is None
    title, text, yes = answers.asked[-1]
    assert "report.json" in text and "checkpoint" in text and yes == "Delete and start afresh"
    assert (out / "report.json").exists() and (out / "search.state").exists()
    assert not panel.running and "Kept" in panel.status_label.text()

    answers.yes()
    fake_merge()
    worker = _start(panel, qtbot)
    assert not (out / "report.json").exists()
    with qtbot.waitSignal(worker.sigCancelled, timeout=30_000):
        panel.pause()
    assert "Paused after 0 rounds" in panel.status_label.text() and panel.resume_button.isEnabled()


def test_cancel_with_a_checkpoint_asks_and_no_keeps_it_running(proposed, qtbot, tmp_path, fake_merge, answers):  # noqa: F811
    window, _ = proposed
    panel = window.retraining_panel
    out = tmp_path / "merged"
    _configure(panel, out, "bisect")
    fake_merge()
    worker = _start(panel, qtbot)
    answers.no()
    qtbot.mouseClick(panel.cancel_button, Qt.MouseButton.LeftButton)
    assert answers.asked[-1][2] == "Cancel and delete the checkpoint" and str(out) in answers.asked[-1][1]
    assert panel.running and panel.task_status is TaskStatus.RUNNING and (out / "search.state").exists()
    answers.yes()
    with qtbot.waitSignal(worker.sigCancelled, timeout=30_000):
        qtbot.mouseClick(panel.cancel_button, Qt.MouseButton.LeftButton)
    assert not (out / "search.state").exists() and "Cancelled after 0 rounds" in panel.status_label.text()


def test_quitting_during_a_merge_asks_and_yes_pauses_it(proposed, qtbot, tmp_path, fake_merge, answers):  # noqa: F811
    window, _ = proposed
    panel = window.retraining_panel
    out = tmp_path / "merged"
    _configure(panel, out, "bisect")
    fake_merge()
    worker = _start(panel, qtbot)

    answers.no()
    window.quit_action.trigger()  # Ctrl+Q
    assert window.isVisible() and panel.running
    assert answers.asked[-1][0] == "Quit while work runs?" and "pauses it" in answers.asked[-1][1]

    answers.yes()
    window.quit_action.trigger()
    assert not window.isVisible()
    qtbot.waitUntil(lambda: worker.done, timeout=30_000)
    assert not panel.running and "Paused" in panel.status_label.text()
    assert (out / "search.state").exists() and panel.resume_button.isEnabled()

    # Idle, quitting asks nothing.
    answers.reply = None
    window.show()
    window.close()
    assert not window.isVisible()


def test_a_relaunch_offers_to_resume_the_merge_with_its_settings(
        proposed, qtbot, tmp_path, fake_merge, answers, tiny):  # noqa: F811
    from gemel_studio.ui.main_window import MainWindow

    window, _ = proposed
    panel = window.retraining_panel
    out = tmp_path / "merged"
    _configure(panel, out, "gemel")
    panel.epochs_spin.setValue(3)
    panel.budget_spin.setValue(600)
    fake_merge()
    worker = _start(panel, qtbot)
    with qtbot.waitSignal(worker.sigCancelled, timeout=30_000):
        panel.pause()
    window.stop_work()

    def relaunch():
        again = MainWindow()
        again.ask_before_discard = False
        qtbot.addWidget(again)
        again.show()
        with qtbot.waitSignal(again.sigAnalysisChanged, timeout=60_000):
            assert again.open_path(tiny)
        return again

    answers.no()  # "Not now": nothing changes, and the question is not asked again this session
    again = relaunch()
    qtbot.waitUntil(lambda: len(answers.asked) == 1, timeout=10_000)
    assert answers.asked[0][0] == "Resume the merge?" and str(out) in answers.asked[0][1]
    assert not again.retraining_panel.running and again.retraining_panel.plan is None
    assert not again.retraining_panel.offer_resume()
    again.stop_work()

    answers.yes()
    fake = fake_merge()
    again = relaunch()
    resumed = again.retraining_panel
    qtbot.waitUntil(lambda: resumed.running, timeout=10_000)
    assert resumed.out_dir() == out and resumed.strategy_combo.currentText() == "gemel"
    assert resumed.epochs_spin.value() == 3 and resumed.budget_spin.value() == 600
    assert resumed.device_combo.currentText() == "cpu" and resumed.optimizer_combo.currentText() == "adam"
    assert again.proposals_panel.plan is resumed.plan is not None  # one plan, shown and merged
    qtbot.waitUntil(lambda: len(fake.calls) == 1, timeout=10_000)
    assert fake.calls[0]["out_dir"] == out and fake.calls[0]["plan"].retraining.epochs == 3
    assert "Resuming" in resumed.status_label.text() or "epoch" in resumed.status_label.text()
    again.stop_work()


def test_the_header_after_a_merge_and_start_tries_only_kept_and_accepted(proposed):  # noqa: F811
    window, _ = proposed
    panel = window.retraining_panel
    plan = panel.plan
    n = len(plan.groups)
    assert panel.plan_label.text() == (f"Plan: Start tries {n} of its {n} groups: every group not rejected "
                                       f"(none is accepted yet)")
    states = [GroupState.kept, GroupState.backed_off] + [GroupState.proposed] * (n - 2)
    outcome = plan.model_copy(update={"groups": [g.model_copy(update={"state": s})
                                                 for g, s in zip(plan.groups, states)]})
    panel.set_plan(outcome, replaced=False)
    assert panel.plan_label.text() == f"Plan: Start tries 1 of its {n} groups: its 1 kept and 0 accepted groups"
    tried = [g.id for c in retraining_view.candidates(retraining_view.plan_for_run(outcome)) for g in c.groups]
    assert tried == [plan.groups[0].id]
    assert panel.start_button.isEnabled()

    nothing_kept = outcome.model_copy(update={"groups": [
        g.model_copy(update={"state": GroupState.backed_off if i == 0 else g.state})
        for i, g in enumerate(outcome.groups)]})
    panel.set_plan(nothing_kept, replaced=False)
    assert "Start tries 0 of" in panel.plan_label.text() and "accept groups" in panel.plan_label.text()
    assert not panel.start_button.isEnabled() and panel.start() is None


def test_an_error_shows_once_in_the_banner(proposed):  # noqa: F811
    window, _ = proposed
    panel = window.retraining_panel
    window.statusBar().showMessage("an old success")
    panel.lr_edit.setText("nope")
    assert panel.start() is None
    assert "learning rate 'nope'" in window.banner.message
    assert window.statusBar().currentMessage() == ""
    assert "nope" not in panel.status_label.text() and "above" in panel.status_label.text()


def test_removing_a_model_can_be_undone(window, open_and_wait, tiny, qtbot):  # noqa: F811
    open_and_wait(window, tiny)
    names = [m.name for m in window.workload.models]
    with qtbot.waitSignal(window.sigAnalysisChanged, timeout=60_000):
        assert window.remove_model(names[0])
    assert [m.name for m in window.workload.models] == names[1:]
    assert window.undo_remove_action.isEnabled() and "Undo" in window.statusBar().currentMessage()
    with qtbot.waitSignal(window.sigAnalysisChanged, timeout=60_000):
        window.undo_remove_action.trigger()
    assert [m.name for m in window.workload.models] == names
    assert not window.undo_remove_action.isEnabled()


def test_every_screen_fits_1024x700_with_a_workload_and_a_plan(window, open_and_wait, tiny, qtbot):  # noqa: F811
    window.resize(1024, 700)
    open_and_wait(window, tiny)
    window.proposals_panel.propose()
    for i in range(window.tabs.count()):
        window.tabs.setCurrentIndex(i)
        qtbot.wait(20)
        panel = window.tabs.widget(i)
        assert panel.minimumSizeHint().width() <= 1024 - 40, window.tabs.tabText(i)
        assert panel.minimumSizeHint().height() <= 700 - 120, window.tabs.tabText(i)
    assert window.width() == 1024 and window.height() == 700
