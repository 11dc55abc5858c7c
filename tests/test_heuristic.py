"""The merge search (GEMEL's loop and bisection) and `gemel merge` end to end, on tiny data."""

from __future__ import annotations

import json

import pytest
from safetensors import safe_open

from gemel_studio.errors import Cancelled
from gemel_studio.merging import GroupState, load_plan, propose_plan, save_plan
from gemel_studio.merging.heuristic import candidates, search
from gemel_studio.merging.pipeline import merge_workload, prepare_merge
from gemel_studio.progress import Progress
from gemel_studio.workload import load_workload

from .conftest import tv

FAST = {"epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 1e-3, "weight_decay": 0.0}


def _workload(write_workload, target, heads=(3, 3, 2)):
    tasks = ["color", "shape", "size"]
    entries = [tv(t, "resnet18", num_classes=n, target=target,
                  dataset={"kind": "synthetic", "task": t, "samples": 48, "seed": i})
               for i, (t, n) in enumerate(zip(tasks, heads))]
    return load_workload(write_workload(entries, input_size=[3, 16, 16]))


def _context(w):
    from gemel_studio.analysis import analyze_workload

    plan = propose_plan(w, analyze_workload(w))
    plan.retraining = plan.retraining.model_copy(update=FAST)
    return plan, prepare_merge(w, plan)


def test_candidates_gather_groups_by_model_set(write_workload):
    w = _workload(write_workload, {"absolute": 0.01})
    plan, _ = _context(w)
    cands = candidates(plan)
    assert [sorted(c.models) for c in cands] == [["color", "shape", "size"], ["color", "shape"]]
    assert cands[0].savings_bytes > cands[1].savings_bytes
    assert sum(c.savings_bytes for c in cands) == sum(g.savings_bytes for g in plan.groups)
    heavy, light = cands[0].halves()
    assert heavy.savings_bytes >= light.savings_bytes and len(heavy.groups) + len(light.groups) == len(cands[0].groups)


def test_bisect_reaches_gemels_savings_in_fewer_rounds_when_merges_succeed(write_workload):
    w = _workload(write_workload, {"absolute": 0.01})
    plan, ctx = _context(w)
    runs = {s: search(ctx.build_models, ctx.base_state, plan, ctx.data, ctx.targets, s) for s in ("gemel", "bisect")}
    bound = sum(g.savings_bytes for g in plan.groups)
    for run in runs.values():
        assert run.saved_bytes == bound
        assert all(g.state is GroupState.kept for g in run.plan.groups)
    assert len(runs["gemel"].steps) == 2 and len(runs["bisect"].steps) == 1


def test_gemel_halves_a_candidate_that_misses_its_target(write_workload):
    w = _workload(write_workload, {"absolute": 1.0}, heads=(3, 3, 3))  # unreachable in one epoch
    plan, ctx = _context(w)
    run = search(ctx.build_models, ctx.base_state, plan, ctx.data, ctx.targets, "gemel")
    first = run.steps[0]
    assert first.outcome == "failed" and first.next_action.startswith("halved")
    sizes = [len(s.groups) for s in run.steps]
    assert sizes[0] == len(plan.groups) and all(b < a for a, b in zip(sizes, sizes[1:]))
    assert sizes[-1] == 1 and run.steps[-1].next_action.startswith("dropped")
    assert run.saved_bytes == 0
    assert all(g.state is GroupState.backed_off for g in run.plan.groups)


def test_merge_writes_weights_once_plan_and_report_and_resumes(tmp_path, write_workload):
    w = _workload(write_workload, {"relative": 0.5})
    plan, _ = _context(w)
    plan.retraining.check_before_training = False  # every round trains: the cancel below lands in one
    plan_path = tmp_path / "plan.yaml"
    save_plan(plan, plan_path)
    out = tmp_path / "merged"
    seen = []

    def cancel_in_second_round(done, total, message):
        if len(seen) == 1 and message.startswith("epoch 1"):
            progress.cancel()

    progress = Progress(cancel_in_second_round, min_interval=0)
    with pytest.raises(Cancelled):
        merge_workload(w, plan, out, strategy="gemel", progress=progress, on_step=seen.append)
    assert len(seen) == 1 and (out / "search.state").exists() and (out / "search.state.round").exists()

    events = []
    report = merge_workload(w, plan, out, strategy="gemel", on_epoch=lambda r: events.append("epoch"),
                            on_targets=lambda t: events.append(t))
    # The targets are announced once, before any retraining, and are the report's.
    assert isinstance(events[0], dict) and all(e == "epoch" for e in events[1:]) and len(events) > 1
    assert events[0] == {n: (pytest.approx(r["unmerged_accuracy"]), pytest.approx(r["target"]))
                         for n, r in report["models"].items()}
    assert report["steps"][0] == {**vars(seen[0])}  # the first round was not redone
    assert report["rounds"] == len(report["steps"]) >= 2
    assert report["bytes_after"] == report["predicted_bytes_after"] == report["bytes_before"] - report["saved_bytes"]
    assert set(report["models"]) == {"color", "shape", "size"}
    for row in report["models"].values():
        assert row["target"] == pytest.approx(0.5 * row["unmerged_accuracy"])
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk["saved_bytes"] == report["saved_bytes"]
    final = load_plan(out / "plan.yaml")
    kept = [g for g in final.groups if g.state is GroupState.kept]
    assert sum(g.savings_bytes for g in kept) == report["saved_bytes"]
    with safe_open(str(out / "merged.safetensors"), "pt") as f:
        mapping = json.loads(f.metadata()["gemel.tensor_map"])
        stored = set(f.keys())
    # Every model's tensors resolve to stored keys, and a kept group's weight is stored once.
    assert all(set(m.values()) <= stored for m in mapping.values())
    g = kept[0]
    keys = {mapping[m.model][f"{m.layer}.weight"] for m in g.members}
    assert len(keys) == 1
    # The workload is written beside the weights (for `gemel export`); the caller's is untouched.
    saved = load_workload(out / "workload.yaml")
    assert saved.models == w.models and w.path == tmp_path / "test.yaml"
    # ... and the merged folder is all `gemel export` needs: its checks pass on real merge output.
    from gemel_studio.export import export_bundle

    result = export_bundle(out, tmp_path / "bundle")
    assert result.ok, [c for c in result.checks if not c.passed]
    assert result.weights_data_bytes < result.sum_model_bytes


def test_a_candidate_that_already_meets_its_targets_is_banked_without_a_step(write_workload):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    w = _workload(write_workload, {"absolute": 0.001})
    plan, ctx = _context(w)
    steps = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: steps.append(1))
    try:
        run = search(ctx.build_models, ctx.base_state, plan, ctx.data, ctx.targets, "bisect")
    finally:
        handle.remove()
    assert steps == []
    assert run.saved_bytes == sum(g.savings_bytes for g in plan.groups)
    assert [s.next_action for s in run.steps] == ["banked with zero retraining"]
    assert run.steps[0].epochs == 0 and run.steps[0].init == "mean"
    assert run.steps[0].accuracy == run.steps[0].initial_accuracy


def test_candidates_below_the_minimum_savings_stay_untried_and_unmerged(tmp_path, write_workload):
    w = _workload(write_workload, {"absolute": 0.01})
    plan, _ = _context(w)
    heavy, light = candidates(plan)  # all three models; the two 3-class heads
    plan.retraining.min_savings_bytes = light.savings_bytes + 1
    report = merge_workload(w, plan, tmp_path / "merged", strategy="gemel")
    assert report["rounds"] == 1 and report["steps"][0]["groups"] == [g.id for g in heavy.groups]
    assert report["saved_bytes"] == heavy.savings_bytes
    assert f"{len(light.groups)} groups below the minimum savings" in report["stopped"]
    # Every model is also scored on the split the search never saw, unmerged and merged.
    for row in report["models"].values():
        assert 0.0 <= row["unmerged_test_accuracy"] <= 1.0 and 0.0 <= row["merged_test_accuracy"] <= 1.0
    final = load_plan(tmp_path / "merged" / "plan.yaml")
    assert {g.id for g in final.groups if g.state is GroupState.accepted} == {g.id for g in light.groups}
    # The untried groups are not tied: the weights on disk are what the report predicts.
    assert report["bytes_after"] == report["predicted_bytes_after"] == report["bytes_before"] - heavy.savings_bytes



def test_the_unseen_split_is_fresh_data_and_leaves_the_deciding_split_as_it_was(write_workload):
    import torch

    from gemel_studio.merging.datasets import load_model_data

    w = _workload(write_workload, {"absolute": 0.5})
    spec = w.models[0]
    data = load_model_data(w, spec)
    without = load_model_data(w, spec, test_fraction=0.0)
    assert without.test is None and len(data.test) == int(48 * 0.2)
    assert torch.equal(torch.stack([x for x, _ in data.val]), torch.stack([x for x, _ in without.val]))
    train = torch.stack([x for x, _ in data.train])
    assert not any(torch.equal(x, t) for x, _ in data.test for t in train)


def test_predict_tries_the_low_risk_groups_together_first_and_the_risky_ones_last(write_workload):
    from gemel_studio.merging.plan import GroupRisk

    w = _workload(write_workload, {"absolute": 0.001})
    plan, ctx = _context(w)
    risky = plan.groups[0]
    for g in plan.groups:
        g.risk = GroupRisk(cka=0.9, drop={m.model: (0.4 if g is risky else 0.01) for m in g.members})
    run = search(ctx.build_models, ctx.base_state, plan, ctx.data, ctx.targets, "predict")
    assert [sorted(s.groups) for s in run.steps] == [sorted(g.id for g in plan.groups[1:]), [risky.id]]
    assert run.saved_bytes == sum(g.savings_bytes for g in plan.groups)


def _group(gid: str, nbytes: int, drops: dict[str, float]):
    from gemel_studio.merging.plan import GroupRisk, PlannedGroup, PlannedMember

    return PlannedGroup(id=gid, signature="Conv2d", bytes_per_copy=nbytes,
                        members=[PlannedMember(model=m, layer="conv") for m in ("a", "b")],
                        risk=GroupRisk(cka=0.9, drop=drops) if drops else None)


def test_predicts_first_block_spends_half_of_each_models_margin_fewest_points_per_byte_first():
    from gemel_studio.merging.heuristic import predicted_blocks

    groups = [_group("cheap-big", 1000, {"a": 0.01, "b": 0.0}),    # 1e-5 points a byte: first
              _group("dear-small", 10, {"a": 0.02, "b": 0.0}),     # 2e-3 a byte: last; no room left for a
              _group("b-only", 500, {"a": -0.01, "b": 0.03}),      # a negative drop (noise) costs nothing
              _group("over", 800, {"a": 0.0, "b": 0.06}),          # low-risk? no: 0.06 > LOW_RISK, and over b's room
              _group("unmeasured", 50, {})]                        # no drop: never in the first block
    margins = {"a": 0.05, "b": 0.08}  # room: a 0.025, b 0.04
    blocks = predicted_blocks(groups, margins)
    assert [[g.id for g in c.groups] for c in blocks] == [["cheap-big", "b-only"], ["dear-small"], ["over", "unmeasured"]]
    # a spent 0.01 + 0 of its 0.025 (dear-small's 0.02 would pass it); b spent 0.03 of 0.04.
    # Without margins (no unmerged accuracy) there is no first block: low risk, then the rest by risk.
    assert [[g.id for g in c.groups] for c in predicted_blocks(groups, None)] == \
        [["cheap-big", "dear-small", "b-only"], ["over", "unmeasured"]]
    # Drops measured with another init than the plan's say nothing of it: no first block then.
    for g in groups:
        if g.risk is not None:
            g.risk.init = "mean"
    assert [[g.id for g in c.groups] for c in predicted_blocks(groups, margins, "mean")][0] == ["cheap-big", "b-only"]
    assert [[g.id for g in c.groups] for c in predicted_blocks(groups, margins, "first")] == \
        [["cheap-big", "dear-small", "b-only"], ["over", "unmeasured"]]


def test_predict_puts_small_groups_by_their_joint_drop_a_harmless_tail_with_the_low_risk_block():
    from gemel_studio.merging.heuristic import group_risk, predicted_blocks
    from gemel_studio.merging.plan import GroupRisk

    def tail(gid: str, joint: dict[str, float]):
        g = _group(gid, 5, {})
        g.risk = GroupRisk(cka=0.2, joint_drop=joint, joint_groups=2)  # a low CKA: 1 - CKA would say risky
        return g

    big = _group("big", 1000, {"a": 0.04, "b": 0.0})  # low risk, but over a's room for the first block
    harmless = [tail("t1", {"a": 0.01, "b": 0.02}), tail("t2", {"a": 0.01, "b": 0.02})]
    assert group_risk(harmless[0]) == 0.02
    blocks = predicted_blocks([big, *harmless], {"a": 0.05, "b": 0.05})
    assert [[g.id for g in c.groups] for c in blocks] == [["big", "t1", "t2"]]
    harmful = [tail("t1", {"a": 0.15, "b": 0.0}), tail("t2", {"a": 0.15, "b": 0.0})]
    blocks = predicted_blocks([big, *harmful], {"a": 0.05, "b": 0.05})
    assert [[g.id for g in c.groups] for c in blocks] == [["big"], ["t1", "t2"]]
    # With room for everything, only the groups measured alone are predicted to need no retraining: a joint
    # drop is not the group's own, and added up per group it would count the tail many times.
    blocks = predicted_blocks([big, *harmless], {"a": 1.0, "b": 1.0})
    assert [[g.id for g in c.groups] for c in blocks] == [["big"], ["t1", "t2"]]


def test_predict_banks_the_predicted_block_with_zero_retraining(write_workload):
    from gemel_studio.merging.plan import GroupRisk

    w = _workload(write_workload, {"absolute": 0.001})
    plan, ctx = _context(w)
    plan.groups.sort(key=lambda g: -g.savings_bytes)
    safe, rest = plan.groups[:2], plan.groups[2:]
    for g in plan.groups:
        g.risk = GroupRisk(cka=0.9, drop={m.model: (0.0 if g in safe else 0.03) for m in g.members})
    unmerged = {n: 0.5 for n in ctx.targets}  # margins of ~0.5: room for 0.25 of summed drops per model
    run = search(ctx.build_models, ctx.base_state, plan, ctx.data, ctx.targets, "predict", unmerged=unmerged)
    first = run.steps[0]
    assert set(g.id for g in safe) <= set(first.groups)
    assert first.outcome == "kept" and first.epochs == 0 and first.next_action == "banked with zero retraining"
    assert first.trained_epochs == 0.0
    assert run.saved_bytes == sum(g.savings_bytes for g in plan.groups)


def test_predict_tries_the_output_layers_of_different_tasks_last_in_a_block_of_their_own(write_workload):
    from gemel_studio.merging.heuristic import predicted_blocks
    from gemel_studio.merging.pipeline import task_heads
    from gemel_studio.merging.plan import GroupRisk

    w = _workload(write_workload, {"absolute": 0.001})  # color and shape: two 3-class heads of two questions
    plan, ctx = _context(w)
    heads = task_heads(w, ctx.analysis, plan)
    assert [sorted((m.model, m.layer) for m in g.members) for g in plan.groups if g.id in heads] == \
        [[("color", "fc"), ("shape", "fc")]]
    for g in plan.groups:  # every group harmless, the heads the most harmless of all
        g.risk = GroupRisk(cka=0.9, drop={m.model: (0.0 if g.id in heads else 0.01) for m in g.members})
    blocks = predicted_blocks(plan.groups, None, defer=heads)
    assert [{g.id for g in c.groups} for c in blocks] == [{g.id for g in plan.groups} - heads, heads]
    run = search(ctx.build_models, ctx.base_state, plan, ctx.data, ctx.targets, "predict", defer=heads)
    assert [set(s.groups) for s in run.steps] == [{g.id for g in plan.groups} - heads, heads]
    assert run.saved_bytes == sum(g.savings_bytes for g in plan.groups)  # deferred, not left out


def test_heads_of_models_with_the_same_task_are_not_deferred(write_workload):
    from gemel_studio.analysis import analyze_workload
    from gemel_studio.merging.pipeline import task_heads

    # Two cameras, one question: each its own footage (seed, size), the same class names.
    w = load_workload(write_workload(
        [tv("cam1", "resnet18", num_classes=3, dataset={"kind": "synthetic", "task": "color", "samples": 48, "seed": 0}),
         tv("cam2", "resnet18", num_classes=3, dataset={"kind": "synthetic", "task": "color", "samples": 64, "seed": 5})],
        input_size=[3, 16, 16]))
    analysis = analyze_workload(w)
    plan = propose_plan(w, analysis)
    assert any(all(m.layer == "fc" for m in g.members) for g in plan.groups)  # the heads are a group
    assert task_heads(w, analysis, plan) == set()


def test_a_weight_on_the_models_root_is_not_taken_for_its_output_layer(write_workload):
    """ViT keeps its class token on the root module, whose forward hook fires last."""
    from dataclasses import replace

    from gemel_studio.analysis import analyze_workload
    from gemel_studio.merging.pipeline import task_heads

    w = _workload(write_workload, {"absolute": 0.001})
    analysis = analyze_workload(w)
    plan = propose_plan(w, analysis)
    heads = task_heads(w, analysis, plan)
    assert len(heads) == 1
    for inv in analysis.models:
        inv.layers.append(replace(inv.layers[-1], name="", param_bytes=3072))
    assert task_heads(w, analysis, plan) == heads
