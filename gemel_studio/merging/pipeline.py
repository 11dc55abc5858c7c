"""From a workload and a plan to a merged workload on disk: the functions behind
`gemel finetune` and `gemel merge` (and, later, the studio's retraining screen).

`merge_workload` measures each model's unmerged accuracy on its held-out split (for a model
whose dataset says `labels: distill`, agreement with its own predictions, so 1.0), derives the
targets, runs the search, and writes to the output folder: `merged.safetensors` (every
shared tensor once, with a map of which model uses which tensor), `plan.yaml` (the final
states), `report.json`, `workload.yaml` (the workload, its relative paths rebased, so
that `gemel export` needs nothing else), and the search state that a rerun resumes from.
"""

from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..analysis import WorkloadAnalysis, analyze_workload
from ..errors import GemelError
from ..options import validate
from ..models import build_model
from ..models.zoo import construct
from ..preprocessing import pinned
from ..progress import Progress
from ..workload import PATH_FIELDS, CheckpointSource, TorchvisionSource, Workload, save_workload
from .datasets import ModelData, distill, load_model_data
from .folder import WEIGHTS, MergedFolder, save_shared_weights
from .heuristic import SearchResult, Step, search
from .initialise import load_base
from .labels import labels_of
from .options import MergeOptions, RetrainSettings
from .plan import GroupState, MergePlan, save_plan, validate_plan
from .report import MergeReport, ModelOutcome
from .retrain import evaluate, joint_retrain, metric_name, resolve_device
from .tying import apply_plan, unique_param_bytes


@dataclass
class MergeContext:
    workload: Workload
    analysis: WorkloadAnalysis
    names: list[str]  # models that take part (members of the plan's groups)
    base_state: dict[str, dict[str, torch.Tensor]]
    data: dict[str, ModelData]
    unmerged_accuracy: dict[str, float]
    targets: dict[str, float]

    def build_models(self) -> dict[str, torch.nn.Module]:
        """Fresh, untied models with random weights (callers load a state into them)."""
        out = {}
        for name in self.names:
            spec = self.workload.model(name)
            out[name] = construct(spec.source.architecture, spec.num_classes, "cpu")[0]
        return out


def _participants(plan: MergePlan) -> list[str]:
    names: list[str] = []
    for g in plan.groups:
        if g.state is GroupState.rejected:
            continue
        for m in g.members:
            if m.model not in names:
                names.append(m.model)
    return names


def model_seed(name: str) -> int:
    """The seed a model's random initial weights are drawn from: the same for a name every time
    (Python's own hash is salted per process), so that every measurement of a random-init
    model's unmerged baseline sees the same weights."""
    return zlib.crc32(name.encode("utf-8"))


def build_seeded(workload: Workload, spec):
    """`build_model(materialize=True)` with any random initialisation drawn from `model_seed`,
    leaving torch's global random state as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(model_seed(spec.name))
        return build_model(workload, spec, materialize=True)


def prepare_merge(workload: Workload, plan: MergePlan, *, limit: int | None = None,
                  progress: Progress | None = None, baseline: dict | None = None,
                  measure: bool = True) -> MergeContext:
    """Build, load data and measure each participant's unmerged accuracy. With `baseline` (a
    merged folder's `baseline.json`, which names every participant), the stored accuracies and
    targets are used instead of measuring again: a resumed merge keeps its targets. With
    `measure=False` nothing is evaluated and the context has no accuracies or targets (the
    merge risk measures its own)."""
    progress = progress or Progress()
    stored = (baseline or {}).get("models", {})
    analysis = analyze_workload(workload, alignment=plan.alignment)
    validate_plan(plan, workload, analysis, origin="plan")
    names = _participants(plan)
    for name in names:
        if not isinstance(workload.model(name).source, (TorchvisionSource, CheckpointSource)):
            raise GemelError(f"model '{name}': merging needs a torchvision or checkpoint source "
                             f"(TorchScript and ONNX are analysed only); reject its groups in the plan")
    device = resolve_device(plan.retraining.device)
    progress.start(len(names), "measuring unmerged accuracy" if measure else "loading the models and their data")
    base_state, data, accuracy, targets = {}, {}, {}, {}
    for name in names:
        spec = workload.model(name)
        module = build_seeded(workload, spec).module
        base_state[name] = {k: v.detach().clone() for k, v in module.state_dict().items()}
        data[name] = load_model_data(workload, spec, limit=limit)
        if spec.dataset.labels == "distill":
            data[name] = distill(module, data[name], device, score_threshold=spec.dataset.score_threshold)
        if set(names) <= set(stored):
            accuracy[name], targets[name] = stored[name]["unmerged_accuracy"], stored[name]["target"]
            progress.step(f"{name}: unmerged accuracy {accuracy[name]:.3f} (measured when this merge began)")
            continue
        if not measure:
            progress.step(f"{name}: loaded")
            continue
        accuracy[name] = evaluate(module.to(device), data[name].val, device, task=data[name].task)
        targets[name] = (spec.target.absolute if spec.target.absolute is not None
                         else spec.target.relative * accuracy[name])
        progress.step(f"{name}: unmerged accuracy {accuracy[name]:.3f}")
    return MergeContext(workload, analysis, names, base_state, data, accuracy, targets)


def task_heads(workload: Workload, analysis: WorkloadAnalysis, plan: MergePlan) -> set[str]:
    """Ids of the plan's groups that tie classifiers' output layers across models with different
    tasks: each member is the last layer with weights its model runs (in the analysis' execution
    order, the model's own root left out: ViT's class token sits there), and the members' class
    names differ (the workload's, else the dataset's, else the weights'; as the bundle names
    them). Shapes can match by chance (two 3-class questions); tying such heads makes two tasks
    read the same logits, which retraining then has to pull apart. Detectors' heads are not
    looked for (their last layer is the box regression, not the class logits)."""
    last: dict[str, str] = {}
    for inv in analysis.models:
        ran = [layer.name for layer in inv.layers if layer.param_bytes > 0 and layer.executed and layer.name]
        if ran and inv.task == "classification":
            last[inv.name] = ran[-1]
    out = set()
    for g in plan.groups:
        if not all(last.get(m.model) == m.layer for m in g.members):
            continue
        labels = [labels_of(workload, workload.model(m.model)) for m in g.members]
        if any(names != labels[0] for names in labels[1:]):
            out.add(g.id)
    return out


def write_merged_folder(out_dir: Path, workload: Workload, models: dict[str, torch.nn.Module], plan,
                        report: MergeReport | dict | None = None) -> int:
    """What `gemel export` reads: merged.safetensors (each shared tensor once), plan.yaml, a copy
    of the workload (beside the weights, the folder is self-contained; a copy, so the caller's
    workload keeps standing for its own file) and, when given, report.json. Returns the bytes
    of parameter data written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = write_merged_weights(models, out_dir / WEIGHTS)
    save_plan(plan, out_dir / "plan.yaml")
    save_workload(workload.model_copy(deep=True), out_dir / "workload.yaml")
    if report is not None:
        MergedFolder(out_dir).write_report(report)
    return written


def write_merged_weights(models: dict[str, torch.nn.Module], path: Path) -> int:
    """One safetensors file with each distinct storage once; its metadata maps every model's
    tensor names to the stored key. Returns the bytes of parameter data written."""
    tensors: dict[str, torch.Tensor] = {}
    by_storage: dict[int, str] = {}
    mapping: dict[str, dict[str, str]] = {}
    for name, model in models.items():
        mapping[name] = {}
        for key, t in model.state_dict(keep_vars=True).items():
            ptr = t.untyped_storage().data_ptr()
            if ptr not in by_storage:
                by_storage[ptr] = f"{name}.{key}"
                tensors[by_storage[ptr]] = t.detach().cpu().contiguous()
            mapping[name][key] = by_storage[ptr]
    save_shared_weights(path, tensors, mapping)
    return unique_param_bytes(models.values())


def _atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def merge_options(plan: MergePlan, options: MergeOptions | None = None, *, strategy: str | None = None,
                  time_budget_s: float | None = None, limit: int | None = None) -> MergeOptions:
    """`options` (default: the bisect search with the plan's retraining settings) with the
    keywords that are given replacing its fields; validated, so a bad value is one line."""
    values = (options or MergeOptions(retraining=plan.retraining)).model_dump()
    values.update({k: v for k, v in {"strategy": strategy, "limit": limit}.items() if v is not None})
    if time_budget_s is not None:
        values["retraining"]["time_budget_s"] = time_budget_s
    return validate(MergeOptions, values)


def merge_workload(workload: Workload, plan: MergePlan, out_dir: Path, options: MergeOptions | None = None, *,
                   strategy: str | None = None, time_budget_s: float | None = None, limit: int | None = None,
                   progress: Progress | None = None, on_step=None, on_epoch=None, on_targets=None) -> MergeReport:
    """Apply, retrain and write the merged workload; a rerun with the same folder resumes.

    `options` says how (see `merge_options`: its retraining settings replace the plan's);
    `strategy`, `time_budget_s` and `limit` are shorthands for its fields.
    `on_targets({model: (unmerged accuracy, target)})` is called once the unmerged accuracy
    is measured, before retraining starts; `on_step` after every round, `on_epoch` after
    every epoch of retraining."""
    options = merge_options(plan, options, strategy=strategy, time_budget_s=time_budget_s, limit=limit)
    plan = plan.model_copy(update={"retraining": options.settings})
    strategy, limit = options.strategy, options.limit
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    folder = MergedFolder(out_dir)
    # The baseline is measured once per merge: a resume (a checkpoint is there) reuses it.
    baseline = folder.baseline() if folder.has_checkpoint else None
    ctx = prepare_merge(workload, plan, limit=limit, progress=progress, baseline=baseline)
    if baseline is None or not set(ctx.names) <= set(baseline["models"]):
        folder.write_baseline(ctx.unmerged_accuracy, ctx.targets)
    if on_targets:
        on_targets({n: (ctx.unmerged_accuracy[n], ctx.targets[n]) for n in ctx.names})
    result: SearchResult = search(ctx.build_models, ctx.base_state, plan, ctx.data, ctx.targets, strategy,
                                  progress=progress, time_budget_s=plan.retraining.time_budget_s,
                                  on_step=on_step, state_path=out_dir / "search.state", on_epoch=on_epoch,
                                  init_base=load_base(workload, ctx.names, plan.init)
                                  if plan.init.method == "ties" else None, unmerged=ctx.unmerged_accuracy,
                                  defer=task_heads(workload, ctx.analysis, plan) if strategy == "predict" else ())
    if progress is not None:
        progress.check()  # a pause or cancel during the last round: the search state is saved, resume writes
    models = ctx.build_models()
    for name, m in models.items():
        m.load_state_dict(result.state[name])
    # Only what retraining verified is merged: groups the search left untried stay apart.
    kept = [g for g in result.plan.groups if g.state is GroupState.kept]
    apply_plan(models, result.plan.model_copy(update={"groups": kept}))
    device = resolve_device(plan.retraining.device)
    merged_accuracy = {n: evaluate(models[n].to(device), ctx.data[n].val, device, task=ctx.data[n].task)
                       for n in ctx.names}
    unmerged_test, merged_test = unseen_accuracy(ctx, models, device)
    for m in models.values():
        m.to("cpu")
    written = write_merged_folder(out_dir, workload, models, result.plan)
    participants_bytes = sum(ctx.analysis.model(n).param_bytes for n in ctx.names)
    bound = ctx.analysis.max_savings_bytes
    report = MergeReport(
        workload=workload.name, strategy=strategy, stopped=result.stopped, device=str(device),
        models={n: ModelOutcome(labels=ctx.workload.model(n).dataset.labels,  # distill: accuracy = agreement
                                metric=metric_name(ctx.data[n].task),
                                unmerged_accuracy=ctx.unmerged_accuracy[n], merged_accuracy=merged_accuracy[n],
                                target=ctx.targets[n], passed=merged_accuracy[n] >= ctx.targets[n] - 1e-9,
                                unmerged_test_accuracy=unmerged_test.get(n), merged_test_accuracy=merged_test.get(n))
                for n in ctx.names},
        bytes_before=ctx.analysis.total_param_bytes,
        bytes_after=ctx.analysis.total_param_bytes - participants_bytes + written,
        predicted_bytes_after=ctx.analysis.total_param_bytes - result.saved_bytes,
        saved_bytes=result.saved_bytes, all_shareable_bytes=bound,
        fraction_of_bound=result.saved_bytes / bound if bound else 0,
        retrain_seconds=result.retrain_seconds, rounds=len(result.steps),
        wall_seconds=time.monotonic() - started, steps=[asdict(s) for s in result.steps])
    folder.write_report(report)
    return report


def unseen_accuracy(ctx: MergeContext, merged: dict[str, torch.nn.Module],
                    device) -> tuple[dict[str, float], dict[str, float]]:
    """Each model's unmerged and merged accuracy on its unseen test split (ModelData.test),
    which neither retraining nor the pass/fail decision used."""
    names = [n for n in ctx.names if ctx.data[n].test is not None]
    if not names:
        return {}, {}
    base = ctx.build_models()
    unmerged, after = {}, {}
    for n in names:
        base[n].load_state_dict(ctx.base_state[n])
        unmerged[n] = evaluate(base[n].to(device), ctx.data[n].test, device, task=ctx.data[n].task)
        after[n] = evaluate(merged[n].to(device), ctx.data[n].test, device, task=ctx.data[n].task)
        base[n].to("cpu")
    return unmerged, after


def finetune_workload(workload: Workload, out_dir: Path, settings: RetrainSettings, *, limit: int | None = None,
                      progress: Progress | None = None, on_epoch=None) -> dict:
    """Train each model alone on its dataset (the unmerged baseline) and write a workload whose
    models load the results: `out_dir/workload.yaml` and one safetensors file per model.
    `on_epoch(EpochRecord)` is called after every epoch of every model (its dicts name the model)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    new = workload.model_copy(deep=True)
    new.path = (out_dir / "workload.yaml").resolve()
    # Sources and datasets keep pointing at the same files from the new folder (a fine-tuned
    # model's source is replaced below; synthetic datasets have no files).
    for spec, orig in zip(new.models, workload.models):
        for part, orig_part in ((spec.source, orig.source), (spec.dataset, orig.dataset)):
            for field in PATH_FIELDS:  # path, and a box dataset's images, annotations, label_dir, data
                path = getattr(part, field, None)
                if path is not None and not Path(path).is_absolute():
                    setattr(part, field, Path(os.path.relpath(workload.resolve(getattr(orig_part, field)),
                                                              out_dir.resolve())))
    summary = {}
    for spec in new.models:
        if spec.dataset is not None and spec.dataset.labels == "distill":
            summary[spec.name] = {"skipped": "distill: already trained; fine-tuning needs ground truth"}
            continue
        if spec.dataset is None or not isinstance(spec.source, (TorchvisionSource, CheckpointSource)):
            summary[spec.name] = {"skipped": "no dataset or not a torchvision/checkpoint source"}
            continue
        module = build_seeded(workload, workload.model(spec.name)).module
        data = load_model_data(workload, workload.model(spec.name), limit=limit)
        result = joint_retrain({spec.name: module}, {spec.name: data}, {spec.name: 1.0}, settings,
                               progress=progress, early_stop=False, on_epoch=on_epoch)
        path = out_dir / f"{spec.name}.safetensors"
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(path.with_name(path.name + ".tmp")))
        os.replace(path.with_name(path.name + ".tmp"), path)
        # The checkpoint no longer names the pretrained weights: keep what they prescribed.
        kept = pinned(workload, workload.model(spec.name))
        spec.preprocessing, spec.class_names = kept.preprocessing, kept.class_names
        base = spec.source.weights if isinstance(spec.source, TorchvisionSource) else spec.source.finetuned_from
        spec.source = CheckpointSource(kind="checkpoint", architecture=spec.source.architecture, path=Path(path.name),
                                       finetuned_from=base)
        summary[spec.name] = {"metric": metric_name(data.task), "accuracy": result.accuracy[spec.name],
                              "initial_accuracy": result.initial_accuracy[spec.name],
                              "seconds": result.seconds, "epochs": len(result.history)}
    new.name = f"{workload.name}-finetuned"
    save_workload(new, out_dir / "workload.yaml")
    _atomic_text(out_dir / "finetune.json", json.dumps(summary, indent=2))
    return summary


__all__ = ["MergeContext", "MergeOptions", "MergeReport", "Step", "finetune_workload", "merge_options",
           "merge_workload", "prepare_merge", "write_merged_folder", "write_merged_weights"]
