"""Merge risk per group without retraining: linear CKA and the accuracy drop of a group tied alone."""

from __future__ import annotations

import pytest
import torch

from gemel_studio.merging import load_plan
from gemel_studio.merging.risk import linear_cka
from gemel_studio.workload import load_workload

from .conftest import tv


def test_cka_of_a_layer_with_itself_is_one_and_of_independent_features_near_zero():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 8, generator=g)
    assert linear_cka(x, x) == pytest.approx(1.0)
    # Invariant to rotation and scale: the same function up to them is as similar.
    q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    assert linear_cka(x, 3.0 * x @ q) == pytest.approx(1.0)
    y = torch.randn(2000, 8, generator=g)
    assert linear_cka(x, y) < 0.05
    # Activations of any shape are flattened per sample.
    assert linear_cka(torch.randn(50, 2, 3, 3, generator=g), torch.randn(50, 4, generator=g)) < 0.5


def test_propose_records_risk_per_group_and_no_risk_skips_it(tmp_path, write_workload):
    from gemel_studio.analysis import analyze_workload
    from gemel_studio.cli import main

    entries = [tv(t, "resnet18", num_classes=n, dataset={"kind": "synthetic", "task": t, "samples": 40, "seed": i})
               for i, (t, n) in enumerate([("color", 3), ("shape", 3)])]
    w = load_workload(write_workload(entries, input_size=[3, 16, 16]))
    analysis = analyze_workload(w)
    assert main(["propose", str(w.path), "-o", str(tmp_path / "plain.yaml"), "--no-risk"]) == 0
    assert all(g.risk is None for g in load_plan(tmp_path / "plain.yaml", w, analysis).groups)
    assert main(["propose", str(w.path), "-o", str(tmp_path / "risk.yaml"), "--init", "mean",
                 "--risk-min-fraction", "0.05", "--limit", "20"]) == 0
    plan = load_plan(tmp_path / "risk.yaml", w, analysis)
    assert plan.init.method == "mean"
    bound = sum(g.savings_bytes for g in plan.groups)
    for g in plan.groups:  # CKA for every group, the drop for those saving at least 5% of the bound
        assert g.risk is not None and g.risk.init == "mean" and -1.0 <= g.risk.cka <= 1.0 + 1e-6
        heavy = g.savings_bytes >= int(0.05 * bound)
        assert set(g.risk.drop) == ({"color", "shape"} if heavy else set())
        assert all(-1.0 <= d <= 1.0 for d in g.risk.drop.values())
    assert any(g.risk.drop for g in plan.groups)
    # The small groups: one drop measured with all of them tied together, recorded by each for its members.
    small = [g for g in plan.groups if g.savings_bytes < int(0.05 * bound)]
    assert small
    for g in plan.groups:
        expected = {m.model for m in g.members} if g in small else set()
        assert set(g.risk.joint_drop) == expected and g.risk.joint_groups == (len(small) if g in small else 0)
    # Two independently initialised ResNet-18s: their first convolutions compute different features.
    conv1 = next(g for g in plan.groups if g.members[0].layer == "conv1")
    assert conv1.risk.cka < 0.99
    assert main(["propose", str(w.path), "-o", str(tmp_path / "t.yaml"), "--init", "ties"]) == 2  # no base named


@pytest.fixture
def three_resnets(write_workload):
    from gemel_studio.analysis import analyze_workload
    from gemel_studio.merging import propose_plan

    entries = [tv(t, "resnet18", num_classes=n, dataset={"kind": "synthetic", "task": t, "samples": 40, "seed": i})
               for i, (t, n) in enumerate([("color", 3), ("shape", 3), ("size", 3)])]
    w = load_workload(write_workload(entries, input_size=[3, 16, 16]))
    analysis = analyze_workload(w)
    return w, propose_plan(w, analysis), analysis.max_savings_bytes


class _Recorder:
    """A progress callback that keeps (stage, done, total, message), the stage being the
    message of the last `start()` (done == 0)."""

    def __init__(self, on_update=None):
        self.updates: list[tuple[str, int, int, str]] = []
        self.stage = ""
        self.on_update = on_update

    def __call__(self, done, total, message):
        if done == 0:
            self.stage = message
        self.updates.append((self.stage, done, total, message))
        if self.on_update:
            self.on_update(self.stage, done)

    def steps(self, word: str) -> list[int]:
        return [d for stage, d, _, _ in self.updates if word in stage and d > 0]


def test_measure_risk_reports_the_cka_stage_model_by_model_then_the_drop(three_resnets):
    from gemel_studio.merging.risk import measure_risk
    from gemel_studio.progress import Progress

    w, plan, bound = three_resnets
    rec = _Recorder()
    measured, _ = measure_risk(w, plan, limit=20, per_model=8, eval_limit=16, drop_min_savings=int(0.2 * bound),
                               progress=Progress(rec, min_interval=0))
    assert rec.steps("CKA") == [1, 2, 3]  # one step per model, all three
    cka_total = {t for stage, _, t, _ in rec.updates if "CKA" in stage}
    assert cka_total == {3}
    heavy = sum(g.savings_bytes >= int(0.2 * bound) for g in plan.groups)
    # Each heavy group alone, then one more step: the small ones tied together.
    assert 0 < heavy < len(plan.groups) and rec.steps("tied alone") == list(range(1, heavy + 2))
    stages = [stage for stage, *_ in rec.updates]
    last_cka = max(i for i, s in enumerate(stages) if "CKA" in s)
    assert last_cka < min(i for i, s in enumerate(stages) if "tied alone" in s)  # CKA first, then the drop
    assert all(g.risk is not None and g.risk.cka is not None for g in measured.groups)


def test_a_cancel_during_the_cka_stage_stops_it_before_the_drop_stage(three_resnets, monkeypatch):
    from gemel_studio.errors import Cancelled
    from gemel_studio.merging import risk
    from gemel_studio.progress import Progress

    w, plan, _ = three_resnets
    calls = {"layer_grams": 0, "evaluate": 0}
    real_grams, real_eval = risk.layer_grams, risk.evaluate

    def counted_grams(*a, **k):
        calls["layer_grams"] += 1
        return real_grams(*a, **k)

    def counted_eval(*a, **k):
        calls["evaluate"] += 1
        return real_eval(*a, **k)

    monkeypatch.setattr(risk, "layer_grams", counted_grams)
    monkeypatch.setattr(risk, "evaluate", counted_eval)
    held: dict[str, Progress] = {}
    # Cancel as the first model's activations are recorded (as the studio's Cancel would, from another thread).
    rec = _Recorder(lambda stage, done: held["progress"].cancel() if "CKA" in stage and done == 1 else None)
    progress = held["progress"] = Progress(rec, min_interval=0)
    with pytest.raises(Cancelled):
        risk.measure_risk(w, plan, limit=20, per_model=8, eval_limit=16, progress=progress)
    assert calls == {"layer_grams": 1, "evaluate": 0}  # the other two models and the drop stage never ran
    assert rec.steps("CKA") == [1] and rec.steps("tied alone") == []


def test_the_joint_drop_of_the_small_groups_is_measured_from_the_unmerged_weights(three_resnets):
    """The heavy groups are measured (and given back) first: the small groups' joint drop must
    equal one measured with nothing else tied before it."""
    from gemel_studio.merging.pipeline import prepare_merge
    from gemel_studio.merging.risk import JOINT, group_drops, measure_risk

    w, plan, bound = three_resnets
    floor = int(0.2 * bound)
    measured, notes = measure_risk(w, plan, limit=20, per_model=8, eval_limit=16, drop_min_savings=floor)
    small = [g for g in plan.groups if g.savings_bytes < floor]
    assert small and any("tied all together" in n for n in notes)
    ctx = prepare_merge(w, plan, limit=20)
    alone, _ = group_drops(ctx.build_models, ctx.base_state, ctx.data, [], plan, eval_limit=16, together=small)
    by_id = {g.id: g for g in measured.groups}
    for g in small:
        assert by_id[g.id].risk.joint_drop == {n: round(d, 4) for n, d in alone[JOINT].items()
                                               if n in {m.model for m in g.members}}
    assert not any(by_id[g.id].risk.joint_drop for g in plan.groups if g.savings_bytes >= floor)


def test_a_tie_that_changes_no_weight_costs_nothing_though_re_estimating_statistics_changes_the_model(
        three_resnets, monkeypatch):
    """The drop is the tie's: measured against the untied model with its batch-norm statistics
    re-estimated from the same batches, not against its trained statistics."""
    from gemel_studio.merging import risk
    from gemel_studio.merging.pipeline import prepare_merge
    from gemel_studio.merging.plan import InitSettings

    w, plan, _ = three_resnets
    plan = plan.model_copy(update={"init": InitSettings(method="first", recompute_bn=True, bn_batches=2)})
    ctx = prepare_merge(w, plan, limit=20)
    group = plan.groups[0]
    owner = group.members[0]
    for m in group.members[1:]:  # the members already hold the same weights there: tying changes nothing
        for name in ("weight", "bias"):
            key = f"{owner.layer}.{name}"
            if key in ctx.base_state[owner.model]:
                ctx.base_state[m.model][f"{m.layer}.{name}"] = ctx.base_state[owner.model][key].clone()

    def statistics(model, data, device, task="classification"):  # a figure that reads the statistics only
        return float(sum(b.running_mean.abs().sum() + (b.running_var - 1).abs().sum() for b in model.modules()
                         if isinstance(b, torch.nn.BatchNorm2d)))

    monkeypatch.setattr(risk, "evaluate", statistics)
    drops, unmerged = risk.group_drops(ctx.build_models, ctx.base_state, ctx.data, [group], plan, eval_limit=8,
                                       bn_batches=2, partial=False)  # the whole passes, which call evaluate
    assert set(drops[group.id]) == {m.model for m in group.members}
    assert all(v == 0.0 for v in drops[group.id].values())  # exactly: the same weights, the same batches
    # ...while re-estimating the statistics alone does change what the figure reads.
    models = ctx.build_models()
    name = group.members[1].model
    models[name].load_state_dict(ctx.base_state[name])
    risk.after_tying(models, [name], plan.init, ctx.data)
    assert statistics(models[name], None, None) != unmerged[name]


@pytest.mark.parametrize("method, recompute", [("mean", True), ("first", False)])
def test_drops_from_the_cut_on_equal_the_whole_passes_and_skip_the_layers_before_it(three_resnets, method,
                                                                                    recompute):
    """merging/suffix.py: each group's drop, measured by running only the nodes from its first
    tied layer on (the activations before it recorded in the reference passes), is the whole
    passes' drop exactly, and the stem is not run again after the reference passes."""
    from gemel_studio.merging import risk
    from gemel_studio.merging.pipeline import prepare_merge
    from gemel_studio.merging.plan import InitSettings

    w, plan, bound = three_resnets
    plan = plan.model_copy(update={"init": InitSettings(method=method, recompute_bn=recompute, bn_batches=2)})
    ctx = prepare_merge(w, plan, limit=40)
    floor = int(0.05 * bound)
    heavy = [g for g in plan.groups if g.savings_bytes >= floor]
    small = [g for g in plan.groups if g.savings_bytes < floor]
    assert heavy and small
    stem_calls = []

    def build():
        models = ctx.build_models()
        for n, m in models.items():
            # the measuring passes (no gradient), not a Fisher init's
            m.conv1.register_forward_hook(lambda *_, n=n: None if torch.is_grad_enabled() else stem_calls.append(n))
        return models

    kwargs = dict(eval_limit=32, bn_batches=2, together=small)
    whole, unmerged = risk.group_drops(build, ctx.base_state, ctx.data, heavy, plan, partial=False, **kwargs)
    whole_calls = len(stem_calls)
    stem_calls.clear()
    cut, unmerged_cut = risk.group_drops(build, ctx.base_state, ctx.data, heavy, plan, **kwargs)
    assert cut == whole and unmerged_cut == unmerged
    assert any(v != 0.0 for d in whole.values() for v in d.values())  # the figures compared say something
    # The reference passes run the stem (the statistics batches and the held-out batch, after the
    # unmerged accuracy's pass); the groups' passes run it only where a group ties the stem itself.
    stem_blocks = [g for g in heavy if any(m.layer == "conv1" for m in g.members)]
    stem_blocks += [small] if any(m.layer == "conv1" for g in small for m in g.members) else []
    members = sum(len({m.model for g in (b if isinstance(b, list) else [b]) for m in g.members})
                  for b in stem_blocks)
    bn = {min(2, -(-len(ctx.data[n].train) // 32)) if recompute else 0 for n in ctx.data}  # statistics batches
    assert len(bn) == 1
    per_pass = bn.pop() + 1  # and one held-out batch (32 samples)
    assert len(stem_calls) == 3 * (1 + per_pass) + members * per_pass
    assert whole_calls > len(stem_calls)


def test_drops_of_a_model_too_large_to_record_are_measured_whole(three_resnets):
    from gemel_studio.merging import risk
    from gemel_studio.merging.pipeline import prepare_merge

    w, plan, _ = three_resnets
    ctx = prepare_merge(w, plan, limit=40)
    groups = plan.groups[:3]
    whole, _ = risk.group_drops(ctx.build_models, ctx.base_state, ctx.data, groups, plan, eval_limit=16,
                                partial=False)
    tiny, _ = risk.group_drops(ctx.build_models, ctx.base_state, ctx.data, groups, plan, eval_limit=16,
                               max_bytes=1)
    assert tiny == whole


def test_a_run_from_the_cut_gives_the_whole_models_output_after_the_tied_layer_changes():
    """Also for a layer inside a module fx keeps whole (nn.MultiheadAttention's out_proj)."""
    from torch import nn

    from gemel_studio.merging.suffix import SuffixRunner

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 4)

        def forward(self, x):
            x = self.bn(self.stem(x)).flatten(2).transpose(1, 2)
            x = x + self.attn(x, x, x, need_weights=False)[0]
            return self.head(x.mean(1))

    torch.manual_seed(0)
    model = Net().eval()
    runner = SuffixRunner(model, [["attn.out_proj"], ["head"], ["bn"]])
    assert runner.cut_of[("bn",)] < runner.cut_of[("attn.out_proj",)] < runner.cut_of[("head",)]
    x = torch.randn(4, 3, 6, 6)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        untied = runner.record(x)
        assert torch.equal(untied, model(x))
        for layer in ("attn.out_proj", "head", "bn"):
            model.get_submodule(layer).weight.mul_(1.5)  # the tie changes the layer after the recording
            changed = model(x)
            assert not torch.equal(changed, untied)  # the change shows at the output...
            assert torch.equal(runner.run_from([layer], 0), changed)  # ...and the run from the cut has it
            model.load_state_dict(state)


def test_a_run_from_the_cut_that_fails_at_run_time_falls_back_to_the_whole_passes(three_resnets, monkeypatch):
    """Out of (GPU) memory in the traced graph: the model is measured whole, the same figures."""
    from gemel_studio.merging import risk
    from gemel_studio.merging.pipeline import prepare_merge
    from gemel_studio.merging.suffix import SuffixRunner

    w, plan, _ = three_resnets
    ctx = prepare_merge(w, plan, limit=40)
    groups = plan.groups[:2]
    whole, _ = risk.group_drops(ctx.build_models, ctx.base_state, ctx.data, groups, plan, eval_limit=16,
                                partial=False)
    calls = []

    def out_of_memory(self, layers, batch):
        calls.append(batch)
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(SuffixRunner, "run_from", out_of_memory)
    fallen, _ = risk.group_drops(ctx.build_models, ctx.base_state, ctx.data, groups, plan, eval_limit=16)
    assert calls and fallen == whole


def test_a_run_from_the_cut_that_writes_in_place_leaves_the_recording_as_it_was():
    from torch import nn

    from gemel_studio.merging.suffix import SuffixRunner

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem, self.head = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.stem(x)
            y = self.head(h)
            h.mul_(2)  # after the cut before `head`: it writes into `h`, which crosses the cut
            return y + h

    torch.manual_seed(0)
    model = Net().eval()
    runner = SuffixRunner(model, [["head"]])
    x = torch.randn(8, 4)
    with torch.no_grad():
        untied = runner.record(x)
        assert torch.equal(untied, model(x))
        for _ in range(2):  # each run starts from the recording of what the reference computed
            assert torch.equal(runner.run_from(["head"], 0), untied)
