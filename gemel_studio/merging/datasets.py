"""Labelled data for retraining: synthetic scenes the project draws, image folders, Fashion-MNIST.

Every dataset comes out as tensors at the model's input size (channels, height, width),
split deterministically into train and validation parts. The synthetic scenes need no
download: the quick-start workload retrains on them anywhere. Detectors' boxes from COCO,
VOC and YOLO files are read in annotations.py.

Distillation (`labels: distill` in the workload) is for models with no ground truth: the
unmerged model labels the images itself (`distill`: its argmax predictions over the train
and validation parts; a detector's boxes scored at least a threshold), so the merged model
is retrained to agree with it, and its accuracy is agreement with the unmerged model (1.0
before merging, by construction). Any images will do, such as a flat folder of unlabelled
frames from the model's camera.
"""

from __future__ import annotations

import gzip
import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset

from ..devices import mixed_precision
from ..errors import DatasetError
from ..preprocessing import ImagePreprocessing, resolve_preprocessing
from ..workload import BOX_DATASETS, FashionMnistDataset, ImageFolderDataset, ModelSpec, SyntheticDataset, Workload

UNLABELLED = -1  # the label of an image that has none until the model distils one
DISTILL_SCORE_THRESHOLD = 0.5  # a detector's boxes scored at least this become its distilled labels


# --- synthetic scenes ----------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle")
COLORS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.8, 0.2), "blue": (0.15, 0.3, 0.95)}
SYNTHETIC_TASKS = {"shape": 3, "count": 4, "color": 3, "size": 2, "detect": 3}
DETECTION_TASKS = {"detect"}  # boxes and shape labels, for detectors (class 0 is background)


def _draw(canvas: np.ndarray, kind: str, cy: float, cx: float, r: float, rgb) -> None:
    h, w = canvas.shape[1:]
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    if kind == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif kind == "square":
        mask = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    else:  # an upward triangle inside the circle of radius r
        mask = (yy <= cy + r * 0.7) & (yy - (cy - r) >= 1.7 * np.abs(xx - cx))
    for c in range(3):
        canvas[c][mask] = rgb[c]


class DetectionScenes(Dataset):
    """Scenes of one to three shapes of any kind, colour and size, with a box and a shape
    label (1 circle, 2 square, 3 triangle; 0 is torchvision's background) per shape."""

    def __init__(self, samples: int, seed: int, size: tuple[int, int, int]):
        channels, h, w = size
        rng = np.random.default_rng(seed)
        colors = list(COLORS.values())
        self.images = np.empty((samples, 3, h, w), dtype=np.float32)
        self.targets: list[dict[str, torch.Tensor]] = []
        for i in range(samples):
            canvas = rng.uniform(0.0, 0.25, size=(3, h, w)).astype(np.float32)
            boxes, labels = [], []
            for _ in range(int(rng.integers(1, 4))):
                kind, color = int(rng.integers(3)), int(rng.integers(3))
                r = min(h, w) * float(rng.uniform(0.1, 0.22))
                cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
                _draw(canvas, SHAPES[kind], cy, cx, r, colors[color])
                half = 0.85 * r if SHAPES[kind] == "square" else r
                bottom = cy + (0.7 * r if SHAPES[kind] == "triangle" else half)
                boxes.append([max(0.0, cx - half), max(0.0, cy - half), min(w, cx + half), min(h, bottom)])
                labels.append(kind + 1)
            self.images[i] = canvas
            self.targets.append({"boxes": torch.tensor(boxes, dtype=torch.float32),
                                 "labels": torch.tensor(labels, dtype=torch.int64)})
        self.channels = channels

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x = torch.from_numpy(self.images[index])
        return (x.mean(dim=0, keepdim=True) if self.channels == 1 else x), self.targets[index]


def detection_collate(batch):
    """Detectors take lists of images and of targets, not stacked tensors."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def synthetic_scenes(task: str, samples: int, seed: int, size: tuple[int, int, int]) -> TensorDataset:
    """Scenes of one to four shapes of one kind, colour and size on a noisy background.
    The label answers `task`: which shape, how many, which colour, small or large."""
    if task not in SYNTHETIC_TASKS:
        raise DatasetError(f"synthetic task '{task}' is unknown; expected one of {', '.join(SYNTHETIC_TASKS)}")
    channels, h, w = size
    rng = np.random.default_rng(seed)
    images = np.empty((samples, 3, h, w), dtype=np.float32)
    labels = np.empty(samples, dtype=np.int64)
    colors = list(COLORS.values())
    for i in range(samples):
        canvas = rng.uniform(0.0, 0.25, size=(3, h, w)).astype(np.float32)
        kind, color, large = rng.integers(3), rng.integers(3), rng.integers(2)
        count = int(rng.integers(1, 5))
        r = min(h, w) * (0.2 if large else 0.11)
        for _ in range(count):
            cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
            _draw(canvas, SHAPES[kind], cy, cx, r, colors[color])
        images[i] = canvas
        labels[i] = {"shape": kind, "count": count - 1, "color": color, "size": large}.get(task, 0)
    x = torch.from_numpy(images)
    if channels == 1:
        x = x.mean(dim=1, keepdim=True)
    return TensorDataset(x, torch.from_numpy(labels))


# --- Fashion-MNIST (raw idx files, as Debian's dataset-fashion-mnist installs them) ---------


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as exc:
        raise DatasetError(f"{path}: cannot read ({exc}); reinstall the dataset") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DatasetError(f"{path}: not an idx file of unsigned bytes")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    start = 4 + 4 * ndim
    if len(data) - start != math.prod(dims):
        raise DatasetError(f"{path}: truncated (expected {math.prod(dims)} bytes of data, found {len(data) - start})")
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


def _find(folder: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (folder / name).exists():
            return folder / name
    raise DatasetError(f"{folder}: no {stem}[.gz]; install Debian's dataset-fashion-mnist or fix the path")


def as_preprocessing(size: "tuple[int, int, int] | ImagePreprocessing") -> ImagePreprocessing:
    """A bare (channels, height, width) means a straight resize and no normalisation."""
    if isinstance(size, ImagePreprocessing):
        return size
    c, h, w = size
    return ImagePreprocessing(channels=c, size=(h, w))


def fashion_mnist(folder: Path, classes: list[int] | None, size: "tuple[int, int, int] | ImagePreprocessing",
                  split: str = "train", limit: int | None = None) -> TensorDataset:
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte")).astype(np.int64)
    if classes:
        keep = np.isin(labels, classes)
        images, labels = images[keep], labels[keep]
        remap = {c: i for i, c in enumerate(classes)}
        labels = np.vectorize(remap.__getitem__)(labels) if len(labels) else labels
    if limit:
        images, labels = images[:limit], labels[:limit]
    x = torch.from_numpy(images.copy()).float().div_(255.0).unsqueeze(1)
    return TensorDataset(as_preprocessing(size).apply(x).contiguous(), torch.from_numpy(np.ascontiguousarray(labels)))


def _image_transform(size: "tuple[int, int, int] | ImagePreprocessing"):
    """RGB PIL image -> the model's input tensor: the same tensor path the runtime takes for a frame."""
    from torchvision.transforms.v2 import functional as TF

    prep = as_preprocessing(size)

    def transform(image):
        # Both callers hand over RGB already (ImageFolder's loader, UnlabelledImages.__getitem__).
        return prep.apply(TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True))

    return transform


def image_folder(path: Path, size: "tuple[int, int, int] | ImagePreprocessing") -> Dataset:
    from torchvision import datasets

    if not path.is_dir():
        raise DatasetError(f"{path}: no such folder; an image folder has one sub-folder per class")
    if not any(p.is_dir() for p in path.iterdir()):
        raise DatasetError(f"{path}: no class sub-folders; put each class's images in a sub-folder named "
                           "after it, or set 'labels: distill' to label unlabelled images with the model")
    try:
        return datasets.ImageFolder(str(path), transform=_image_transform(size))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DatasetError(f"{path}: {exc}") from None


class UnlabelledImages(Dataset):
    """Every image in a folder and its sub-folders, sorted by path, at the model's input
    size; each comes with the label UNLABELLED until `distill` gives it one."""

    def __init__(self, path: Path, size: "tuple[int, int, int] | ImagePreprocessing", limit: int | None = None):
        from torchvision.datasets.folder import IMG_EXTENSIONS

        from .annotations_images import image_files

        if not path.is_dir():
            raise DatasetError(f"{path}: no such folder; give the folder that holds the images")
        files = image_files(path)
        if not files:
            raise DatasetError(f"{path}: no images ({', '.join(IMG_EXTENSIONS)}); "
                               "put the images in this folder or fix the path")
        self.files = files[:limit] if limit else files
        self.transform = _image_transform(size)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError

        path = self.files[index]
        try:
            with Image.open(path) as image:
                rgb = image.convert("RGB")
        except (OSError, UnidentifiedImageError) as exc:
            raise DatasetError(f"{path}: cannot read this image ({exc}); delete or replace it") from None
        return self.transform(rgb), UNLABELLED


# --- per model -----------------------------------------------------------------------------


@dataclass
class ModelData:
    train: Dataset
    val: Dataset
    num_classes: int
    task: str = "classification"  # or 'detection': (image, {boxes, labels}) samples, scored by mAP
    # A third split the search never sees (neither training nor the pass/fail decision), for an
    # honest report: fresh scenes for synthetic data, Fashion-MNIST's own t10k test set, else a
    # seeded part of the dataset (none below MIN_TEST_SPLIT samples).
    test: Dataset | None = None


MIN_TEST_SPLIT = 50  # a dataset this small keeps every sample for training and the deciding split
TEST_SEED_OFFSET = 7919  # synthetic unseen scenes are drawn from seed + this


def _split(ds: Dataset, val_fraction: float, seed: int, test_fraction: float = 0.0) -> tuple[Subset, Subset, Subset | None]:
    """Train, validation and (with test_fraction, and enough samples) unseen test parts. The
    validation part is the same with or without a test part; the test part comes out of training."""
    n = len(ds)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, int(n * val_fraction))
    n_test = int(n * test_fraction) if n >= MIN_TEST_SPLIT else 0
    test = Subset(ds, order[n_val:n_val + n_test]) if n_test else None
    return Subset(ds, order[n_val + n_test:]), Subset(ds, order[:n_val]), test


def load_model_data(workload: Workload, spec: ModelSpec, val_fraction: float = 0.2,
                    limit: int | None = None, test_fraction: float = 0.2) -> ModelData:
    """Train and held-out validation data for one model, at its input size, and an unseen
    test split (see ModelData.test)."""
    source = spec.dataset
    size = workload.input_size_of(spec)
    prep = resolve_preprocessing(workload, spec)
    test: Dataset | None = None
    if source is None:
        raise DatasetError(f"model '{spec.name}' has no dataset; add one to the workload to retrain it")
    _check_task_fits(spec)
    if spec.task == "detection" and not isinstance(source, SyntheticDataset):
        # Boxes from COCO, VOC or YOLO files, or (distill) a detector's images in a flat folder.
        from .annotations import flat_images, load_boxes

        ds, classes = (load_boxes(workload, spec, size, limit) if isinstance(source, BOX_DATASETS)
                       else (flat_images(workload.resolve(source.path), size, limit), spec.num_classes))
        seed = 0
    elif isinstance(source, ImageFolderDataset) and source.labels == "distill":
        ds = UnlabelledImages(workload.resolve(source.path), prep, limit)
        classes = spec.num_classes
        seed = 0
    elif isinstance(source, SyntheticDataset):
        if source.task not in SYNTHETIC_TASKS:
            raise DatasetError(f"model '{spec.name}': synthetic task '{source.task}' is unknown; expected one of "
                               f"{', '.join(SYNTHETIC_TASKS)}")
        if (source.task in DETECTION_TASKS) != (spec.task == "detection"):
            raise DatasetError(f"model '{spec.name}': synthetic task '{source.task}' does not fit a {spec.task} "
                               f"model; use task 'detect' for detectors and shape, count, color or size for "
                               f"classifiers")
        samples = min(limit or source.samples, source.samples)
        n_test = max(1, int(samples * test_fraction)) if test_fraction > 0 else 0

        def draw(count: int, seed: int):
            out = (DetectionScenes(count, seed, size) if source.task in DETECTION_TASKS
                   else synthetic_scenes(source.task, count, seed, size))
            if prep.normalises and isinstance(out, TensorDataset):  # drawn at the input size: normalise only
                out = TensorDataset(prep.normalise(out.tensors[0]), out.tensors[1])
            return out

        ds = draw(samples, source.seed)
        test = draw(n_test, source.seed + TEST_SEED_OFFSET) if n_test else None
        classes = SYNTHETIC_TASKS[source.task] + (1 if spec.task == "detection" else 0)  # + background
        seed = source.seed
    elif isinstance(source, FashionMnistDataset):
        ds = fashion_mnist(workload.resolve(source.path), source.classes, prep, limit=limit)
        classes = len(source.classes) if source.classes else 10
        if test_fraction > 0:  # its own test set, as many images as the validation split
            test = fashion_mnist(workload.resolve(source.path), source.classes, prep, split="t10k",
                                 limit=max(1, int(len(ds) * val_fraction)))
        seed = 0
    elif isinstance(source, ImageFolderDataset):
        ds = image_folder(workload.resolve(source.path), prep)
        classes = len(ds.classes)
        seed = 0
    else:  # pragma: no cover - the schema admits no other kind
        raise DatasetError(f"model '{spec.name}': unsupported dataset kind")
    if source.labels == "distill":
        classes = spec.num_classes  # the labels will be the model's own predictions
    elif classes > spec.num_classes:
        raise DatasetError(f"model '{spec.name}': its dataset has {classes} classes but num_classes is "
                           f"{spec.num_classes}; make them agree")
    if test is not None:
        train, val, _ = _split(ds, val_fraction, seed)
    else:
        train, val, test = _split(ds, val_fraction, seed, test_fraction)
    return ModelData(train, val, classes, spec.task, test)


def _check_task_fits(spec: ModelSpec) -> None:
    """Refuse, before reading anything, a dataset kind that cannot label this model's task."""
    source = spec.dataset
    if spec.task == "detection" and not (isinstance(source, (SyntheticDataset, *BOX_DATASETS))
                                         or (isinstance(source, ImageFolderDataset) and source.labels == "distill")):
        raise DatasetError(f"model '{spec.name}': a detector needs images with boxes, and dataset kind {source.kind} "
                           f"has none; use kind coco, voc, yolo or synthetic (task detect), or an image_folder "
                           f"with labels: distill")
    if spec.task != "detection" and isinstance(source, BOX_DATASETS):
        raise DatasetError(f"model '{spec.name}': dataset kind {source.kind} holds boxes, for detectors; set the "
                           f"model's task: detection or give it an image_folder, fashion_mnist or synthetic dataset")
    if source.score_threshold is not None and (spec.task != "detection" or source.labels != "distill"):
        raise DatasetError(f"model '{spec.name}': score_threshold picks a detector's own boxes for labels: distill "
                           f"and means nothing here; remove it from the dataset")


class _Relabelled(Dataset):
    """`base`'s images with new targets (a detector's own boxes): the images are not copied."""

    def __init__(self, base: Dataset, targets: list[dict[str, torch.Tensor]]):
        self.base, self.targets = base, targets

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):
        return self.base[index][0], self.targets[index]


def _predict_boxes(model: torch.nn.Module, data: Dataset, device: torch.device, batch_size: int,
                   score_threshold: float) -> Dataset:
    targets = []
    for images, _ in DataLoader(data, batch_size=batch_size, collate_fn=detection_collate):
        # The same precision as retrain.mean_average_precision, so the model agrees with its own boxes.
        with mixed_precision(device):
            out = model([x.to(device) for x in images])
        for o in out:
            keep = o["scores"] >= score_threshold
            boxes, labels = o["boxes"][keep].float().cpu().reshape(-1, 4), o["labels"][keep].cpu().to(torch.int64)
            # Detectors refuse to train on boxes without area; a box clipped to the image's edge can be one.
            solid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            targets.append({"boxes": boxes[solid], "labels": labels[solid]})
    return _Relabelled(data, targets)


def _predict(model: torch.nn.Module, data: Dataset, device: torch.device, batch_size: int) -> TensorDataset:
    images, labels = [], []
    for x, _ in DataLoader(data, batch_size=batch_size):
        # The same precision as retrain.evaluate, so the model agrees with its own labels.
        with mixed_precision(device):
            out = model(x.to(device))
        images.append(x)
        labels.append(out.argmax(1).cpu())
    return TensorDataset(torch.cat(images), torch.cat(labels))


@torch.no_grad()
def distill(model: torch.nn.Module, data: ModelData, device: torch.device, batch_size: int = 256,
            score_threshold: float | None = None) -> ModelData:
    """The same images labelled by `model` (the unmerged one, moved to `device`, in eval
    mode), replacing whatever labels `data` had: a classifier's argmax predictions; for a
    detector, its boxes scored at least `score_threshold` (default DISTILL_SCORE_THRESHOLD)
    with their labels, an image with none keeping an empty target. Boxes without area are
    left out: torchvision's detectors refuse to train on them."""
    device = torch.device(device)
    model.to(device)
    was_training = model.training
    model.eval()
    try:
        if data.task == "detection":
            threshold = DISTILL_SCORE_THRESHOLD if score_threshold is None else score_threshold
            size = min(batch_size, 16)  # detectors hold far more activations per image
            train = _predict_boxes(model, data.train, device, size, threshold)
            val = _predict_boxes(model, data.val, device, size, threshold)
            test = _predict_boxes(model, data.test, device, size, threshold) if data.test is not None else None
        else:
            train = _predict(model, data.train, device, batch_size)
            val = _predict(model, data.val, device, batch_size)
            test = _predict(model, data.test, device, batch_size) if data.test is not None else None
    finally:
        model.train(was_training)
    return replace(data, train=train, val=val, test=test)
