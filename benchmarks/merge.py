"""GEMEL's merge heuristic, bisection and the risk-guided search (predict), side by side in
one run, on the quick-start workload (synthetic scenes) and the Fashion-MNIST workload. Prints
one JSON object.

    .venv/bin/python benchmarks/merge.py [--workloads quickstart fashion] [--limit 3000]
                                         [--epochs 10] [--device auto] [--out out/bench-merge]

gemel and bisect run as the reference does (first member's weights, statistics kept, no check
before training); predict runs with a new plan's init (ties against the common ImageNet base on
fashion, the members' mean on quickstart; batch-norm statistics recomputed), the check before training and the merge risk `gemel propose` measures (its
seconds are reported beside predict's retraining seconds, `..._with_risk`). `gemel/init` (run
by default) and `bisect/init` are the reference loops given predict's init and check before
training: the strongest version of the other side, which tells what the init does apart from
the search. Every strategy checks the held-out split `--checks-per-epoch` times an epoch. Also reported, the inits
side by side (`init_comparison`): every model's accuracy on the deciding and unseen splits with
the groups tied (all, or --init-groups N) and no retraining, and with --init-epochs E the
retraining seconds and epochs each init needed to bring every model to its target. Only the
init comparison: `--strategies` with no names. `--compare-risk` times predict's merge risk
measured both ways (every drop from whole forward passes, and from each group's cut on, the
default) and says whether the figures agree (`risk_identical`).

For each workload: fine-tune the unmerged models (once; reused on later runs), measure their
accuracy on the held-out split, propose every share group, then run each strategy from the
same fine-tuned weights and plan into its own folder (started afresh) with the same
retraining settings and seed. Reported per strategy: bytes saved, fraction of the
all-shareable bound, per-model accuracy against target, retraining time, rounds. The device
(CPU model or GPU name) is named in the output.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from analyze import device_name  # noqa: E402
from prepare_fashion import prepare as prepare_fashion  # noqa: E402

from gemel_studio.analysis import analyze_workload  # noqa: E402
from gemel_studio.merging import load_plan, propose_plan, save_plan  # noqa: E402
from gemel_studio.merging.heuristic import STRATEGIES, group_risk  # noqa: E402
from gemel_studio.merging.initialise import after_tying, initialise_groups, load_base  # noqa: E402
from gemel_studio.merging.pipeline import finetune_workload, merge_workload, prepare_merge  # noqa: E402
from gemel_studio.merging.plan import GroupState, InitSettings, PretrainedBase, RetrainSettings  # noqa: E402
from gemel_studio.merging.retrain import evaluate, joint_retrain  # noqa: E402
from gemel_studio.merging.risk import measure_risk  # noqa: E402
from gemel_studio.merging.tying import apply_plan  # noqa: E402

REFERENCE = {"init": InitSettings(method="first", recompute_bn=False), "check_before_training": False}
STRONGER = ("gemel/init", "bisect/init")  # the reference loops with predict's init and check before training
INIT_VARIANTS = ("reference", "first", "mean", "fisher", "ties")
from gemel_studio.merging.retrain import resolve_device  # noqa: E402
from gemel_studio.workload import load_workload  # noqa: E402


def prepare_quickstart(out: Path, *, limit: int | None, epochs: int, device: str) -> dict:
    if not (out / "workload.yaml").exists():
        settings = RetrainSettings(optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=epochs, device=device)
        finetune_workload(load_workload(ROOT / "sample_workloads" / "quickstart.yaml"), out, settings, limit=limit)
    workload = load_workload(out / "workload.yaml")
    if not (out / "plan.yaml").exists():
        save_plan(propose_plan(workload, analyze_workload(workload)), out / "plan.yaml")
    return {"models": json.loads((out / "finetune.json").read_text())}


def gpu_name(device: torch.device) -> str | None:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def seconds_to_reach(steps: list[dict], saved_bytes: int) -> float | None:
    """Retraining seconds a run spent until it had banked at least `saved_bytes`."""
    spent = 0.0
    for step in steps:
        spent += step["retrain_seconds"]
        if step["saved_bytes_after"] >= saved_bytes:
            return round(spent, 1)
    return None if saved_bytes > 0 else 0.0


def spearman(xs: list[float], ys: list[float]) -> float | None:
    """Rank correlation (ties get their mean rank)."""
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    if len(xs) < 2:
        return None
    rx, ry = ranks(xs), ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    num = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    den = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return round(num / den, 3) if den else None


def init_settings(variant: str, base: PretrainedBase | None) -> InitSettings | None:
    """The init a variant names: `reference` is GEMEL's (first member's weights, statistics
    kept); the methods recompute batch-norm statistics, as a plan's init does by default.
    None for ties where the workload states no common base."""
    if variant == "reference":
        return InitSettings(method="first", recompute_bn=False)
    if variant == "ties" and base is None:
        return None
    return InitSettings(method=variant, base=base if variant == "ties" else None)


def compare_inits(workload_path: Path, plan_path: Path, limit: int | None, variants: list[str],
                  base: PretrainedBase | None = None, *, top_groups: int = 0,
                  settings: RetrainSettings | None = None) -> dict:
    """Each init side by side from the same fine-tuned weights: tie the plan's groups (every
    one, or the `top_groups` that save the most bytes), measure every model's accuracy on the
    deciding (held-out) and unseen (test) splits before any retraining, then, with `settings`,
    retrain jointly (same seed and data order for every init; no step when all targets are met
    already) and report the seconds and epochs it took to reach the targets."""
    workload = load_workload(workload_path)
    plan = load_plan(plan_path)
    ctx = prepare_merge(workload, plan, limit=limit)
    device = resolve_device(settings.device if settings else "auto")
    groups = sorted(plan.groups, key=lambda g: -g.savings_bytes)
    groups = [g.model_copy(update={"state": GroupState.accepted}) for g in groups[:top_groups or None]]
    tied_plan = plan.model_copy(update={"groups": groups})

    def accuracy(models, split: str) -> dict[str, float | None]:
        out = {}
        for n in ctx.names:
            data = getattr(ctx.data[n], split)
            out[n] = None if data is None else round(evaluate(models[n], data, device, task=ctx.data[n].task), 4)
        return out

    models = ctx.build_models()
    for n, m in models.items():
        m.load_state_dict(ctx.base_state[n])
        m.to(device)
    out = {"groups_tied": len(groups), "saved_bytes": sum(g.savings_bytes for g in groups),
           "targets": {n: round(t, 4) for n, t in ctx.targets.items()},
           "unmerged": {"val": {n: round(a, 4) for n, a in ctx.unmerged_accuracy.items()},
                        "test": accuracy(models, "test")},
           "retraining": None if settings is None else settings.model_dump(exclude={"time_budget_s"}),
           "inits": {}}
    for variant in variants:
        init = init_settings(variant, base)
        if init is None:
            out["inits"][variant] = {"skipped": "the workload states no common pretrained base"}
            continue
        started = time.perf_counter()
        models = ctx.build_models()
        for n, m in models.items():
            m.load_state_dict(ctx.base_state[n])
            m.to(device)
        base_state = load_base(workload, ctx.names, init) if init.method == "ties" else None
        notes = initialise_groups(models, groups, init, ctx.data, base_state, device=device)
        apply_plan(models, tied_plan)
        after_tying(models, ctx.names, init, ctx.data, device=device)
        row = {"init_seconds": round(time.perf_counter() - started, 1), "val": accuracy(models, "val"),
               "test": accuracy(models, "test")}
        row["at_target"] = sum(row["val"][n] >= ctx.targets[n] for n in ctx.names)
        row["mean_val"] = round(sum(row["val"].values()) / len(ctx.names), 4)
        if notes:
            row["notes"] = sorted(set(notes))[:5]
        if settings is not None:
            result = joint_retrain(models, ctx.data, ctx.targets, settings, check_first=True)
            spent, trained, reached, epochs_to = 0.0, 0.0, None, None
            if result.stopped == "targets met before training":
                reached, epochs_to = 0.0, 0
            for record in result.history:
                spent += record.seconds
                trained += record.fraction  # a round stopped at a check inside an epoch: its share
                if reached is None and all(record.accuracy[n] >= ctx.targets[n] for n in ctx.names):
                    reached, epochs_to = round(spent, 1), round(trained, 3)
            row["retrain"] = {"stopped": result.stopped, "epochs": len(result.history),
                              "seconds": round(result.seconds, 1), "seconds_to_targets": reached,
                              "epochs_to_targets": epochs_to,
                              "val_per_epoch": [{n: round(a, 4) for n, a in r.accuracy.items()}
                                                for r in result.history],
                              "val": {n: round(a, 4) for n, a in result.accuracy.items()},
                              "test": accuracy(models, "test")}
        out["inits"][variant] = row
        print(f"merge.py: init {variant}: {json.dumps(row)}", file=sys.stderr, flush=True)
    return out


def run_strategy(workload_path: Path, plan_path: Path, out: Path, strategy: str, settings: dict,
                 limit: int | None, time_budget: float | None, plan_update: dict | None = None) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a benchmark starts afresh; `gemel merge` resumes instead
    plan = load_plan(plan_path)
    update = dict(plan_update or {})
    retraining = {**settings, **({"check_before_training": update.pop("check_before_training")}
                                 if "check_before_training" in update else {})}
    plan = plan.model_copy(update={"retraining": plan.retraining.model_copy(update=retraining), **update})
    started = time.perf_counter()
    report = merge_workload(load_workload(workload_path), plan, out, strategy=strategy, limit=limit,
                            time_budget_s=time_budget)
    return {
        "saved_bytes": report["saved_bytes"],
        "fraction_of_bound": round(report["fraction_of_bound"], 4),
        "bytes_before": report["bytes_before"],
        "bytes_after": report["bytes_after"],
        "all_targets_met": all(m["passed"] for m in report["models"].values()),
        "models": {n: {k: round(v, 4) if isinstance(v, float) else v for k, v in m.items()}
                   for n, m in report["models"].items()},
        "retrain_seconds": round(report["retrain_seconds"], 1),
        "rounds": report["rounds"],
        "rounds_kept": sum(1 for s in report["steps"] if s["outcome"] == "kept"),
        "stopped": report["stopped"],
        "wall_seconds": round(time.perf_counter() - started, 1),
        "steps": [{k: s.get(k) for k in ("round", "savings_bytes", "outcome", "next_action", "retrain_seconds",
                                         "saved_bytes_after", "epochs", "trained_epochs")} for s in report["steps"]],
        "init": plan.init.method,
        "risk_vs_outcome": _risk_vs_outcome(plan, out),
    }


def _risk_vs_outcome(plan, out: Path) -> dict | None:
    """Rank correlation, over the groups tried, between predicted risk and what retraining found:
    a group failed if it was in a round that failed and was never kept (a failed block is split,
    so its groups end kept, backed off, or untried below the minimum savings)."""
    if not any(g.risk is not None for g in plan.groups):
        return None
    report = json.loads((out / "report.json").read_text())
    kept, in_failed = set(), set()
    for step in report["steps"]:
        (kept if step["outcome"] == "kept" else in_failed).update(step["groups"])
    tried = [g for g in plan.groups if g.id in kept | in_failed and g.risk is not None]
    failed = [0.0 if g.id in kept else 1.0 for g in tried]
    risk = [group_risk(g) for g in tried]
    cka = [-(g.risk.cka if g.risk.cka is not None else 0.0) for g in tried]
    measured = [i for i, g in enumerate(tried) if g.risk.drop]
    return {"groups_tried": len(tried), "failed": int(sum(failed)),
            "spearman_risk_vs_failed": spearman(risk, failed), "spearman_low_cka_vs_failed": spearman(cka, failed),
            "measured_drop": {"groups": len(measured), "failed": int(sum(failed[i] for i in measured)),
                              "spearman_drop_vs_failed": spearman([risk[i] for i in measured],
                                                                  [failed[i] for i in measured])}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="*", default=["quickstart", "fashion"], choices=["quickstart", "fashion"])
    parser.add_argument("--strategies", nargs="*", default=[*STRATEGIES, "gemel/init"],
                        choices=[*STRATEGIES, *STRONGER],
                        help="gemel/init and bisect/init: the loop with predict's init and check before "
                             "training (a stronger baseline than the reference's first-member tying)")
    parser.add_argument("--limit", type=int, default=2000, help="samples per model (train + held-out); 0: all")
    parser.add_argument("--finetune-epochs", type=int, help="epochs of fine-tuning the unmerged models "
                        "(default: 10 for quickstart, from scratch; 4 for fashion, from ImageNet weights)")
    parser.add_argument("--epochs", type=int, default=10, help="most epochs per retraining round")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd",
                        help="every strategy's retraining optimizer (sgd: momentum 0.9)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--time-budget", type=float, help="seconds per strategy run")
    parser.add_argument("--checks-per-epoch", type=int, default=4,
                        help="held-out checks per epoch, the round stopping at the first that meets every target "
                             "(the same for every strategy; 1: only at the epoch's end)")
    parser.add_argument("--min-savings-fraction", type=float, default=0.01,
                        help="candidates saving less than this fraction of the all-shareable bound are not tried "
                             "(the same for every strategy; 0 tries everything)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--init", default="auto", choices=["auto", "mean", "fisher", "first", "ties"],
                        help="predict's init method; auto (a new plan's default): ties against the common "
                             "pretrained base where the workload has one (fashion), else mean")
    parser.add_argument("--skip-zero-retraining", action="store_true",
                        help="do not compare the inits (each one's accuracy with the groups tied)")
    parser.add_argument("--inits", nargs="*", default=list(INIT_VARIANTS), choices=list(INIT_VARIANTS),
                        help="inits to compare side by side (reference: GEMEL's first member's weights with "
                             "statistics kept; the others recompute batch-norm statistics)")
    parser.add_argument("--init-groups", type=int, default=0,
                        help="tie only the N groups that save the most bytes when comparing inits (0: all)")
    parser.add_argument("--init-epochs", type=int, default=0,
                        help="after the zero-retraining check, retrain each init jointly for at most this "
                             "many epochs (stopping once every model meets its target); 0: no retraining")
    parser.add_argument("--compare-risk", action="store_true",
                        help="measure predict's merge risk twice, every drop from whole forward passes and then "
                             "from each group's cut on (the default), and report both times and whether the "
                             "figures agree (with --strategies and nothing after it: only that)")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench-merge")
    args = parser.parse_args()
    limit = args.limit or None
    device = resolve_device(args.device)
    settings = {"optimizer": args.optimizer, "lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size,
                "device": args.device, "checks_per_epoch": args.checks_per_epoch}
    result = {"device": device_name() if device.type == "cpu" else f"{gpu_name(device)}, torch {torch.__version__}",
              "device_type": device.type, "limit": limit, "retraining": settings, "workloads": {}}
    for name in args.workloads:
        base = args.out / name
        if name == "fashion":
            prepared = prepare_fashion(base / "finetuned", limit=limit, epochs=args.finetune_epochs or 4,
                                       device=args.device)
        else:
            prepared = prepare_quickstart(base / "finetuned", limit=limit, epochs=args.finetune_epochs or 10,
                                          device=args.device)
        workload_path, plan_path = base / "finetuned" / "workload.yaml", base / "finetuned" / "plan.yaml"
        analysis = analyze_workload(load_workload(workload_path))
        floor = int(args.min_savings_fraction * analysis.max_savings_bytes)
        row = {"total_param_bytes": analysis.total_param_bytes, "all_shareable_bytes": analysis.max_savings_bytes,
               "groups": len(analysis.groups), "min_savings_bytes": floor, "unmerged": prepared["models"],
               "strategies": {}}
        tv_base = PretrainedBase(architecture="mobilenet_v2", weights="IMAGENET1K_V1") if name == "fashion" else None
        if not args.skip_zero_retraining and args.inits:
            init_retraining = RetrainSettings(**{**settings, "epochs": args.init_epochs}) if args.init_epochs else None
            row["init_comparison"] = compare_inits(workload_path, plan_path, limit, args.inits, tv_base,
                                                   top_groups=args.init_groups, settings=init_retraining)
        risk_plan = base / "finetuned" / "plan-risk.yaml"
        init_name = ("ties" if tv_base is not None else "mean") if args.init == "auto" else args.init
        predict_init = init_settings(init_name, tv_base) or InitSettings(method="mean")  # ties needs a base
        if "predict" in args.strategies or args.compare_risk:
            plan = load_plan(plan_path)
            plan = plan.model_copy(update={"retraining": plan.retraining.model_copy(update={"device": args.device}),
                                           "init": predict_init})
            if args.compare_risk:
                started = time.perf_counter()
                whole, _ = measure_risk(load_workload(workload_path), plan, limit=limit, drop_min_savings=floor,
                                        partial=False)
                row["risk_seconds_whole_passes"] = round(time.perf_counter() - started, 1)
            started = time.perf_counter()
            measured, notes = measure_risk(load_workload(workload_path), plan, limit=limit, drop_min_savings=floor)
            if args.compare_risk:
                row["risk_identical"] = [g.risk for g in whole.groups] == [g.risk for g in measured.groups]
            save_plan(measured, risk_plan)
            row["risk_seconds"] = round(time.perf_counter() - started, 1)
            row["risk_notes"] = notes
        for strategy in args.strategies:
            predict = strategy == "predict"
            loop, _, variant = strategy.partition("/")
            stronger = {"init": predict_init, "check_before_training": True} if variant else dict(REFERENCE)
            row["strategies"][strategy] = run_strategy(workload_path, risk_plan if predict else plan_path,
                                                       base / strategy.replace("/", "-"), loop,
                                                       {**settings, "min_savings_bytes": floor}, limit,
                                                       args.time_budget, None if predict else stronger)
            if predict:  # the risk was measured for this search: count it as its cost
                row["strategies"][strategy]["retrain_seconds_with_risk"] = round(
                    row["strategies"][strategy]["retrain_seconds"] + row["risk_seconds"], 1)
        # Same savings, less retraining? Each run's retraining time until it banked the others' final savings.
        for strategy, run in row["strategies"].items():
            run["retrain_seconds_to_reach"] = {
                other: seconds_to_reach(run["steps"], o["saved_bytes"])
                for other, o in row["strategies"].items() if other != strategy}
            if strategy == "predict":
                run["retrain_seconds_to_reach_with_risk"] = {
                    k: (None if v is None else round(v + row["risk_seconds"], 1))
                    for k, v in run["retrain_seconds_to_reach"].items()}
            print(f"merge.py: {name} {strategy}: {json.dumps(row['strategies'][strategy])}", file=sys.stderr)
        result["workloads"][name] = row
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
