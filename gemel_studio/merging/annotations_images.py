"""Annotated images as every detection reader produces them: checked against their files, scaled.

Each reader (COCO, VOC, YOLO) lists `ImageEntry`s with their `Box`es; `check_images` opens
every image once (a truncated file fails here, not in the middle of training), checks each box
against the image's real size and scales it to the model's input. `AnnotatedImages` decodes an
image again each time it is asked for: nothing is held in memory but the boxes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DatasetError

EDGE_TOLERANCE = 1.0  # pixels a box may overshoot the image (then clipped)


@dataclass
class Box:
    """One object's box as its file gives it, with its class index."""

    where: str  # how errors name the entry: "FILE: annotation id 7"
    xyxy: tuple[float, float, float, float]  # in the source image's pixels, or [0, 1] if normalised
    label: int


@dataclass
class ImageEntry:
    """One image a file lists, with its boxes."""

    image: Path
    where: str  # the entry that names the image: "FILE: image id 3"
    missing_fix: str  # what to do when the image is not there
    boxes: list[Box] = field(default_factory=list)
    declared: tuple[int, int] | None = None  # (width, height) the annotation states
    normalised: bool = False  # YOLO: coordinates are fractions of the image's size


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder`, sorted by path."""
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


def check_images(entries: list[ImageEntry], size: tuple[int, int, int], limit: int | None) -> AnnotatedImages:
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
    files = image_files(path)
    if not files:
        raise DatasetError(f"{path}: no images; put the images in this folder or fix the path")
    return check_images([ImageEntry(f, str(path), "it was listed a moment ago") for f in files], size, limit)

