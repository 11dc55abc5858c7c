"""GEMEL's merge heuristic against ours (bisection), side by side in one run, on the
quick-start workload (synthetic scenes) and the Fashion-MNIST workload. Prints one JSON object.

    .venv/bin/python benchmarks/merge.py [--workloads quickstart fashion] [--limit 3000]
                                         [--epochs 10] [--device auto] [--out out/bench-merge]

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
from gemel_studio.merging.heuristic import STRATEGIES  # noqa: E402
from gemel_studio.merging.pipeline import finetune_workload, merge_workload  # noqa: E402
from gemel_studio.merging.plan import RetrainSettings  # noqa: E402
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


def run_strategy(workload_path: Path, plan_path: Path, out: Path, strategy: str, settings: dict,
                 limit: int | None, time_budget: float | None) -> dict:
    shutil.rmtree(out, ignore_errors=True)  # a benchmark starts afresh; `gemel merge` resumes instead
    plan = load_plan(plan_path)
    plan = plan.model_copy(update={"retraining": plan.retraining.model_copy(update=settings)})
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
        "steps": [{k: s[k] for k in ("round", "savings_bytes", "outcome", "next_action", "retrain_seconds",
                                     "saved_bytes_after")} for s in report["steps"]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", nargs="*", default=["quickstart", "fashion"], choices=["quickstart", "fashion"])
    parser.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=list(STRATEGIES))
    parser.add_argument("--limit", type=int, default=2000, help="samples per model (train + held-out); 0: all")
    parser.add_argument("--finetune-epochs", type=int, help="epochs of fine-tuning the unmerged models "
                        "(default: 10 for quickstart, from scratch; 4 for fashion, from ImageNet weights)")
    parser.add_argument("--epochs", type=int, default=10, help="most epochs per retraining round")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--time-budget", type=float, help="seconds per strategy run")
    parser.add_argument("--min-savings-fraction", type=float, default=0.01,
                        help="candidates saving less than this fraction of the all-shareable bound are not tried "
                             "(the same for every strategy; 0 tries everything)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "bench-merge")
    args = parser.parse_args()
    limit = args.limit or None
    device = resolve_device(args.device)
    settings = {"optimizer": "sgd", "lr": args.lr, "epochs": args.epochs, "batch_size": args.batch_size,
                "device": args.device}
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
        for strategy in args.strategies:
            row["strategies"][strategy] = run_strategy(workload_path, plan_path, base / strategy, strategy,
                                                       {**settings, "min_savings_bytes": floor}, limit,
                                                       args.time_budget)
        # Same savings, less retraining? Each run's retraining time until it banked the others' final savings.
        for strategy, run in row["strategies"].items():
            run["retrain_seconds_to_reach"] = {
                other: seconds_to_reach(run["steps"], o["saved_bytes"])
                for other, o in row["strategies"].items() if other != strategy}
            print(f"merge.py: {name} {strategy}: {json.dumps(row['strategies'][strategy])}", file=sys.stderr)
        result["workloads"][name] = row
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
