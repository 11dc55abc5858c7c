"""Box annotations for detectors: COCO instances files, Pascal VOC folders and YOLO labels.

Each reader turns its format into images with targets as torchvision's detectors take them
(boxes x1, y1, x2, y2 in pixels of the model's input, int64 labels, 0 left to background).
Everything is checked when the data loads, images included (each is decoded once), so a bad
entry stops `gemel merge` before any training, with one DatasetError line that names the
file, the entry (COCO annotation or image id, VOC object number, YOLO line number) and the
fix. Images are read with PIL as RGB and resized straight to the model's input size, the
boxes scaled alike; pixels stay in [0, 1], since torchvision's detectors normalise inside.

Class names become the model's class indices by one rule (`class_map`): the dataset's
`classes:` (a list of names, the i-th is class i + 1, or {name or COCO id: index}; the
categories it leaves out are dropped), else the model's `class_names` (by name), else the
file's own order numbered from 1 (COCO: by category id; VOC: names sorted; YOLO: class k is
k + 1, always). Boxes up to one pixel past the image's edge (rounding in annotation tools)
are clipped to it; boxes further out are errors.

One module a concern: annotations_images.py (entries, boxes checked against their images,
the dataset), annotations_classes.py (the class rule), and a reader per format in
annotations_coco.py, annotations_voc.py and annotations_yolo.py; this module picks the reader.
"""

from __future__ import annotations

from ..workload import ModelSpec, Workload
from .annotations_classes import ClassMap, class_map
from .annotations_coco import coco_class_names, read_coco
from .annotations_images import EDGE_TOLERANCE, AnnotatedImages, check_images, flat_images
from .annotations_voc import read_voc, voc_class_names
from .annotations_yolo import read_yolo, yolo_class_names

__all__ = ["EDGE_TOLERANCE", "AnnotatedImages", "ClassMap", "class_map", "class_names", "flat_images", "load_boxes"]

# Per format: its reader (images and boxes, and the class map) and its class names.
_FORMATS = {"coco": (read_coco, coco_class_names), "voc": (read_voc, voc_class_names),
            "yolo": (read_yolo, yolo_class_names)}


def load_boxes(workload: Workload, spec: ModelSpec, size: tuple[int, int, int],
               limit: int | None = None) -> tuple[AnnotatedImages, int]:
    """A detector's images and boxes from its COCO, VOC or YOLO dataset, checked, at `size`,
    and the number of classes the labels need (the highest + 1). With `labels: distill` only
    the images the annotations list are read; their boxes are left for `distill`."""
    ds = spec.dataset
    with_boxes = ds.labels == "truth"
    entries, mapping = _FORMATS[ds.kind][0](workload, spec, ds, with_boxes)
    data = check_images(entries, size, limit)
    if mapping is None:  # distill: the labels will be the model's own
        return data, spec.num_classes
    return data, max([*mapping.index.values(), *mapping.names], default=0) + 1


def class_names(workload: Workload, spec: ModelSpec) -> list[str]:
    """The model's class names for a COCO, VOC or YOLO dataset, background first, as the
    loader maps them (the model's class_names when it has them); gaps are the indices as text.
    Reads the annotations, not the images."""
    ds = spec.dataset
    if spec.class_names:
        return list(spec.class_names)
    names = _FORMATS[ds.kind][1](workload, spec, ds)
    names = {0: "background", **names}
    return [names.get(i, str(i)) for i in range(spec.num_classes)]

