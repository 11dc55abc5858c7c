"""YOLO labels: one .txt per image ('class cx cy width height', fractions of the image), names
from an Ultralytics data.yaml or the dataset's own list; class k is the model's class k + 1."""

from __future__ import annotations

import math
import os
from pathlib import Path

import yaml

from ..errors import DatasetError
from ..workload import ModelSpec, Workload, YoloDataset
from .annotations_classes import ClassMap, Read, some_of
from .annotations_images import Box, ImageEntry, image_files

def _yolo_names(path: Path, names) -> list[str]:
    if isinstance(names, list) and names:
        return [str(n) for n in names]
    if isinstance(names, dict) and names:
        if sorted(names) != list(range(len(names))):
            raise DatasetError(f"{path}: 'names' should number the classes 0..{len(names) - 1}; fix its keys")
        return [str(names[k]) for k in range(len(names))]
    raise DatasetError(f"{path}: no 'names'; list the class names, class 0 first")


def _yolo_data_yaml(path: Path, split: str) -> tuple[list[tuple[Path, str]], list[str]]:
    """The images of `split` (each with the entry that lists it) and the class names from an
    Ultralytics data.yaml."""
    if not path.is_file():
        raise DatasetError(f"{path}: no such data.yaml; fix the dataset's data path")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise DatasetError(f"{path}: not valid YAML ({str(exc).splitlines()[0]}); fix the file") from None
    if not isinstance(data, dict):
        raise DatasetError(f"{path}: expected a mapping with the image folders and 'names'")
    names = _yolo_names(path, data.get("names"))
    if "nc" in data and data["nc"] != len(names):
        raise DatasetError(f"{path}: nc is {data['nc']} but names lists {len(names)}; make them agree")
    base = path.parent / str(data.get("path") or ".")  # Ultralytics' dataset root
    parts = data.get(split)
    if not parts:
        raise DatasetError(f"{path}: no '{split}' entry; add the images of that split or set the dataset's split "
                           f"to one of {', '.join(k for k in ('train', 'val', 'test') if data.get(k)) or 'train'}")
    files: list[tuple[Path, str]] = []
    for part in parts if isinstance(parts, list) else [parts]:
        where = (base / str(part)).resolve()
        if where.is_file() and where.suffix == ".txt":  # a list of images, one a line
            for n, line in enumerate(where.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
                if line.strip():
                    files.append(((where.parent / line.strip()).resolve(), f"{where}: line {n}"))
        elif where.is_dir():
            files.extend((f, str(where)) for f in image_files(where))
        else:
            raise DatasetError(f"{path}: {split}: {part} is neither a folder nor a .txt list of images; fix it")
    if not files:
        raise DatasetError(f"{path}: {split} holds no images; add them or fix the path")
    return files, names


def _yolo_label_file(image: Path, images_dir: Path | None, label_dir: Path | None) -> Path:
    if label_dir is not None:
        return (label_dir / image.relative_to(images_dir)).with_suffix(".txt")
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"  # Ultralytics' rule
    text = str(image)
    if sa not in text:
        raise DatasetError(f"{image}: no 'images' folder in its path to find its label file beside; give the "
                           f"dataset's label_dir")
    return Path(sb.join(text.rsplit(sa, 1))).with_suffix(".txt")


def read_yolo(workload: Workload, spec: ModelSpec, ds: YoloDataset, with_boxes: bool) -> Read:
    if ds.data is not None:
        files, names = _yolo_data_yaml(workload.resolve(ds.data), ds.split)
        images_dir, label_dir = None, None
    else:
        images_dir = workload.resolve(ds.images)
        if not images_dir.is_dir():
            raise DatasetError(f"{images_dir}: no such folder; give the folder that holds the images")
        files = [(f, str(images_dir)) for f in image_files(images_dir)]
        if not files:
            raise DatasetError(f"{images_dir}: no images; put the images in this folder or fix the path")
        names = list(ds.names or [])
        label_dir = workload.resolve(ds.label_dir) if ds.label_dir is not None else None
    entries = [ImageEntry(f, where, "fix the list of images", normalised=True) for f, where in files]
    if not with_boxes:
        return entries, None
    if len(names) + 1 > spec.num_classes:
        raise DatasetError(f"{ds.data or images_dir}: {len(names)} class names, but model '{spec.name}' has "
                           f"num_classes {spec.num_classes} (background + {spec.num_classes - 1}); raise num_classes "
                           f"to {len(names) + 1}")
    for entry in entries:
        txt = _yolo_label_file(entry.image, images_dir, label_dir)
        if not txt.is_file():
            continue  # YOLO's convention: an image without a label file shows no object
        try:
            lines = txt.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise DatasetError(f"{txt}: cannot be read as text ({exc}); fix or delete it") from None
        for n, line in enumerate(lines, 1):
            values = line.split()
            if not values:
                continue
            where = f"{txt}: line {n}"
            if len(values) != 5:
                raise DatasetError(f"{where}: expected 'class cx cy width height', found {len(values)} values"
                                   + (" (segmentation polygons are not read)" if len(values) > 5 else "") + "; fix it")
            try:
                cls_value, cx, cy, bw, bh = (float(v) for v in values)
            except ValueError:
                raise DatasetError(f"{where}: {line.strip()!r} is not five numbers; fix it") from None
            if not all(math.isfinite(v) for v in (cx, cy, bw, bh)):
                raise DatasetError(f"{where}: coordinates must be finite fractions of the image; fix it")
            if cls_value != int(cls_value) or not 0 <= cls_value < len(names):
                raise DatasetError(f"{where}: class {values[0]} is not one of 0..{len(names) - 1} "
                                   f"({some_of(names)}); fix the class or add its name")
            if bw <= 0 or bh <= 0:
                raise DatasetError(f"{where}: width {values[3]} or height {values[4]} is zero or less; fix or "
                                   f"delete the line")
            entry.boxes.append(Box(where, (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), int(cls_value) + 1))
    return entries, ClassMap({}, set(), {i + 1: n for i, n in enumerate(names)}, False)



def yolo_class_names(workload: Workload, spec: ModelSpec, ds: YoloDataset) -> dict[int, str]:
    """Class index -> name: class k of the labels is the model's class k + 1."""
    listed = (ds.names or []) if ds.data is None else _yolo_data_yaml(workload.resolve(ds.data), ds.split)[1]
    return dict(enumerate(listed, start=1))
