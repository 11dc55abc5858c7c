"""Time to analyse each sample workload: structure on the meta device against real models on
the CPU, side by side in one run. Prints one JSON object.

    .venv/bin/python benchmarks/analyze.py [--repeats 3] [--workloads sample_workloads/*.yaml]

Each timing is the median of --repeats runs of `analyze_workload` (model building, the
per-layer inventory with its forward pass, and share-group search), after one warm-up run
that loads torchvision's modules. The figures of both paths are checked to agree.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemel_studio.analysis import analyze_workload  # noqa: E402
from gemel_studio.workload import load_workload  # noqa: E402


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workloads", nargs="*", type=Path,
                        default=sorted((ROOT / "sample_workloads").glob("*.yaml")))
    args = parser.parse_args()
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
                      "workloads": rows}, indent=2))


if __name__ == "__main__":
    main()
