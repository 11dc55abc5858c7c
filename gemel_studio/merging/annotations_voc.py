"""Pascal VOC folders: Annotations/*.xml (boxes in pixels), JPEGImages/, ImageSets/Main/SPLIT.txt."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from pathlib import Path

from ..errors import DatasetError
from ..workload import ModelSpec, VocDataset, Workload
from .annotations_classes import Read, class_map
from .annotations_images import Box, ImageEntry

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


def read_voc(workload: Workload, spec: ModelSpec, ds: VocDataset, with_boxes: bool) -> Read:
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
        entry = ImageEntry(root / "JPEGImages" / filename, str(xml), "fix <filename> or put the image in JPEGImages/",
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
                entry.boxes.append(Box(where, coords, cls))
    return [e for e, _ in parsed], mapping



def voc_class_names(workload: Workload, spec: ModelSpec, ds: VocDataset) -> dict[int, str]:
    """Class index -> name as `read_voc` maps them (the names are in the objects: all are read)."""
    return read_voc(workload, spec, ds, True)[1].names
