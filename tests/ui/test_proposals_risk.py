"""The Proposals tab's merge risk: the CKA and drop columns (colour-scaled, sortable), measured
in the panel's worker with progress and Cancel, and "accept every group with a drop under X",
checked against `merging.risk.measure_risk` run directly on the same plan."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")

from PySide6.QtCore import QPoint, Qt  # noqa: E402

from gemel_studio.merging.plan import GroupState  # noqa: E402
from gemel_studio.merging.risk import measure_risk  # noqa: E402
from gemel_studio.ui.proposals_view import (RAW_ROLE, RISK_MIN_FRACTION, risk_level_of_cka,  # noqa: E402
                                            risk_level_of_drop)

from .conftest import QUICKSTART  # noqa: E402
from .test_merge_panels import proposed, tiny  # noqa: E402,F401  (fixtures)


def _columns(table) -> dict[str, int]:
    headers = [table.headerData(c, Qt.Orientation.Horizontal) for c in range(table.columnCount())]
    return {h: i for i, h in enumerate(headers)}


def _measure(panel, qtbot, timeout=240_000):
    with qtbot.waitSignal(panel.sigRiskMeasured, timeout=timeout):
        qtbot.mouseClick(panel.risk_button, Qt.MouseButton.LeftButton)
        assert panel.task_running and not panel.risk_button.isEnabled()
        assert panel.risk_cancel_button.isEnabled() and panel.risk_progress.isVisibleTo(panel)
    assert not panel.task_running and panel.risk_button.isEnabled() and not panel.risk_progress.isVisibleTo(panel)


def test_risk_columns_match_measure_risk_sort_and_accept_under_a_drop(proposed, qtbot, tmp_path):  # noqa: F811
    window, analysis = proposed
    panel = window.proposals_panel
    table = panel.model
    col = _columns(table)
    assert {"CKA", "Drop"} <= set(col) and col["State"] == 4  # the risk columns come after the plan's own
    assert all(table.data(table.index(r, col["Drop"])) == "" for r in range(table.rowCount()))
    assert panel.risk_status.text().startswith("not measured")
    assert not panel.drop_button.isEnabled()  # nothing to accept by until a drop is measured

    _measure(panel, qtbot)
    assert panel.risk_status.text().startswith("Measured")
    # The figures are those of the core's function on the same plan (deterministic: seeded models and data).
    expected, _ = measure_risk(window.workload, panel.plan.model_copy(deep=True),
                               drop_min_savings=int(RISK_MIN_FRACTION * analysis.max_savings_bytes))
    drops, alones = {}, {}
    for row, (shown, want) in enumerate(zip(panel.plan.groups, expected.groups)):
        assert shown.risk == want.risk
        cka, alone, joint = want.risk.cka, want.risk.max_drop, want.risk.max_joint_drop
        assert (alone is None) != (joint is None)  # a drop of its own, or (a small group) the small ones' together
        drop = drops[want.id] = alone if alone is not None else joint
        alones[want.id] = alone
        assert table.data(table.index(row, col["CKA"]), RAW_ROLE) == cka
        assert table.data(table.index(row, col["CKA"])) == f"{cka:.2f}"
        assert table.data(table.index(row, col["Drop"]), RAW_ROLE) == drop
        assert table.data(table.index(row, col["Drop"])) == ("" if alone is not None else "≤") + f"{drop * 100:+.1f} pts"
        tip = table.data(table.index(row, col["Drop"]), Qt.ItemDataRole.ToolTipRole)
        assert ("tied alone" in tip) == (alone is not None) and ("tied together" in tip) == (alone is None)
        # The colour scale: hue from green (120°, low risk) to red (0°).
        hue = table.data(table.index(row, col["CKA"]), Qt.ItemDataRole.BackgroundRole).color().hsvHueF()
        assert hue == pytest.approx((1 - risk_level_of_cka(cka)) / 3, abs=0.01)
        if drop is not None:
            hue = table.data(table.index(row, col["Drop"]), Qt.ItemDataRole.BackgroundRole).color().hsvHueF()
            assert hue == pytest.approx((1 - risk_level_of_drop(drop)) / 3, abs=0.01)
    measured = [d for d in drops.values() if d is not None]
    own = [d for d in alones.values() if d is not None]
    assert 0 < len(own) < len(drops)  # the light groups get no drop of their own, as `gemel propose`
    assert len(measured) == len(drops) and len(set(measured)) > 1

    # Sorting by the Drop column (a header click): smallest drop first, unmeasured groups last.
    header = panel.view.horizontalHeader()
    click = QPoint(header.sectionViewportPosition(col["Drop"]) + 5, header.height() // 2)
    qtbot.mouseClick(header.viewport(), Qt.MouseButton.LeftButton, pos=click)
    assert header.sortIndicatorSection() == col["Drop"]
    if header.sortIndicatorOrder() == Qt.SortOrder.DescendingOrder:  # a second click sorts ascending
        qtbot.mouseClick(header.viewport(), Qt.MouseButton.LeftButton, pos=click)
    assert header.sortIndicatorOrder() == Qt.SortOrder.AscendingOrder
    order = panel.view_order()
    shown = [drops[i] for i in order]
    n = len(measured)
    assert shown[:n] == sorted(measured) and all(d is None for d in shown[n:])
    # Selection maps through the sort: the first row shown is the safest group.
    panel.view.selectRow(0)
    assert [panel.plan.groups[r].id for r in panel.selected_rows()] == [order[0]]

    # Reject one safe group by hand, then accept by drop: exactly the others under the line.
    safest = panel.selected_rows()[0]
    qtbot.mouseClick(panel.reject_button, Qt.MouseButton.LeftButton)
    assert panel.plan.groups[safest].state is GroupState.rejected
    line = sorted(set(measured))[len(set(measured)) // 2]  # a value some groups are under and some not
    panel.drop_spin.setValue(line * 100)
    limit = panel.drop_spin.value() / 100
    assert panel.drop_button.isEnabled()
    qtbot.mouseClick(panel.drop_button, Qt.MouseButton.LeftButton)
    want = {gid for gid, d in drops.items() if d is not None and d < limit} - {panel.plan.groups[safest].id}
    accepted = {g.id for g in panel.plan.groups if g.state is GroupState.accepted}
    assert accepted == want and 0 < len(want) < n
    assert panel.plan.groups[safest].state is GroupState.rejected
    note = panel.plan_label.text()
    assert "Accepted" in note and "without a measured drop" not in note  # every group has one
    # The Retraining tab merges the same plan, risk included (its `predict` strategy reads it).
    assert window.retraining_panel.plan is panel.plan

    # The risk is saved with the plan and comes back on load, with no measuring.
    path = tmp_path / "plan.yaml"
    assert panel.save_plan_file(path)
    qtbot.mouseClick(panel.propose_button, Qt.MouseButton.LeftButton)
    assert all(g.risk is None for g in panel.plan.groups) and panel.risk_status.text().startswith("not measured")
    assert panel.load_plan_file(path)
    assert [g.risk for g in panel.plan.groups] == [g.risk for g in expected.groups]
    assert panel.risk_status.text() == f"{len(drops)} of {len(drops)} groups measured (init mean)"


def test_cancel_stops_the_measurement_and_keeps_the_table(proposed, qtbot):  # noqa: F811
    window, _ = proposed
    panel = window.proposals_panel
    qtbot.mouseClick(panel.risk_button, Qt.MouseButton.LeftButton)
    worker = panel.task_worker
    assert worker is not None and panel.risk_cancel_button.isVisibleTo(panel)
    with qtbot.waitSignal(worker.sigCancelled, timeout=120_000):
        qtbot.mouseClick(panel.risk_cancel_button, Qt.MouseButton.LeftButton)
        assert not panel.risk_cancel_button.isEnabled()  # stopping
    qtbot.waitUntil(lambda: not panel.task_running, timeout=120_000)
    assert worker.done and worker.cancelled
    assert panel.risk_status.text() == "Cancelled; the table keeps what it showed"
    assert all(g.risk is None for g in panel.plan.groups)
    assert panel.risk_button.isEnabled() and not panel.risk_cancel_button.isVisibleTo(panel)


@pytest.mark.timeout(900)  # a few forward passes of four ResNets per heavy group, on a busy 2-core CPU
def test_the_quickstart_shows_the_risk_columns(window, open_and_wait, qtbot):
    analysis = open_and_wait(window, QUICKSTART)
    panel = window.proposals_panel
    window.tabs.setCurrentWidget(panel)
    qtbot.mouseClick(panel.propose_button, Qt.MouseButton.LeftButton)
    # The figures' shape, cheaper: fewer samples per model, the drop for the four heaviest groups only.
    panel.risk_limit, panel.risk_min_fraction = 64, 0.1
    _measure(panel, qtbot, timeout=800_000)
    table, col = panel.model, _columns(panel.model)
    floor = int(0.1 * analysis.max_savings_bytes)
    assert sum(g.savings_bytes >= floor for g in panel.plan.groups) == 4
    for row, group in enumerate(panel.plan.groups):
        cka = table.data(table.index(row, col["CKA"]))
        drop = table.data(table.index(row, col["Drop"]))
        assert cka not in ("", "—") and 0.0 <= float(cka) <= 1.0
        heavy = group.savings_bytes >= floor  # a drop of its own; the others show the small groups' together
        assert drop.endswith(" pts") and drop.startswith("≤") != heavy
        assert set(group.risk.drop if heavy else group.risk.joint_drop) == set(group_models(group))


def group_models(group) -> list[str]:
    return [m.model for m in group.members]
