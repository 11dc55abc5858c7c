"""Time to analyse each sample workload: structure on the meta device against real models on
the CPU, side by side in one run; and a camera fleet of many models. Prints one JSON object.

    .venv/bin/python benchmarks/analyze.py [--repeats 3] [--workloads sample_workloads/*.yaml]
                                           [--fleet 100 1000]
    .venv/bin/python benchmarks/analyze.py --workloads --fleet 200     # the fleet case alone, quick

Each timing is the median of --repeats runs of `analyze_workload` (model building, the
per-layer inventory with its forward pass, and share-group search), after one warm-up run
that loads torchvision's modules. The figures of both paths are checked to agree.

The fleet case (`fleet` in the JSON, one entry per --fleet size; --fleet 0 skips it): N
models of four architectures (resnet18, resnet34, mobilenet_v2, efficientnet_b0, in turn)
with 2, 5 or 10 classes, random init, 224 px, analysed once per alignment on the meta device.
Each size runs in a fresh interpreter, so its peak RSS (ru_maxrss) is its own; it reports the
RSS after imports, the peak, the seconds of each alignment, how many models were built, and
the seconds to analyse just one model of each distinct kind (the cost that cannot be shared).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemel_studio.analysis import analyze_workload  # noqa: E402
from gemel_studio.workload import load_workload, parse_workload  # noqa: E402

FLEET_ARCHITECTURES = ("resnet18", "resnet34", "mobilenet_v2", "efficientnet_b0")
FLEET_CLASSES = (2, 5, 10)


def device_name() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} logical cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def fleet_workload(models: int):
    """`models` cameras: the four architectures in turn, 2/5/10 classes, random init."""
    specs = [{"name": f"cam{i:04d}",
              "source": {"kind": "torchvision", "architecture": FLEET_ARCHITECTURES[i % len(FLEET_ARCHITECTURES)]},
              "num_classes": FLEET_CLASSES[(i // len(FLEET_ARCHITECTURES)) % len(FLEET_CLASSES)]}
             for i in range(models)]
    return parse_workload({"version": 1, "name": f"fleet{models}", "input_size": [3, 224, 224], "models": specs},
                          origin=f"<fleet {models}>")


def _rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def fleet_case(models: int) -> dict:
    """Run in its own interpreter (see main): the peak RSS is this case's alone."""
    start = time.perf_counter()
    workload = fleet_workload(models)
    parse_s = time.perf_counter() - start
    analyze_workload(fleet_workload(1))  # imports and torchvision's lazy registries, not timed
    rss_before = _rss_mib()
    row: dict = {"models": models, "architectures": list(FLEET_ARCHITECTURES), "classes": list(FLEET_CLASSES),
                 "input_size": list(workload.input_size), "workload_parse_seconds": round(parse_s, 3)}
    for alignment in ("structure", "order"):
        start = time.perf_counter()
        analysis = analyze_workload(workload, alignment=alignment)
        row[f"{alignment}_seconds"] = round(time.perf_counter() - start, 3)
        row[f"{alignment}_groups"] = len(analysis.groups)
        row[f"{alignment}_max_savings_fraction"] = round(analysis.max_savings_fraction, 4)
    row["built_models"] = analysis.built_models
    row["rss_after_imports_mib"] = rss_before
    row["peak_rss_mib"] = _rss_mib()
    distinct = {}
    for spec in workload.models:
        distinct.setdefault((spec.source.architecture, spec.num_classes), spec)
    one_each = workload.model_copy(update={"models": list(distinct.values())})
    start = time.perf_counter()
    analyze_workload(one_each)
    row["one_of_each_kind_seconds"] = round(time.perf_counter() - start, 3)
    row["total_param_bytes"] = analysis.total_param_bytes
    return row


def run_fleet(models: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--fleet-child", str(models)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", nargs="*", type=Path,
                        default=sorted((ROOT / "sample_workloads").glob("*.yaml")),
                        help="sample workloads to time (none: skip them)")
    parser.add_argument("--fleet", nargs="*", type=int, default=[100, 1000],
                        help="fleet sizes to analyse (0 or none: skip the fleet case)")
    parser.add_argument("--fleet-child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.fleet_child is not None:
        print(json.dumps(fleet_case(args.fleet_child)))
        return
    fleet = [run_fleet(n) for n in args.fleet if n > 0]
    if args.workloads:
        analyze_workload(load_workload(args.workloads[0]))  # warm-up: imports, lazy registries
    rows = []
    for path in args.workloads:
        workload = load_workload(path)
        meta_s, meta = timed(lambda: analyze_workload(workload, device="meta"), args.repeats)
        cpu_s, cpu = timed(lambda: analyze_workload(workload, device="cpu"), args.repeats)
        agree = (meta.total_param_bytes == cpu.total_param_bytes and meta.max_savings_bytes == cpu.max_savings_bytes
                 and [m.activation_bytes for m in meta.models] == [m.activation_bytes for m in cpu.models])
        rows.append({
            "workload": path.stem,
            "models": len(workload.models),
            "detectors": sum(m.task == "detection" for m in workload.models),
            "input_size": list(workload.input_size),
            "meta_seconds": round(meta_s, 3),
            "cpu_seconds": round(cpu_s, 3),
            "cpu_over_meta": round(cpu_s / meta_s, 1),
            "figures_agree": agree,
            "total_param_bytes": meta.total_param_bytes,
            "max_savings_bytes": meta.max_savings_bytes,
            "max_savings_fraction": round(meta.max_savings_fraction, 4),
            "groups": len(meta.groups),
        })
    print(json.dumps({"benchmark": "analyze", "device": device_name(), "repeats": args.repeats,
                      "workloads": rows, "fleet": fleet}, indent=2))


if __name__ == "__main__":
    main()
