"""What the bundle's manifest says about each model (task, input, preprocessing, class names,
graph file, tensor map), and writing `manifest.json` over the bundle's files."""

from __future__ import annotations

import re
from pathlib import Path

from .. import __version__
from ..preprocessing import resolve_preprocessing, weights_class_names
from ..runtime.bundle import MANIFEST, BundleManifest, BundleModel, FileEntry, Preprocessing, sha256_of
from ..workload import ModelSpec, Workload

FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]


def labels_of(workload: Workload, spec: ModelSpec) -> list[str]:
    """Class names: the workload's `class_names`, else the dataset's, else the pretrained
    weights' categories (when their head was kept), else the class indices as text."""
    if spec.class_names:
        return list(spec.class_names)
    names: list[str] = []
    ds = spec.dataset
    if ds is not None and ds.labels == "truth":
        if ds.kind == "synthetic":
            from ..merging.datasets import COLORS, SHAPES

            names = {"shape": list(SHAPES), "color": list(COLORS), "size": ["small", "large"],
                     "count": ["1", "2", "3", "4"], "detect": ["background", *SHAPES]}.get(ds.task, [])
        elif ds.kind == "fashion_mnist":
            names = [FASHION_MNIST_LABELS[c] for c in ds.classes] if ds.classes else list(FASHION_MNIST_LABELS)
        elif ds.kind == "image_folder":
            folder = workload.resolve(ds.path)
            names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        elif ds.kind in ("coco", "voc", "yolo"):
            from ..merging.annotations import class_names
            from ..merging.datasets import DatasetError

            try:  # background, then the categories as the loader maps them
                names = class_names(workload, spec)
            except DatasetError:  # annotations not on this machine: as for a missing image folder
                names = []
    if not names:
        names = weights_class_names(spec) or []
    names = names[: spec.num_classes]
    return names + [str(i) for i in range(len(names), spec.num_classes)]


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
