"""COCO instances files: images, annotations (bbox [x, y, width, height] in pixels), categories."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import DatasetError
from ..workload import CocoDataset, ModelSpec, Workload
from .annotations_classes import Read, class_map, some_of
from .annotations_images import Box, ImageEntry

def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _coco_file(path: Path) -> dict:
    if not path.is_file():
        raise DatasetError(f"{path}: no such annotation file; fix the dataset's annotations path")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not a text file; a COCO annotation file is JSON") from None
    except json.JSONDecodeError as exc:
        raise DatasetError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                           f"fix the file") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{path}: no 'images' list; a COCO instances file holds images, annotations and "
                           f"categories")
    return data


def _coco_categories(path: Path, data: dict) -> list[tuple[str, str]]:
    cats = data.get("categories")
    if not isinstance(cats, list):
        raise DatasetError(f"{path}: no 'categories' list; add one with the id and name of every category")
    out = []
    for i, c in enumerate(cats):
        if not isinstance(c, dict) or not isinstance(c.get("id"), int) or not isinstance(c.get("name"), str):
            raise DatasetError(f"{path}: categories[{i}] needs an integer 'id' and a 'name'; fix it")
        out.append((str(c["id"]), c["name"]))
    return sorted(out, key=lambda c: int(c[0]))  # COCO's order: by category id


def read_coco(workload: Workload, spec: ModelSpec, ds: CocoDataset, with_boxes: bool) -> Read:
    path = workload.resolve(ds.annotations)
    folder = workload.resolve(ds.images)
    data = _coco_file(path)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder; the dataset's images is the folder the file_names in "
                           f"{path.name} are relative to")
    entries: dict[int, ImageEntry] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            raise DatasetError(f"{path}: images[{i}] needs an integer 'id' and a 'file_name'; fix it")
        if im["id"] in entries:
            raise DatasetError(f"{path}: image id {im['id']} appears twice (images[{i}]); give each image its own id")
        w, h = im.get("width"), im.get("height")
        declared = (int(w), int(h)) if _number(w) and _number(h) and w > 0 and h > 0 else None
        entries[im["id"]] = ImageEntry(folder / im["file_name"], f"{path}: image id {im['id']}",
                                   f"fix its file_name or the dataset's images folder", declared=declared)
    if not entries:
        raise DatasetError(f"{path}: no images listed; add the images and their annotations")
    if not with_boxes:
        return list(entries.values()), None
    categories = _coco_categories(path, data)
    names = dict(categories)
    mapping = class_map(str(path), categories, ds.classes, spec)
    anns = data.get("annotations")
    if not isinstance(anns, list):
        raise DatasetError(f"{path}: no 'annotations' list; add one (it may be empty)")
    for i, ann in enumerate(anns):
        label = f"annotation id {ann['id']}" if isinstance(ann, dict) and "id" in ann else f"annotations[{i}]"
        where = f"{path}: {label}"
        if not isinstance(ann, dict):
            raise DatasetError(f"{where}: not an object; fix it")
        if ann.get("iscrowd"):
            continue  # crowd regions are not boxes of one object
        entry = entries.get(ann.get("image_id"))
        if entry is None:
            raise DatasetError(f"{where}: image_id {ann.get('image_id')} is not among the file's images; fix it")
        key = str(ann.get("category_id"))
        if key not in names:
            raise DatasetError(f"{where}: category_id {ann.get('category_id')} is not among the file's categories "
                               f"({some_of([k for k, _ in categories])}); fix it or add the category")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
            raise DatasetError(f"{where}: bbox should be [x, y, width, height] in pixels, found {bbox!r}; fix it")
        x, y, bw, bh = (float(v) for v in bbox)
        if bw <= 0 or bh <= 0:
            raise DatasetError(f"{where}: bbox {bbox} has a width or height of zero or less; fix or delete it")
        cls = mapping.label(key, names[key], where, str(path), spec)
        if cls is not None:
            entry.boxes.append(Box(where, (x, y, x + bw, y + bh), cls))
    return list(entries.values()), mapping


def coco_class_names(workload: Workload, spec: ModelSpec, ds: CocoDataset) -> dict[int, str]:
    """Class index -> name as `read_coco` maps them; reads the categories, not the boxes."""
    path = workload.resolve(ds.annotations)
    return class_map(str(path), _coco_categories(path, _coco_file(path)), ds.classes, spec).names
