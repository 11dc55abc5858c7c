"""Workload files: the YAML list of candidate models, its schema, loading and saving.

A workload names each model's source, task, classes, input size, dataset and accuracy
target. Validation is strict (unknown keys are errors) and every message names the file,
the model and the field. Relative paths in a workload are relative to the workload file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .architectures import check_architecture
from .errors import WorkloadError

SCHEMA_VERSION = 1


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


# --- model sources -------------------------------------------------------------------------


class TorchvisionSource(_Strict):
    """A torchvision architecture by name; `weights` is a torchvision weight name
    (e.g. IMAGENET1K_V1, DEFAULT), a local file, or absent for random init."""

    kind: Literal["torchvision"]
    architecture: str
    weights: str | None = None

    @field_validator("architecture")
    @classmethod
    def _known_architecture(cls, value: str) -> str:
        check_architecture(value)
        return value


class CheckpointSource(_Strict):
    """A state_dict (safetensors, or .pt/.pth loaded weights-only) for a torchvision architecture."""

    kind: Literal["checkpoint"]
    architecture: str
    path: Path
    # The torchvision weights it was fine-tuned from (`gemel finetune` writes it): the common base
    # `ties` merges against, found without --base.
    finetuned_from: str | None = None

    _known_architecture = field_validator("architecture")(TorchvisionSource._known_architecture.__func__)


class TorchScriptSource(_Strict):
    kind: Literal["torchscript"]
    path: Path
    architecture: str | None = None  # a label for display only


class OnnxSource(_Strict):
    kind: Literal["onnx"]
    path: Path
    architecture: str | None = None  # a label for display only


ModelSource = Annotated[
    Union[TorchvisionSource, CheckpointSource, TorchScriptSource, OnnxSource],
    Field(discriminator="kind"),
]

# --- datasets (used by retraining) ---------------------------------------------------------


class _DatasetBase(_Strict):
    """Every dataset kind says where its labels come from:

    - `labels: truth` (the default): the dataset's own ground-truth labels.
    - `labels: distill`: ground truth, if any, is ignored; the unmerged model's own
      predictions are the labels (distillation), so a model with no labelled data can still
      be merged, and its accuracy target means agreement with the unmerged model. An
      image_folder may then be a flat folder of unlabelled images (frames from a camera).
    """

    labels: Literal["truth", "distill"] = "truth"
    # Detectors with labels: distill only: the unmerged detector's boxes scored at least this
    # become the labels; absent, DISTILL_SCORE_THRESHOLD (0.5).
    score_threshold: float | None = Field(None, ge=0, le=1)


class SyntheticDataset(_DatasetBase):
    """Images the project generates itself (no download), seeded and reproducible."""

    kind: Literal["synthetic"]
    task: str = "shapes"
    samples: int = Field(512, gt=0)
    seed: int = 0


class ImageFolderDataset(_DatasetBase):
    """A folder with one sub-folder of images per class; with `labels: distill`, any folder
    of images (sub-folders, if there are any, are read too and their names ignored)."""

    kind: Literal["image_folder"]
    path: Path


class FashionMnistDataset(_DatasetBase):
    kind: Literal["fashion_mnist"]
    path: Path = Path("/usr/share/datasets/fashion-mnist")
    classes: list[int] | None = None  # a subset of the ten classes, relabelled 0..n-1


# How box annotations name their classes, mapped to the model's class indices (0 is background):
# a list of names (the i-th is class i + 1), or {category name or COCO category id: class index}.
# Given, it also says which categories to keep: annotations of categories it leaves out are
# dropped. Absent, names are looked up in the model's class_names, else numbered 1.. in the
# file's order (COCO: by category id; VOC: alphabetical).
ClassMapping = list[str] | dict[str | int, int]


class _BoxDataset(_DatasetBase):
    """Images with boxes for detectors (read by merging/annotations.py)."""

    @field_validator("classes", check_fields=False)
    @classmethod
    def _classes_fit(cls, value: ClassMapping | None) -> ClassMapping | None:
        if isinstance(value, list):
            if not value or len(set(value)) != len(value):
                raise ValueError("list each category name once (class 1 first)")
        elif isinstance(value, dict):
            bad = [f"{k}: {v}" for k, v in value.items() if v < 1]
            if not value or bad:
                raise ValueError(f"map categories to class indices from 1 (0 is background): {', '.join(bad)}")
        return value


class CocoDataset(_BoxDataset):
    """A COCO-style instances file (images, annotations with bbox [x, y, width, height] in
    pixels, categories with id and name) and the folder its file_names are relative to.
    Crowd annotations (iscrowd: 1) are skipped."""

    kind: Literal["coco"]
    images: Path
    annotations: Path
    classes: ClassMapping | None = None


class VocDataset(_BoxDataset):
    """A Pascal VOC folder: Annotations/*.xml and JPEGImages/; `split` names a list in
    ImageSets/Main/ (e.g. trainval), absent, every Annotations/*.xml is read. Objects marked
    difficult are skipped unless keep_difficult is true (VOC's own evaluation ignores them)."""

    kind: Literal["voc"]
    path: Path
    split: str | None = None
    keep_difficult: bool = False
    classes: ClassMapping | None = None


class YoloDataset(_BoxDataset):
    """YOLO text labels (one `class cx cy width height` line per box, normalised to [0, 1];
    class k becomes label k + 1). Either `images`, `names` and optionally `label_dir`
    (default: the images path with its last `images` folder replaced by `labels`, as
    Ultralytics does), or `data`: an Ultralytics data.yaml and the `split` to read from it."""

    kind: Literal["yolo"]
    images: Path | None = None
    label_dir: Path | None = None
    names: list[str] | None = None
    data: Path | None = None
    split: str = "train"

    @model_validator(mode="before")
    @classmethod
    def _labels_is_not_a_folder(cls, data: Any) -> Any:
        # 'labels' is every dataset's truth|distill; a folder there is the YOLO habit.
        if isinstance(data, dict) and data.get("labels") not in (None, "truth", "distill"):
            raise ValueError(f"'labels' is truth or distill; name the folder of YOLO label files "
                             f"'label_dir' (found labels: {data['labels']})")
        return data

    @model_validator(mode="after")
    def _one_source(self) -> "YoloDataset":
        if self.data is not None:
            if self.images is not None or self.label_dir is not None or self.names is not None:
                raise ValueError("give either 'data' (a data.yaml) or 'images' and 'names', not both")
        elif self.images is None or (not self.names and self.labels == "truth"):  # distill needs no names
            raise ValueError("give 'images' and 'names' (and 'label_dir' unless it is the images path with "
                             "'images' replaced by 'labels'), or 'data': a data.yaml")
        return self


BOX_DATASETS = (CocoDataset, VocDataset, YoloDataset)
# The fields of a dataset or model source that hold a path (relative ones are rebased on save).
PATH_FIELDS = ("path", "images", "annotations", "label_dir", "data")

Dataset = Annotated[
    Union[SyntheticDataset, ImageFolderDataset, FashionMnistDataset, CocoDataset, VocDataset, YoloDataset],
    Field(discriminator="kind"),
]


class AccuracyTarget(_Strict):
    """Either relative to the unmerged model's measured accuracy, or an absolute figure."""

    relative: float | None = Field(None, gt=0, le=1)
    absolute: float | None = Field(None, gt=0, le=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> "AccuracyTarget":
        if (self.relative is None) == (self.absolute is None):
            raise ValueError("give exactly one of 'relative' or 'absolute'")
        return self


# --- the workload --------------------------------------------------------------------------

InputSize = tuple[int, int, int]


class PreprocessingSpec(_Strict):
    """How an image becomes the model's input tensor, as torchvision's weights describe it.

    The tensor the model sees always has the model's input size. `resize` is the length the
    image's shorter side is scaled to before a centre crop of the input size (torchvision's
    Resize(int) then CenterCrop); absent, the image is scaled straight to the input size.
    `crop`, when given, must equal the input size's height and width (it is what the model
    sees). `mean` and `std` normalise each channel of the [0, 1] image; absent, the model
    takes [0, 1] images as they are. A torchvision model with named pretrained weights takes
    every field the workload leaves out from the weights (the resize scaled to the input size);
    see gemel_studio/preprocessing.py."""

    resize: int | None = Field(None, gt=0)
    crop: tuple[int, int] | None = None
    mean: list[float] | None = None
    std: list[float] | None = None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None = None  # default: bilinear

    @model_validator(mode="after")
    def _consistent(self) -> "PreprocessingSpec":
        if (self.mean is None) != (self.std is None):
            raise ValueError("give both 'mean' and 'std', or neither")
        if self.mean is not None:
            if len(self.mean) != len(self.std):
                raise ValueError(f"'mean' has {len(self.mean)} values but 'std' has {len(self.std)}; "
                                 "give one of each per channel")
            if any(s <= 0 for s in self.std):
                raise ValueError("every 'std' value must be positive")
        if self.crop is not None and min(self.crop) <= 0:
            raise ValueError("'crop' is [height, width], both positive")
        return self


class ModelSpec(_Strict):
    name: str = Field(min_length=1)
    source: ModelSource
    task: Literal["classification", "detection"] = "classification"
    num_classes: int = Field(1000, gt=0)
    input_size: InputSize | None = None  # channels, height, width; default: the workload's
    # What the image goes through on its way in; default: the pretrained weights' own, else none.
    preprocessing: PreprocessingSpec | None = None
    # Class names, in class-index order; default: the dataset's, else the pretrained weights'.
    class_names: list[str] | None = None
    dataset: Dataset | None = None
    target: AccuracyTarget = Field(default_factory=lambda: AccuracyTarget(relative=0.95))

    @model_validator(mode="after")
    def _names_fit(self) -> "ModelSpec":
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names lists {len(self.class_names)} names but num_classes is "
                             f"{self.num_classes}; give one name per class")
        return self

    @field_validator("input_size")
    @classmethod
    def _positive(cls, value: InputSize | None) -> InputSize | None:
        if value is not None and min(value) <= 0:
            raise ValueError("every dimension must be positive: [channels, height, width]")
        return value

    @property
    def architecture(self) -> str:
        """What to show as the model's architecture."""
        arch = getattr(self.source, "architecture", None)
        return arch or f"{self.source.kind}:{Path(self.source.path).name}"


class Workload(_Strict):
    version: Literal[1] = SCHEMA_VERSION
    name: str = "workload"
    description: str = ""
    input_size: InputSize = (3, 224, 224)
    batch_size: int = Field(1, gt=0)
    models: list[ModelSpec] = Field(default_factory=list)

    # Where the file lives; relative paths resolve against it. Not part of the YAML.
    path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _unique_names(self) -> "Workload":
        seen: set[str] = set()
        for spec in self.models:
            if spec.name in seen:
                raise ValueError(f"duplicate model name '{spec.name}': every model needs its own name")
            seen.add(spec.name)
        return self

    @model_validator(mode="after")
    def _crops_fit(self) -> "Workload":
        """A crop is what the model sees: it must be the model's input size, its own or the workload's."""
        for spec in self.models:
            crop = spec.preprocessing.crop if spec.preprocessing is not None else None
            size = list(self.input_size_of(spec)[1:])
            if crop is not None and list(crop) != size:
                raise ValueError(f"model '{spec.name}': preprocessing.crop {list(crop)} differs from input_size "
                                 f"{size}; the crop is what the model sees, so make them agree")
        return self

    def input_size_of(self, spec: ModelSpec) -> InputSize:
        return spec.input_size or self.input_size

    def resolve(self, path: Path | str) -> Path:
        """A path from the workload, made absolute against the workload file's folder."""
        p = Path(path).expanduser()
        if p.is_absolute() or self.path is None:
            return p
        return (self.path.parent / p).resolve()

    def model(self, name: str) -> ModelSpec:
        for spec in self.models:
            if spec.name == name:
                return spec
        raise KeyError(name)


def _describe(error: dict[str, Any], data: Any) -> str:
    """Turn one pydantic error into 'model 'cam1', field source.architecture: message'."""
    loc = list(error["loc"])
    where = ""
    if len(loc) >= 2 and loc[0] == "models" and isinstance(loc[1], int):
        index = loc[1]
        name = None
        try:
            name = data["models"][index].get("name")
        except (KeyError, IndexError, TypeError, AttributeError):
            pass
        where = f"model '{name}'" if name else f"models[{index}]"
        loc = loc[2:]
    # Drop discriminator tags that pydantic inserts into the location (e.g. 'torchvision').
    loc = [str(p) for p in loc if p not in ("torchvision", "checkpoint", "torchscript", "onnx",
                                             "synthetic", "image_folder", "fashion_mnist", "coco", "voc", "yolo")]
    field = ".".join(loc)
    msg = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        msg = "unknown key (remove it or check its spelling)"
    elif error["type"] == "union_tag_invalid":
        msg = f"{msg}; expected one of torchvision, checkpoint, torchscript, onnx (or for a dataset: synthetic, image_folder, fashion_mnist, coco, voc, yolo)"
    parts = [p for p in (where, f"field '{field}'" if field else "") if p]
    return f"{', '.join(parts)}: {msg}" if parts else msg


def parse_workload(data: Any, origin: str = "<workload>", path: Path | None = None) -> Workload:
    if not isinstance(data, dict):
        raise WorkloadError(f"{origin}: expected a mapping with a 'models' list at the top level")
    try:
        workload = Workload.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        more = f" (and {exc.error_count() - 1} more problem(s))" if exc.error_count() > 1 else ""
        raise WorkloadError(f"{origin}: {_describe(first, data)}{more}") from None
    workload.path = path.resolve() if path else None
    return workload


def load_workload(path: Path | str) -> Workload:
    path = Path(path)
    if not path.exists():
        raise WorkloadError(f"{path}: no such workload file (check the path)")
    if path.is_dir():
        raise WorkloadError(f"{path}: is a folder; name the workload's YAML file")
    try:
        text = path.read_text(encoding="utf-8")
        data = yaml.safe_load(text)
    except UnicodeDecodeError:
        raise WorkloadError(f"{path}: not a text file; a workload is YAML") from None
    except OSError as exc:
        raise WorkloadError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise WorkloadError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    workload = parse_workload(data, origin=str(path), path=path)
    # A file names what to analyse; the studio builds empty workloads in memory, never from disk.
    if not workload.models:
        raise WorkloadError(f"{path}: workload has no models; add at least one under models:")
    return workload


def workload_to_dict(workload: Workload) -> dict[str, Any]:
    data = workload.model_dump(mode="json", exclude_none=True, exclude={"path"})
    for model in data.get("models", []):
        if model.get("target") == {"relative": 0.95}:
            del model["target"]
        if model.get("dataset", {}).get("labels") == "truth":
            del model["dataset"]["labels"]
    return data


def _rebase_paths(workload: Workload, new_file: Path) -> Workload:
    """A copy whose relative paths point at the same files when read from `new_file`."""
    import os

    copy = workload.model_copy(deep=True)
    for spec in copy.models:
        for part in (spec.source, spec.dataset):
            for name in PATH_FIELDS:
                path = getattr(part, name, None)
                if path is None or Path(path).is_absolute():
                    continue
                target = workload.resolve(path)
                try:
                    setattr(part, name, Path(os.path.relpath(target, new_file.parent)))
                except ValueError:  # another drive on Windows
                    setattr(part, name, target)
    return copy


def save_workload(workload: Workload, path: Path | str) -> None:
    """Write the workload as YAML, relative paths rebased so they still name the same files,
    and make `workload` stand for the new file. Written atomically: a crash leaves the old
    file as it was."""
    path = Path(path).resolve()
    rebased = _rebase_paths(workload, path)
    text = yaml.safe_dump(workload_to_dict(rebased), sort_keys=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    # The object now stands for the saved file: its relative paths are the rebased ones.
    workload.models = rebased.models
    workload.path = path
