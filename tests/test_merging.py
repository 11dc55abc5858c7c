"""Merge plans and weight tying: validation, storage identity, exact bytes, shared gradients."""

from __future__ import annotations

import pytest
import torch
import yaml

from gemel_studio.analysis import analyze_workload
from gemel_studio.merging import GroupState, MergePlan, PlanError, apply_plan, load_plan, propose_plan, save_plan, unique_param_bytes
from gemel_studio.models import build_model
from gemel_studio.workload import load_workload

from .conftest import tv


@pytest.fixture
def small(write_workload):
    w = load_workload(write_workload([tv("a", "mobilenet_v3_small", num_classes=3),
                                      tv("b", "mobilenet_v3_small", num_classes=4),
                                      tv("c", "resnet18", num_classes=2)], input_size=[3, 32, 32]))
    return w, analyze_workload(w)


def test_proposals_are_the_groups_heaviest_first_and_round_trip(tmp_path, small):
    w, analysis = small
    plan = propose_plan(w, analysis)
    assert [g.savings_bytes for g in plan.groups] == [g.savings_bytes for g in analysis.groups]
    assert all(g.state is GroupState.proposed for g in plan.groups)
    plan.groups[0].state = GroupState.accepted
    save_plan(plan, tmp_path / "plan.yaml")
    again = load_plan(tmp_path / "plan.yaml", w, analysis)
    assert again == plan
    assert again.merged_savings_bytes == plan.groups[0].savings_bytes


def _edit(path, fn):
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data))


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d["groups"][0]["members"][0].update(model="zzz"), "names model 'zzz', which the workload does not have"),
    (lambda d: d["groups"][0]["members"][0].update(layer="nope.conv"), "has no layer 'nope.conv'"),
    (lambda d: d["groups"][0].update(signature="Linear(in=1,out=1,bias=True,float32)"), "not interchangeable"),
    (lambda d: d["groups"].append({**d["groups"][0], "id": "dup"}), "is in groups g001 and dup"),
    (lambda d: d["groups"][0]["members"].append(d["groups"][0]["members"][0]), "two layers of one model"),
    (lambda d: d["workload"].update(sha256="0" * 64), "made for another version of workload"),
    (lambda d: d.update(colour="blue"), "field 'colour': unknown key"),
    (lambda d: d["groups"][0].update(state="maybe"), "field 'groups.0.state'"),
])
def test_bad_plans_are_refused_with_a_clear_message(tmp_path, small, edit, expected):
    w, analysis = small
    path = tmp_path / "plan.yaml"
    save_plan(propose_plan(w, analysis), path)
    _edit(path, edit)
    with pytest.raises(PlanError, match=expected):
        load_plan(path, w, analysis)


def test_a_plan_for_another_workload_names_it_and_the_command_in_one_line(tmp_path, small, write_workload):
    w, analysis = small
    path = tmp_path / "plan.yaml"
    save_plan(propose_plan(w, analysis), path)
    other = load_workload(write_workload([tv("a", "resnet18", num_classes=3)], name="other.yaml"))
    other = other.model_copy(update={"name": "cameras"})
    with pytest.raises(PlanError) as caught:
        load_plan(path, other, analyze_workload(other))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"{path}: made for workload '{w.name}'")
    assert f"not for 'cameras'" in message and f"gemel propose {other.path} -o {path}" in message
    # Another version of the same workload (its content changed): says so, with the same fix.
    _edit(path, lambda d: d["workload"].update(sha256="0" * 64))
    with pytest.raises(PlanError) as caught:
        load_plan(path, w, analysis)
    message = str(caught.value)
    assert "\n" not in message and f"another version of workload '{w.name}' (sha256 000000000000)" in message
    assert f"gemel propose {w.path} -o {path}" in message


def test_merge_options_state_the_search_and_retraining_once():
    from typing import get_args

    from gemel_studio.errors import GemelError
    from gemel_studio.merging.heuristic import STRATEGIES
    from gemel_studio.merging.options import MIB, MergeOptions, RetrainSettings, Strategy
    from gemel_studio.merging.pipeline import merge_options

    assert set(get_args(Strategy)) == set(STRATEGIES)
    plan = MergePlan(workload={"name": "w", "sha256": "0" * 64}, retraining={"epochs": 3, "time_budget_s": 9})
    options = merge_options(plan, strategy="gemel", limit=5)
    assert (options.strategy, options.limit, options.retraining.epochs) == ("gemel", 5, 3)
    assert merge_options(plan, time_budget_s=2).retraining.time_budget_s == 2
    assert MergeOptions(min_savings_mib=1.5).settings.min_savings_bytes == int(1.5 * MIB)
    assert MergeOptions().settings == RetrainSettings()
    with pytest.raises(GemelError, match="--strategy 'fastest'"):
        merge_options(plan, strategy="fastest")


def _real_models(w):
    torch.manual_seed(0)
    return {spec.name: build_model(w, spec, materialize=True).module for spec in w.models}


def test_tying_shares_storage_and_bytes_match_the_analysis(small):
    w, analysis = small
    plan = propose_plan(w, analysis)
    for g in plan.groups[::2]:  # accept every other group
        g.state = GroupState.accepted
    models = _real_models(w)
    before = unique_param_bytes(models.values())
    assert before == analysis.total_param_bytes
    tied = apply_plan(models, plan)
    assert tied == sum(len(g.members) - 1 for g in plan.merged_groups())
    for g in plan.merged_groups():
        owner = models[g.members[0].model].get_submodule(g.members[0].layer)
        for m in g.members[1:]:
            layer = models[m.model].get_submodule(m.layer)
            for (_, p), (_, q) in zip(owner.named_parameters(recurse=False), layer.named_parameters(recurse=False)):
                assert p.untyped_storage().data_ptr() == q.untyped_storage().data_ptr()
            # batch-norm statistics stay per model
            for b, c in zip(owner.buffers(recurse=False), layer.buffers(recurse=False)):
                if b.numel() > 1:
                    assert b.data_ptr() != c.data_ptr()
    assert unique_param_bytes(models.values()) == analysis.total_param_bytes - plan.merged_savings_bytes


def test_a_shared_layer_gets_gradients_from_every_user(small):
    w, analysis = small
    plan = propose_plan(w, analysis)
    group = next(g for g in plan.groups if {m.model for m in g.members} == {"a", "b"}
                 and g.signature.startswith("Linear"))  # classifier.0: large gradients at random init
    group.state = GroupState.accepted
    models = _real_models(w)
    apply_plan(models, plan)
    for module in (mod for m in models.values() for mod in m.modules()):
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0  # the three passes below must compute the same function
    shared = models["a"].get_submodule(group.members[0].layer).weight
    x = torch.randn(2, 3, 32, 32)

    def grad_of(*names):
        shared.grad = None
        sum(models[n](x).sum() for n in names).backward()
        return shared.grad.clone()

    ga, gb, gab = grad_of("a"), grad_of("b"), grad_of("a", "b")
    assert ga.abs().max() > 1e-4 and gb.abs().max() > 1e-4
    torch.testing.assert_close(gab, ga + gb)
    # One optimizer step moves the one shared tensor that both models read.
    unique = list({id(p): p for m in models.values() for p in m.parameters()}.values())
    assert len(unique) < sum(len(list(m.parameters())) for m in models.values())
    opt = torch.optim.SGD(unique, lr=0.1)
    before = shared.detach().clone()
    opt.step()
    assert not torch.equal(before, models["b"].get_submodule(group.members[1].layer).weight)


def test_propose_command_writes_a_plan_that_loads(tmp_path, small, capsys):
    from gemel_studio.cli import main

    w, analysis = small
    assert main(["propose", str(w.path), "-o", str(tmp_path / "p.yaml")]) == 0
    assert "proposals to" in capsys.readouterr().out
    plan = load_plan(tmp_path / "p.yaml", w, analysis)
    assert len(plan.groups) == len(analysis.groups)
    assert main(["propose", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "q.yaml")]) == 2
