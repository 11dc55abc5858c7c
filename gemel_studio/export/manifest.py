"""What the bundle's manifest says about each model (task, input, preprocessing, class names,
graph file, tensor map), and writing `manifest.json` over the bundle's files."""

from __future__ import annotations

import re
from pathlib import Path

from .. import __version__
from ..merging.labels import FASHION_MNIST_LABELS, labels_of
from ..preprocessing import resolve_preprocessing
from ..runtime.bundle import MANIFEST, BundleManifest, BundleModel, FileEntry, Preprocessing, sha256_of
from ..workload import ModelSpec, Workload


def _manifest_preprocessing(workload: Workload, spec: ModelSpec) -> Preprocessing:
    prep = resolve_preprocessing(workload, spec)
    return Preprocessing(color="GRAY" if prep.channels == 1 else "RGB", channels=prep.channels, size=prep.size,
                         resize=prep.resize, interpolation=prep.interpolation,
                         mean=list(prep.mean) if prep.mean is not None else None,
                         std=list(prep.std) if prep.std is not None else None)


def bundle_model(workload: Workload, spec: ModelSpec, tensors: dict[str, str], onnx_file: str | None) -> BundleModel:
    """The manifest's entry for `spec`, whose state_dict keys map to the stored `tensors`."""
    c, h, w = workload.input_size_of(spec)
    return BundleModel(name=spec.name, task=spec.task, architecture=spec.source.architecture,
                       num_classes=spec.num_classes, input_size=(c, h, w),
                       preprocessing=_manifest_preprocessing(workload, spec),
                       labels=labels_of(workload, spec), onnx=onnx_file, tensors=tensors)


def onnx_file_name(name: str, taken: set[str]) -> str:
    """A file name for model `name`'s graph that is safe on any file system and not in `taken`
    (which it joins)."""
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "model"
    candidate, i = f"{stem}.onnx", 1
    while candidate in taken:
        i += 1
        candidate = f"{stem}-{i}.onnx"
    taken.add(candidate)
    return candidate


def write_manifest(folder: Path, workload: Workload, specs: list[BundleModel]) -> BundleManifest:
    """`manifest.json` in `folder`, listing every other file there with its hash and size."""
    files = {p.name: FileEntry(sha256=sha256_of(p), bytes=p.stat().st_size)
             for p in sorted(folder.iterdir()) if p.name != MANIFEST}
    manifest = BundleManifest(workload=workload.name, created_by=f"gemel-studio {__version__}", models=specs,
                              files=files)
    (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")
    return manifest


__all__ = ["FASHION_MNIST_LABELS", "bundle_model", "labels_of", "onnx_file_name", "write_manifest"]
