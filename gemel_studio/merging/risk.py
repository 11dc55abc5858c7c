"""Merge risk per share group, measured without retraining.

Two figures per group, from a few batches of each member model's own data (labels are used
only for the drop; unlabelled frames are enough for the similarity):

- `cka`: linear CKA (Kornblith et al. 2019) between two members' activations at the group's
  layer on the same inputs, the lowest over pairs of members. 1 means the members compute the
  same function there up to rotation and scale; near 0, unrelated ones. Similar layers are
  expected to merge with little loss (Cao et al., arXiv 2410.11233); it is a ranking signal,
  not a promise.
- `drop`: each member's accuracy lost on (up to `eval_limit` samples of) its held-out split
  when this group alone is tied with the plan's init (batch-norm statistics recomputed as the
  init says; measured against the untied model with its statistics re-estimated the same way,
  since a few batches' estimate costs accuracy of its own), before any retraining. A small
  drop means retraining has little to repair; it
  does not add up across groups. The groups too small to be worth a drop of their own (under
  `drop_min_savings`) are tied all together once instead, and each records that joint drop
  (`joint_drop`): what tying the whole tail costs; one group's own drop is usually less.

`gemel propose` records both in the plan (`groups[].risk`); `--no-risk` skips them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Subset

from ..devices import mixed_precision, resolve_device
from ..progress import Progress
from .datasets import ModelData
from .initialise import BN_BATCH_SIZE, _batches, after_tying, batchnorms, initialise_groups, re_estimating
from .plan import GroupRisk, MergePlan, PlannedGroup
from .retrain import evaluate
from .suffix import NotSplittable, SuffixRunner

JOINT = "(together)"  # group_drops' key for the groups measured together


def _centred_gram(x: torch.Tensor) -> torch.Tensor:
    x = x.reshape(x.shape[0], -1).double()
    k = x @ x.T
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype) - 1.0 / n
    return h @ k @ h


def cka_from_grams(k: torch.Tensor, l: torch.Tensor) -> float:  # noqa: E741 - the papers' names
    """Linear CKA from two centred Gram matrices of the same samples."""
    num = (k * l).sum()
    den = k.norm() * l.norm()
    return float(num / den) if den > 0 else 0.0


def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA between features `x` (n, ...) and `y` (n, ...) of the same n samples."""
    if x.shape[0] != y.shape[0]:
        raise ValueError("linear CKA needs the same samples in both: first dimensions differ")
    return cka_from_grams(_centred_gram(x), _centred_gram(y))


@torch.no_grad()
def layer_grams(model: torch.nn.Module, layers: Sequence[str], inputs: torch.Tensor, task: str,
                device: torch.device) -> dict[str, torch.Tensor]:
    """Centred Gram matrices of `model`'s outputs at `layers` on `inputs` (eval mode)."""
    grams: dict[str, torch.Tensor] = {}
    handles = []
    n = inputs.shape[0]

    def hook(name):
        def fn(module, args, out):
            if isinstance(out, torch.Tensor) and out.shape[0] == n:
                grams[name] = _centred_gram(out.detach().float().cpu())
        return fn

    for name in layers:
        handles.append(model.get_submodule(name).register_forward_hook(hook(name)))
    was_training = model.training
    model.eval()
    try:
        model.to(device)
        if task == "detection":
            model([x.to(device) for x in inputs])
        else:
            model(inputs.to(device))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return grams


def _inputs(data: ModelData, count: int) -> torch.Tensor:
    return torch.stack([data.train[i][0] for i in range(min(count, len(data.train)))])


def group_cka(models: Mapping[str, torch.nn.Module], data: Mapping[str, ModelData], groups: Sequence[PlannedGroup],
              per_model: int = 16, device: torch.device | str = "cpu",
              progress: Progress | None = None) -> dict[str, float | None]:
    """For each group, the lowest linear CKA over pairs of its members, on inputs pooled from
    every member's data (`per_model` samples each) that share its input shape. None where the
    members' inputs or outputs cannot be compared. One progress step per model (its forward
    pass is the cost); a cancel stops before the next model."""
    device = torch.device(device)
    progress = progress or Progress()
    names = sorted({m.model for g in groups for m in g.members if m.model in data})
    by_shape: dict[tuple, list[str]] = {}
    samples = {n: _inputs(data[n], per_model) for n in names}
    for n in names:
        by_shape.setdefault(tuple(samples[n].shape[1:]), []).append(n)
    pooled = {shape: torch.cat([samples[n] for n in ns]) for shape, ns in by_shape.items()}
    shape_of = {n: tuple(samples[n].shape[1:]) for n in names}
    grams: dict[str, dict[str, torch.Tensor]] = {}
    progress.start(len(names), "merge risk: layer similarity (CKA), model by model")
    for n in names:
        progress.check()
        layers = [m.layer for g in groups for m in g.members if m.model == n]
        grams[n] = layer_grams(models[n], layers, pooled[shape_of[n]], data[n].task, device)
        progress.step(f"{n}: activations at {len(layers)} layer(s)")
    out: dict[str, float | None] = {}
    for g in groups:
        members = [m for m in g.members if m.model in grams]
        if len(members) < 2 or len({shape_of[m.model] for m in members}) > 1:
            out[g.id] = None
            continue
        values = []
        for i, a in enumerate(members):
            for b in members[i + 1:]:
                ka, kb = grams[a.model].get(a.layer), grams[b.model].get(b.layer)
                if ka is None or kb is None:
                    continue
                values.append(cka_from_grams(ka, kb))
        out[g.id] = min(values) if values else None
    return out


def group_drops(build_models, base_state: Mapping[str, Mapping[str, torch.Tensor]], data: Mapping[str, ModelData],
                groups: Sequence[PlannedGroup], plan: MergePlan, *, eval_limit: int = 256, bn_batches: int = 3,
                init_base=None, device: torch.device | str = "cpu", progress: Progress | None = None,
                together: Sequence[PlannedGroup] = (), partial: bool = True,
                max_bytes: int = 512 << 20) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """For each group alone: each member's accuracy before minus after tying it with the plan's
    init (no retraining); where the init re-estimates batch-norm statistics, "before" is the
    untied model with its statistics re-estimated the same way, so that the drop is the tie's
    alone. `together`: groups measured once, all tied at the same time, under the key JOINT.
    `partial`: a classifier that torch.fx can trace runs only from the first tied layer on
    (merging/suffix.py; the same figures, bit for bit), its activations before it recorded in the
    reference passes, at most `max_bytes` a model. Returns ({group id or JOINT: {model: drop}},
    {model: unmerged accuracy})."""
    device = torch.device(device)
    progress = progress or Progress()
    init = plan.init.model_copy(update={"bn_batches": min(plan.init.bn_batches, bn_batches)})
    progress.check()  # a cancel during an earlier stage stops before this one builds anything
    models = build_models()
    names = sorted({m.model for g in [*groups, *together] for m in g.members} & set(models) & set(data))
    val = {n: Subset(data[n].val, range(min(eval_limit, len(data[n].val)))) for n in names}
    usable = [g for g in together if {m.model for m in g.members} <= set(names)]
    blocks = [[g] for g in groups if {m.model for m in g.members} <= set(names)] + ([usable] if usable else [])
    before = {}
    for n in names:
        progress.check()
        models[n].load_state_dict(base_state[n])
        models[n].to(device)
        before[n] = evaluate(models[n], val[n], device, task=data[n].task)
    runners = _runners(models, names, data, blocks, max_bytes) if partial else {}
    # A drop is measured against the untied model with its statistics re-estimated the same way
    # (the same batches): a few batches' estimate loses accuracy of its own (8.6 points of the
    # quick start's count model with 3 batches, 0.8 with 20), and that is not the tie's.
    reference = dict(before)
    labels: dict[str, list[torch.Tensor]] = {}
    for n in names:
        progress.check()
        if n in runners:
            try:
                reference[n], labels[n] = _record(runners[n], models[n], data[n], val[n], init, device)
                models[n].load_state_dict(base_state[n])  # as the whole path leaves it (a Fisher init reads it)
                continue
            except (NotSplittable, RuntimeError):  # too much to record, or out of (GPU) memory: run it whole
                runners.pop(n).clear()
                models[n].load_state_dict(base_state[n])
        if init.recompute_bn:
            after_tying(models, [n], init, data, device=device)
            reference[n] = evaluate(models[n], val[n], device, task=data[n].task)
            models[n].load_state_dict(base_state[n])

    def drop_of(block: Sequence[PlannedGroup]) -> dict[str, float]:
        """Tie `block` with the init, measure every member's drop, give the weights back."""
        members = sorted({m.model for g in block for m in g.members})
        initialise_groups(models, list(block), init, data, init_base, device=device)
        if init.method == "first":  # tying gives every member the first member's copy
            with torch.no_grad():
                for g in block:
                    owner = models[g.members[0].model].get_submodule(g.members[0].layer)
                    for m in g.members[1:]:
                        layer = models[m.model].get_submodule(m.layer)
                        for pname, p in owner.named_parameters(recurse=False):
                            getattr(layer, pname).copy_(p)
        out = {}
        for n in members:
            if n in runners:
                layers = [m.layer for g in block for m in g.members if m.model == n]
                try:
                    out[n] = reference[n] - _replay(runners[n], models[n], layers, labels[n], init, device)
                    continue
                except RuntimeError:  # out of (GPU) memory in the traced graph: this model runs whole from now on
                    runners.pop(n).clear()
                    if not init.recompute_bn:  # the reference was the recorded pass: make it whole again
                        reference[n] = before[n]
            after_tying(models, [n], init, data, device=device)
            out[n] = reference[n] - evaluate(models[n], val[n], device, task=data[n].task)
        for n in members:
            models[n].load_state_dict(base_state[n])
        return out

    drops: dict[str, dict[str, float]] = {}
    progress.start(len(groups) + (1 if usable else 0), "merge risk: each group tied alone")
    for g in groups:
        progress.check()
        if not {m.model for m in g.members} <= set(names):
            progress.step(f"{g.id}: skipped (a member has no data)")
            continue
        drops[g.id] = drop_of([g])
        progress.step(f"{g.id}: largest drop {max(drops[g.id].values()):+.3f}")
    if usable:
        progress.check()
        drops[JOINT] = drop_of(usable)
        progress.step(f"the {len(usable)} small groups tied together: largest drop {max(drops[JOINT].values()):+.3f}")
    return drops, before


def _runners(models, names, data, blocks, max_bytes) -> dict[str, SuffixRunner]:
    """A SuffixRunner per classifier that can be split at every block's cut."""
    out = {}
    for n in names:
        if data[n].task != "classification":
            continue
        layer_sets = [[m.layer for g in block for m in g.members if m.model == n] for block in blocks]
        model = models[n]
        was_training = model.training
        model.eval()  # traced in eval mode: what the measurement runs (a traced `self.training` is fixed)
        try:
            out[n] = SuffixRunner(model, [s for s in layer_sets if s], max_bytes=max_bytes)
        except NotSplittable:
            pass
        finally:
            model.train(was_training)
    return out


@torch.no_grad()
def _record(runner: SuffixRunner, model: torch.nn.Module, data: ModelData, val, init, device: torch.device):
    """The reference passes, whole, as `after_tying` and `evaluate` make them (statistics
    re-estimated from the same batches where the init says so, then the held-out samples),
    recording the cuts' activations. Returns the accuracy and the held-out labels by batch."""
    runner.clear()
    if init.recompute_bn:
        with re_estimating(model, batchnorms(model)):
            for x, _ in _batches(data.train, data.task, BN_BATCH_SIZE, init.bn_batches):
                runner.record(x.to(device))
    model.eval()
    batches = list(DataLoader(val, batch_size=256))  # evaluate's batches
    labels = [y for _, y in batches]
    return _accuracy(labels, lambda i: runner.record(batches[i][0].to(device)), device), labels


@torch.no_grad()
def _replay(runner: SuffixRunner, model: torch.nn.Module, layers, labels, init, device: torch.device) -> float:
    """The tied model's accuracy from the recorded passes, only the nodes from the cut before
    `layers` run (the batch-norm layers after it re-estimated from the same batches)."""
    k = init.bn_batches if init.recompute_bn else 0
    k = min(k, len(runner.recorded) - len(labels))
    if init.recompute_bn:
        with re_estimating(model, runner.batchnorms_after(layers)):
            for i in range(k):
                runner.run_from(layers, i)
    model.eval()
    return _accuracy(labels, lambda i: runner.run_from(layers, k + i), device)


def _accuracy(labels: list[torch.Tensor], outputs, device: torch.device) -> float:
    """Top-1 accuracy of `outputs(i)` (held-out batch i's logits, run as `retrain.evaluate` runs
    them) against `labels[i]`."""
    correct = total = 0
    for i, y in enumerate(labels):
        with mixed_precision(device):
            out = outputs(i)
        correct += (out.argmax(1).cpu() == y).sum().item()
        total += len(y)
    return correct / total if total else 0.0


def measure_risk(workload, plan: MergePlan, *, limit: int | None = None, per_model: int = 16, eval_limit: int = 256,
                 drop_min_savings: int = 0, progress: Progress | None = None,
                 partial: bool = True) -> tuple[MergePlan, list[str]]:
    """A copy of `plan` with `risk` filled in for every group whose members can be retrained
    (a torchvision or checkpoint source and a dataset): CKA for each, the drop for groups that
    save at least `drop_min_savings` bytes (each costs a few forward passes of its members).
    Returns it and notes on what was skipped. Every stage (loading, CKA, drop)
    reports to `progress` and stops at its next step once it is cancelled (raising Cancelled).
    `partial`: group_drops' (False: every drop from whole passes; the same figures, slower)."""
    from ..workload import CheckpointSource, TorchvisionSource
    from .initialise import load_base
    from .pipeline import prepare_merge

    progress = progress or Progress()
    notes: list[str] = []
    usable = {s.name for s in workload.models
              if s.dataset is not None and isinstance(s.source, (TorchvisionSource, CheckpointSource))}
    groups = [g for g in plan.groups if {m.model for m in g.members} <= usable]
    if len(groups) < len(plan.groups):
        notes.append(f"{len(plan.groups) - len(groups)} group(s) without risk: a member has no dataset "
                     "or is TorchScript/ONNX")
    out = plan.model_copy(deep=True)
    if not groups:
        return out, notes
    sub = plan.model_copy(update={"groups": groups})
    ctx = prepare_merge(workload, sub, limit=limit, progress=progress, measure=False)  # the drops measure their own
    device = resolve_device(plan.retraining.device)
    models = ctx.build_models()
    for n, m in models.items():
        m.load_state_dict(ctx.base_state[n])
    cka = group_cka(models, ctx.data, groups, per_model=per_model, device=device, progress=progress)
    del models
    progress.check()  # the drop stage (and a TIES base load) only starts if not cancelled
    base = load_base(workload, ctx.names, plan.init) if plan.init.method == "ties" else None
    heavy = [g for g in groups if g.savings_bytes >= drop_min_savings]
    small = [g for g in groups if g.savings_bytes < drop_min_savings]
    if small:
        notes.append(f"{len(small)} group(s) saving under {drop_min_savings} bytes: tied all together for one "
                     "joint drop, none of their own")
    drops, _ = group_drops(ctx.build_models, ctx.base_state, ctx.data, heavy, plan, eval_limit=eval_limit,
                           init_base=base, device=device, progress=progress, together=small, partial=partial)
    joint, small_ids = drops.get(JOINT, {}), {g.id for g in small}
    by_id = {g.id: g for g in out.groups}
    for g in groups:
        members = {m.model for m in g.members}
        shared = {k: round(v, 4) for k, v in joint.items() if k in members} if g.id in small_ids else {}
        by_id[g.id].risk = GroupRisk(cka=None if cka.get(g.id) is None else round(cka[g.id], 4),
                                     drop={k: round(v, 4) for k, v in drops.get(g.id, {}).items()},
                                     init=plan.init.method, joint_drop=shared,
                                     joint_groups=len(small) if shared else 0)
    return out, notes


__all__ = ["JOINT", "cka_from_grams", "group_cka", "group_drops", "layer_grams", "linear_cka", "measure_risk"]
