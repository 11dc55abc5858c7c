"""Initialisations of a shared tensor from all its members (first, mean, Fisher, TIES), batch-norm
statistics recomputed after tying, and the plan fields that choose them (old plans still load)."""

from __future__ import annotations

import pytest
import torch
import yaml
from torch.utils.data import TensorDataset

from gemel_studio.analysis import analyze_workload
from gemel_studio.merging import load_plan, propose_plan, save_plan
from gemel_studio.merging.datasets import ModelData
from gemel_studio.merging.initialise import (combine_fisher, combine_mean, combine_ties, diagonal_fisher,
                                             initialise_groups, recompute_batchnorm)
from gemel_studio.merging.plan import GroupRisk, InitSettings, PlannedGroup, PlannedMember, PretrainedBase
from gemel_studio.workload import load_workload

from .conftest import tv


def test_mean_of_known_tensors():
    a, b, c = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 2.0, 0.0]), torch.tensor([2.0, 5.0, 6.0])
    torch.testing.assert_close(combine_mean([a, b, c]), torch.tensor([2.0, 3.0, 3.0]))


def test_fisher_favours_the_member_with_the_larger_fisher():
    a, b = torch.tensor([0.0, 10.0]), torch.tensor([4.0, 2.0])
    merged = combine_fisher([a, b], [torch.tensor([9.0, 1.0]), torch.tensor([1.0, 3.0])])
    torch.testing.assert_close(merged, torch.tensor([0.4, 4.0]))  # (9*0+1*4)/10, (1*10+3*2)/4
    # Where both Fishers are zero the mean is taken.
    torch.testing.assert_close(combine_fisher([a, b], [torch.zeros(2), torch.zeros(2)]), torch.tensor([2.0, 6.0]))


def test_ties_on_a_known_base_and_task_vectors():
    base = torch.ones(5)
    t1 = torch.tensor([3.0, -1.0, 0.1, 2.0, -2.0])
    t2 = torch.tensor([1.5, 2.0, -0.2, -3.0, -1.0])
    # density 0.6 keeps the 3 largest changes of each: t1 -> [3, 0, 0, 2, -2], t2 -> [1.5, 2, 0, -3, 0];
    # elected signs + + 0 - -; agreeing changes averaged: [2.25, 2, 0, -3, -2].
    merged = combine_ties([base + t1, base + t2], base, density=0.6)
    torch.testing.assert_close(merged, base + torch.tensor([2.25, 2.0, 0.0, -3.0, -2.0]))


def _two_linears():
    torch.manual_seed(0)
    return {"a": torch.nn.Sequential(torch.nn.Linear(4, 3)), "b": torch.nn.Sequential(torch.nn.Linear(4, 3))}


def _group():
    return PlannedGroup(id="g001", signature="Linear", bytes_per_copy=60,
                        members=[PlannedMember(model="a", layer="0"), PlannedMember(model="b", layer="0")])


def _data(x, y):
    return ModelData(train=TensorDataset(x, y), val=TensorDataset(x, y), num_classes=3)


def test_initialise_groups_writes_one_value_into_every_member():
    models = _two_linears()
    wa, wb = models["a"][0].weight.detach().clone(), models["b"][0].weight.detach().clone()
    initialise_groups(models, [_group()], InitSettings(method="mean"))
    torch.testing.assert_close(models["a"][0].weight, (wa + wb) / 2)
    torch.testing.assert_close(models["b"][0].weight, (wa + wb) / 2)
    # first leaves every copy as it is (tying then takes the first member's).
    models = _two_linears()
    initialise_groups(models, [_group()], InitSettings(method="first"))
    assert not torch.equal(models["a"][0].weight, models["b"][0].weight)
    # ties against a base: a member equal to the base contributes no change.
    models = _two_linears()
    base = {n: {k: v.detach().clone() for k, v in m.state_dict().items()} for n, m in models.items()}
    base["b"] = base["a"]
    wa, wb = models["a"][0].weight.detach().clone(), models["b"][0].weight.detach().clone()
    initialise_groups(models, [_group()], InitSettings(method="ties", ties_density=1.0), base=base)
    torch.testing.assert_close(models["a"][0].weight, wb)  # the only non-zero task vector is b's


def test_diagonal_fisher_is_larger_where_the_data_pulls_harder():
    models = _two_linears()
    x = torch.zeros(32, 4)
    x[:, 0] = 5.0  # only the first input feature carries signal
    data = _data(x, torch.randint(0, 3, (32,)))
    params = dict(models["a"].named_parameters())
    fisher = diagonal_fisher(models["a"], data, params, batches=2, batch_size=8)
    assert fisher["0.weight"].shape == (3, 4) and (fisher["0.weight"] >= 0).all()
    assert fisher["0.weight"][:, 0].sum() > 0 and torch.all(fisher["0.weight"][:, 1:] == 0)
    # So in a Fisher merge the first column follows the model whose Fisher is there.
    models["b"][0].weight.data.zero_()
    other = _data(torch.zeros(32, 4), torch.randint(0, 3, (32,)))  # b's data: no signal, zero Fisher
    wa = models["a"][0].weight.detach().clone()
    initialise_groups(models, [_group()], InitSettings(method="fisher", fisher_batches=2),
                      data={"a": data, "b": other})
    torch.testing.assert_close(models["b"][0].weight[:, 0], wa[:, 0])


def test_batchnorm_statistics_are_recomputed_from_the_models_own_data():
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(2)).eval()
    x = torch.randn(40, 2, 4, 4) * 3 + torch.tensor([1.0, -2.0]).view(1, 2, 1, 1)
    assert recompute_batchnorm(model, _data(x, torch.zeros(40, dtype=torch.long)), batches=5, batch_size=8) == 1
    bn = model[0]
    torch.testing.assert_close(bn.running_mean, x.mean((0, 2, 3)), atol=1e-4, rtol=1e-4)
    assert bn.momentum == 0.1 and not bn.training  # as it was


@pytest.fixture
def small(write_workload):
    w = load_workload(write_workload([tv("a", "resnet18", num_classes=3), tv("b", "resnet18", num_classes=2)],
                                     input_size=[3, 16, 16]))
    return w, analyze_workload(w)


def test_plan_round_trips_the_new_fields_and_old_plans_load(tmp_path, small):
    w, analysis = small
    plan = propose_plan(w, analysis)
    assert plan.version == 2 and plan.init.method == "mean" and plan.init.recompute_bn
    plan.init = InitSettings(method="ties", base=PretrainedBase(architecture="resnet18", weights="IMAGENET1K_V1"),
                             ties_density=0.3, bn_batches=5)
    plan.groups[0].risk = GroupRisk(cka=0.93, drop={"a": 0.01, "b": 0.2}, init="mean")
    plan.groups[-1].risk = GroupRisk(cka=0.5, joint_drop={"a": 0.07, "b": 0.0}, joint_groups=12, init="mean")
    save_plan(plan, tmp_path / "plan.yaml")
    again = load_plan(tmp_path / "plan.yaml", w, analysis)
    assert again == plan and again.groups[0].risk.max_drop == 0.2
    assert again.groups[-1].risk.max_drop is None and again.groups[-1].risk.max_joint_drop == 0.07
    assert again.groups[-1].risk.joint_groups == 12 and not again.groups[0].risk.joint_drop
    # A version-1 plan (no init, no risk) loads as GEMEL's tying: first member, statistics kept.
    data = yaml.safe_load((tmp_path / "plan.yaml").read_text())
    data["version"] = 1
    del data["init"]
    for g in data["groups"]:
        g.pop("risk")
    data["retraining"].pop("check_before_training")
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(data))
    old = load_plan(tmp_path / "old.yaml", w, analysis)
    assert old.init.method == "first" and not old.init.recompute_bn and old.groups[0].risk is None


def test_a_new_plan_starts_with_ties_against_the_models_common_weights_else_the_mean(write_workload, tmp_path):
    from gemel_studio.merging.plan import default_init
    from gemel_studio.workload import CheckpointSource

    plain = load_workload(write_workload([tv("a", "resnet18", num_classes=3), tv("b", "resnet18", num_classes=2)],
                                         input_size=[3, 16, 16]))
    assert default_init(plain) == InitSettings(method="mean")
    named = plain.model_copy(deep=True)
    for spec in named.models:
        spec.source.weights = "IMAGENET1K_V1"
    init = default_init(named)
    assert init.method == "ties" and init.base == PretrainedBase(architecture="resnet18", weights="IMAGENET1K_V1")
    # A fine-tuned checkpoint that records what it was fine-tuned from counts as that base.
    for spec in named.models:
        spec.source = CheckpointSource(kind="checkpoint", architecture="resnet18", path=tmp_path / f"{spec.name}.pt",
                                       finetuned_from="IMAGENET1K_V1")
    assert default_init(named) == init
    # Two different bases: no common one, so the mean.
    named.models[1].source.finetuned_from = "IMAGENET1K_V2"
    assert default_init(named) == InitSettings(method="mean")
