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
"""

from __future__ import annotations

import json
import math
import os
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.data import Dataset

from ..errors import DatasetError
from ..workload import CocoDataset, ModelSpec, VocDataset, Workload, YoloDataset

EDGE_TOLERANCE = 1.0  # pixels a box may overshoot the image (then clipped)


# --- what every reader produces ------------------------------------------------------------


@dataclass
class _Box:
    where: str  # how errors name the entry: "FILE: annotation id 7"
    xyxy: tuple[float, float, float, float]  # in the source image's pixels, or [0, 1] if normalised
    label: int


@dataclass
class _Entry:
    image: Path
    where: str  # the entry that names the image: "FILE: image id 3"
    missing_fix: str  # what to do when the image is not there
    boxes: list[_Box] = field(default_factory=list)
    declared: tuple[int, int] | None = None  # (width, height) the annotation states
    normalised: bool = False  # YOLO: coordinates are fractions of the image's size


def _image_files(folder: Path) -> list[Path]:
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMG_EXTENSIONS and p.is_file())


def _decode(path: Path, where: str, missing_fix: str):
    """The image, fully decoded (a truncated file fails here, not in the middle of training)."""
    from PIL import Image

    if not path.is_file():
        raise DatasetError(f"{where}: image {path} not found; {missing_fix}")
    try:
        with Image.open(path) as image:
            image.load()  # the pixels are in memory now; closing the file keeps them
        return image
    except Exception as exc:  # PIL raises OSError, ValueError, SyntaxError... on broken files
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DatasetError(f"{where}: cannot read image {path} ({reason}); replace the image or "
                           f"remove its entry") from None


def _to_tensor(image, size: tuple[int, int, int]) -> torch.Tensor:
    from PIL import Image

    channels, h, w = size
    if image.size != (w, h):
        image = image.resize((w, h), Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)
    return x.mean(dim=0, keepdim=True) if channels == 1 else x


class AnnotatedImages(Dataset):
    """Image files with their targets, already checked and scaled to the model's input size;
    each image is decoded again when asked for (nothing is held in memory but the boxes)."""

    def __init__(self, files: list[Path], targets: list[dict[str, torch.Tensor]], size: tuple[int, int, int]):
        self.files, self.targets, self.size = files, targets, size

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        path = self.files[index]
        image = _decode(path, str(path.parent), "it was there when the data loaded; put it back")
        return _to_tensor(image.convert("RGB"), self.size), self.targets[index]


def _finish(entries: list[_Entry], size: tuple[int, int, int], limit: int | None) -> AnnotatedImages:
    """Open every image, check each box against it, and scale the boxes to the input size."""
    _, out_h, out_w = size
    entries = entries[:limit] if limit else entries
    targets = []
    for entry in entries:
        w, h = _decode(entry.image, entry.where, entry.missing_fix).size
        if entry.declared and entry.declared != (w, h):
            raise DatasetError(f"{entry.where}: says the image is {entry.declared[0]}x{entry.declared[1]} but "
                               f"{entry.image.name} is {w}x{h}; fix the size in the annotation (its boxes are "
                               f"in that size's pixels)")
        boxes, labels = [], []
        for box in entry.boxes:
            x1, y1, x2, y2 = box.xyxy
            if entry.normalised:
                x1, y1, x2, y2 = x1 * w, y1 * h, x2 * w, y2 * h
            if x1 < -EDGE_TOLERANCE or y1 < -EDGE_TOLERANCE or x2 > w + EDGE_TOLERANCE or y2 > h + EDGE_TOLERANCE:
                shown = ", ".join(f"{v:g}" for v in (x1, y1, x2, y2))
                raise DatasetError(f"{box.where}: box [{shown}] (x1, y1, x2, y2) reaches outside the {w}x{h} "
                                   f"image {entry.image.name}; fix the box")
            x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, float(w)), min(y2, float(h))
            if x2 <= x1 or y2 <= y1:
                raise DatasetError(f"{box.where}: box lies on the edge of the {w}x{h} image {entry.image.name} "
                                   f"with no area inside it; fix or delete it")
            boxes.append([x1 * out_w / w, y1 * out_h / h, x2 * out_w / w, y2 * out_h / h])
            labels.append(box.label)
        targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.tensor(labels, dtype=torch.int64)})
    return AnnotatedImages([e.image for e in entries], targets, size)


def flat_images(path: Path, size: tuple[int, int, int], limit: int | None = None) -> AnnotatedImages:
    """Every image under `path` (sorted by path), with empty targets until `distill` fills them."""
    if not path.is_dir():
        raise DatasetError(f"{path}: no such folder; give the folder that holds the images")
    files = _image_files(path)
    if not files:
        raise DatasetError(f"{path}: no images; put the images in this folder or fix the path")
    return _finish([_Entry(f, str(path), "it was listed a moment ago") for f in files], size, limit)


# --- class names to class indices ----------------------------------------------------------


@dataclass
class ClassMap:
    """Categories of a file (by the key its boxes use: a COCO id as text, a VOC name) to the
    model's class indices."""

    index: dict[str, int]
    dropped: set[str]  # categories an explicit `classes:` leaves out: their boxes are skipped
    names: dict[int, str]  # class index -> name, for the bundle's labels
    by_class_names: bool  # mapped through the model's class_names (changes the fix we suggest)

    def label(self, key: str, name: str, where: str, origin: str, spec: ModelSpec) -> int | None:
        """The class index of a box of category `key`, None to skip it."""
        if key in self.index:
            return self.index[key]
        if key in self.dropped:
            return None
        if self.by_class_names:
            raise DatasetError(f"{where}: category '{name}' is not among model '{spec.name}''s class_names "
                               f"(after background); add it there, or list the categories to keep in the "
                               f"dataset's classes:")
        # Unreachable: the file's own order maps every category it has.
        raise DatasetError(f"{where}: category '{name}' is not among {origin}'s categories; fix the entry")


def class_map(origin: str, categories: list[tuple[str, str]], classes, spec: ModelSpec) -> ClassMap:
    """`categories`: (key, name) pairs in the file's order. The rule is the module's docstring."""
    n = spec.num_classes
    names_in_file = {name for _, name in categories}
    index: dict[str, int] = {}
    names: dict[int, str] = {}
    if isinstance(classes, list):
        for i, name in enumerate(classes):
            if name not in names_in_file:
                raise DatasetError(f"{origin}: the dataset's classes names '{name}', which no category in it has "
                                   f"(it has {_some(sorted(names_in_file))}); fix the spelling or remove it")
            names[i + 1] = name
        wanted = {name: i for i, name in names.items()}
        index = {key: wanted[name] for key, name in categories if name in wanted}
    elif isinstance(classes, dict):
        for key, i in classes.items():
            # A name first; a COCO category id second (YAML may hand it over as text after a save).
            hits = [c for c in categories if c[1] == str(key)] or [c for c in categories if c[0] == str(key)]
            if not hits:
                raise DatasetError(f"{origin}: the dataset's classes maps '{key}', which is neither the name nor "
                                   f"the id of a category in it (it has {_some(sorted(names_in_file))}); fix it")
            for hit_key, hit_name in hits:
                index[hit_key] = i
                names.setdefault(i, hit_name)
    elif spec.class_names:
        by_name = {name: i for i, name in enumerate(spec.class_names) if i > 0}  # 0 is background
        index = {key: by_name[name] for key, name in categories if name in by_name}
        names = dict(enumerate(spec.class_names))
    else:
        index = {key: i + 1 for i, (key, _) in enumerate(categories)}
        names = {i + 1: name for i, (_, name) in enumerate(categories)}
        if len(categories) + 1 > n:
            raise DatasetError(f"{origin}: {len(categories)} categories, but model '{spec.name}' has num_classes "
                               f"{n} (background + {n - 1}); raise num_classes to {len(categories) + 1} or list the "
                               f"categories to keep in the dataset's classes:")
    too_big = sorted(i for i in set(index.values()) if i >= n)
    if too_big:
        raise DatasetError(f"{origin}: the dataset's classes uses class {too_big[-1]}, but model '{spec.name}' has "
                           f"num_classes {n} (classes 0..{n - 1}, 0 is background); raise num_classes or fix classes")
    explicit = classes is not None
    dropped = {key for key, _ in categories if key not in index} if explicit else set()
    return ClassMap(index, dropped, names, by_class_names=not explicit and bool(spec.class_names))


# What a reader returns: the images with their boxes, and how it mapped the classes (None
# with labels: distill, when no box is read).
_Read = tuple[list[_Entry], ClassMap | None]


def _some(items: list[str], k: int = 8) -> str:
    shown = ", ".join(items[:k])
    return shown + (f" and {len(items) - k} more" if len(items) > k else "") if items else "none"


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- COCO ----------------------------------------------------------------------------------


def _read_coco(path: Path) -> dict:
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


def _coco(workload: Workload, spec: ModelSpec, ds: CocoDataset, with_boxes: bool) -> _Read:
    path = workload.resolve(ds.annotations)
    folder = workload.resolve(ds.images)
    data = _read_coco(path)
    if not folder.is_dir():
        raise DatasetError(f"{folder}: no such folder; the dataset's images is the folder the file_names in "
                           f"{path.name} are relative to")
    entries: dict[int, _Entry] = {}
    for i, im in enumerate(data["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("id"), int) or not isinstance(im.get("file_name"), str):
            raise DatasetError(f"{path}: images[{i}] needs an integer 'id' and a 'file_name'; fix it")
        if im["id"] in entries:
            raise DatasetError(f"{path}: image id {im['id']} appears twice (images[{i}]); give each image its own id")
        w, h = im.get("width"), im.get("height")
        declared = (int(w), int(h)) if _number(w) and _number(h) and w > 0 and h > 0 else None
        entries[im["id"]] = _Entry(folder / im["file_name"], f"{path}: image id {im['id']}",
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
                               f"({_some([k for k, _ in categories])}); fix it or add the category")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(_number(v) for v in bbox)):
            raise DatasetError(f"{where}: bbox should be [x, y, width, height] in pixels, found {bbox!r}; fix it")
        x, y, bw, bh = (float(v) for v in bbox)
        if bw <= 0 or bh <= 0:
            raise DatasetError(f"{where}: bbox {bbox} has a width or height of zero or less; fix or delete it")
        cls = mapping.label(key, names[key], where, str(path), spec)
        if cls is not None:
            entry.boxes.append(_Box(where, (x, y, x + bw, y + bh), cls))
    return list(entries.values()), mapping


# --- Pascal VOC ----------------------------------------------------------------------------


def _voc_files(root: Path, split: str | None) -> list[Path]:
    ann_dir = root / "Annotations"
    if not ann_dir.is_dir():
        raise DatasetError(f"{root}: no Annotations folder; a VOC dataset holds Annotations/*.xml and JPEGImages/")
    if split is None:
        files = sorted(ann_dir.glob("*.xml"))
        if not files:
            raise DatasetError(f"{ann_dir}: no .xml files; add the annotations or fix the path")
        return files
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise DatasetError(f"{listing}: no such split list; fix the dataset's split or leave it out to read every "
                           f"annotation")
    files = []
    for n, line in enumerate(listing.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        xml = ann_dir / f"{line.split()[0]}.xml"  # per-class lists add a 1/-1 flag after the id
        if not xml.is_file():
            raise DatasetError(f"{listing}: line {n}: no Annotations/{xml.name}; fix the list or add the file")
        files.append(xml)
    if not files:
        raise DatasetError(f"{listing}: lists no images; add their ids, one a line")
    return files


def _voc_parse(xml: Path):
    try:
        return ET.parse(xml).getroot()
    except ET.ParseError as exc:
        raise DatasetError(f"{xml}: not valid XML ({exc}); fix the file") from None
    except OSError as exc:
        raise DatasetError(f"{xml}: cannot be read ({exc.strerror or exc}); check its permissions") from None


def _voc_objects(xml: Path, root) -> list[tuple[str, str, bool, tuple[float, ...]]]:
    """(where, name, difficult, (xmin, ymin, xmax, ymax)) per object, checked."""
    out = []
    for k, obj in enumerate(root.findall("object"), 1):
        name = (obj.findtext("name") or "").strip()
        where = f"{xml}: object {k}" + (f" ('{name}')" if name else "")
        if not name:
            raise DatasetError(f"{where}: no <name>; give the object its class name")
        difficult = (obj.findtext("difficult") or "0").strip() in ("1", "true", "True")
        box = obj.find("bndbox")
        if box is None:
            raise DatasetError(f"{where}: no <bndbox>; give xmin, ymin, xmax and ymax in pixels")
        coords = []
        for tag in ("xmin", "ymin", "xmax", "ymax"):
            text = (box.findtext(tag) or "").strip()
            try:
                value = float(text)
            except ValueError:
                raise DatasetError(f"{where}: bndbox <{tag}> is {text or 'missing'!r}, not a number; fix it") from None
            if not math.isfinite(value):
                raise DatasetError(f"{where}: bndbox <{tag}> is {text}; give a finite pixel coordinate")
            coords.append(value)
        if coords[2] <= coords[0] or coords[3] <= coords[1]:
            raise DatasetError(f"{where}: bndbox xmin {coords[0]:g} ymin {coords[1]:g} xmax {coords[2]:g} ymax "
                               f"{coords[3]:g} has a width or height of zero or less; fix or delete it")
        out.append((where, name, difficult, tuple(coords)))
    return out


def _voc(workload: Workload, spec: ModelSpec, ds: VocDataset, with_boxes: bool) -> _Read:
    root = workload.resolve(ds.path)
    if not root.is_dir():
        raise DatasetError(f"{root}: no such folder; a VOC dataset is a folder with Annotations/ and JPEGImages/")
    parsed = []
    for xml in _voc_files(root, ds.split):
        tree = _voc_parse(xml)
        filename = (tree.findtext("filename") or "").strip() or f"{xml.stem}.jpg"
        size = tree.find("size")
        w = h = 0
        if size is not None:
            try:
                w, h = int(float(size.findtext("width") or 0)), int(float(size.findtext("height") or 0))
            except ValueError:
                raise DatasetError(f"{xml}: <size> width and height should be whole numbers; fix them") from None
        entry = _Entry(root / "JPEGImages" / filename, str(xml), "fix <filename> or put the image in JPEGImages/",
                       declared=(w, h) if w > 0 and h > 0 else None)  # tools write 0 for "unknown"
        parsed.append((entry, _voc_objects(xml, tree) if with_boxes else []))
    if not with_boxes:
        return [e for e, _ in parsed], None
    found = sorted({name for _, objects in parsed for _, name, _, _ in objects})
    origin = str(root / "Annotations")
    mapping = class_map(origin, [(n, n) for n in found], ds.classes, spec)
    for entry, objects in parsed:
        for where, name, difficult, coords in objects:
            if difficult and not ds.keep_difficult:
                continue
            cls = mapping.label(name, name, where, origin, spec)
            if cls is not None:
                entry.boxes.append(_Box(where, coords, cls))
    return [e for e, _ in parsed], mapping


# --- YOLO ----------------------------------------------------------------------------------


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
            files.extend((f, str(where)) for f in _image_files(where))
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


def _yolo(workload: Workload, spec: ModelSpec, ds: YoloDataset, with_boxes: bool) -> _Read:
    if ds.data is not None:
        files, names = _yolo_data_yaml(workload.resolve(ds.data), ds.split)
        images_dir, label_dir = None, None
    else:
        images_dir = workload.resolve(ds.images)
        if not images_dir.is_dir():
            raise DatasetError(f"{images_dir}: no such folder; give the folder that holds the images")
        files = [(f, str(images_dir)) for f in _image_files(images_dir)]
        if not files:
            raise DatasetError(f"{images_dir}: no images; put the images in this folder or fix the path")
        names = list(ds.names or [])
        label_dir = workload.resolve(ds.label_dir) if ds.label_dir is not None else None
    entries = [_Entry(f, where, "fix the list of images", normalised=True) for f, where in files]
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
                                   f"({_some(names)}); fix the class or add its name")
            if bw <= 0 or bh <= 0:
                raise DatasetError(f"{where}: width {values[3]} or height {values[4]} is zero or less; fix or "
                                   f"delete the line")
            entry.boxes.append(_Box(where, (cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2), int(cls_value) + 1))
    return entries, ClassMap({}, set(), {i + 1: n for i, n in enumerate(names)}, False)


# --- entry points --------------------------------------------------------------------------

_READERS = {"coco": _coco, "voc": _voc, "yolo": _yolo}


def load_boxes(workload: Workload, spec: ModelSpec, size: tuple[int, int, int],
               limit: int | None = None) -> tuple[AnnotatedImages, int]:
    """A detector's images and boxes from its COCO, VOC or YOLO dataset, checked, at `size`,
    and the number of classes the labels need (the highest + 1). With `labels: distill` only
    the images the annotations list are read; their boxes are left for `distill`."""
    ds = spec.dataset
    with_boxes = ds.labels == "truth"
    entries, mapping = _READERS[ds.kind](workload, spec, ds, with_boxes)
    data = _finish(entries, size, limit)
    if mapping is None:  # distill: the labels will be the model's own
        return data, spec.num_classes
    return data, max([*mapping.index.values(), *mapping.names], default=0) + 1


def class_names(workload: Workload, spec: ModelSpec) -> list[str]:
    """The model's class names for a COCO, VOC or YOLO dataset, background first, as the
    loader maps them (the model's class_names when it has them); gaps are the indices as text.
    Reads the annotations' categories, not their boxes or images."""
    ds = spec.dataset
    if spec.class_names:
        return list(spec.class_names)
    if isinstance(ds, CocoDataset):
        path = workload.resolve(ds.annotations)
        names = class_map(str(path), _coco_categories(path, _read_coco(path)), ds.classes, spec).names
    elif isinstance(ds, VocDataset):
        names = _voc(workload, spec, ds, True)[1].names
    else:
        listed = (ds.names or []) if ds.data is None else _yolo_data_yaml(workload.resolve(ds.data), ds.split)[1]
        names = dict(enumerate(listed, start=1))
    names = {0: "background", **names}
    return [names.get(i, str(i)) for i in range(spec.num_classes)]


__all__ = ["AnnotatedImages", "ClassMap", "class_map", "class_names", "flat_images", "load_boxes"]
