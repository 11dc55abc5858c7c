"""A model's class names, as its bundle names them and as the merge search compares tasks: the
workload's `class_names`, else the dataset's, else the pretrained weights' categories."""

from __future__ import annotations

from ..preprocessing import weights_class_names
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
            from .datasets import COLORS, SHAPES

            names = {"shape": list(SHAPES), "color": list(COLORS), "size": ["small", "large"],
                     "count": ["1", "2", "3", "4"], "detect": ["background", *SHAPES]}.get(ds.task, [])
        elif ds.kind == "fashion_mnist":
            names = [FASHION_MNIST_LABELS[c] for c in ds.classes] if ds.classes else list(FASHION_MNIST_LABELS)
        elif ds.kind == "image_folder":
            folder = workload.resolve(ds.path)
            names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        elif ds.kind in ("coco", "voc", "yolo"):
            from .annotations import class_names
            from .datasets import DatasetError

            try:  # background, then the categories as the loader maps them
                names = class_names(workload, spec)
            except DatasetError:  # annotations not on this machine: as for a missing image folder
                names = []
    if not names:
        names = weights_class_names(spec) or []
    names = names[: spec.num_classes]
    return names + [str(i) for i in range(len(names), spec.num_classes)]


__all__ = ["FASHION_MNIST_LABELS", "labels_of"]
