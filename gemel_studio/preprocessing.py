"""How an image becomes a model's input, one definition for training, export and the runtime.

A model's preprocessing is a plain value (`ImagePreprocessing`): the input size it sees,
an optional resize of the image's shorter side followed by a centre crop of that size (as
torchvision's `weights.transforms()` do), or else a straight resize to that size, and an
optional per-channel mean and standard deviation. It is resolved once per model from the
workload (`resolve_preprocessing`): fields the workload gives win, and a torchvision model
with named pretrained weights takes the rest from those weights, with the resize scaled to
the workload's input size (torchvision's 256 -> 224 becomes 73 -> 64 at 64x64). Datasets,
fine-tuning, merging, evaluation, the bundle manifest and the runtime all call `apply` on
the same value, so a frame at the edge goes through what the model was trained on.

Class names follow the same path: the workload's `class_names`, else the dataset's, else
the pretrained weights' `meta["categories"]` when the head was loaded (same class count).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from .workload import ModelSpec, Workload

INTERPOLATIONS = ("bilinear", "bicubic", "nearest")


@dataclass(frozen=True)
class ImagePreprocessing:
    channels: int
    size: tuple[int, int]  # height, width: what the model sees
    resize: int | None = None  # shorter side before the centre crop; None: straight to `size`
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"

    @property
    def normalises(self) -> bool:
        return self.mean is not None

    def geometry(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C, H, W) images in [0, 1] at any size -> the model's channels and size."""
        from torchvision.transforms.v2 import InterpolationMode
        from torchvision.transforms.v2 import functional as TF

        c = x.shape[-3]
        if c != self.channels:
            if self.channels == 1:
                x = x.mean(-3, keepdim=True)
            elif c == 1:
                x = x.expand(*x.shape[:-3], self.channels, *x.shape[-2:])
            else:
                x = x[..., : self.channels, :, :]
        mode = InterpolationMode(self.interpolation)
        h, w = self.size
        if self.resize is not None:
            if min(x.shape[-2:]) != self.resize:
                x = TF.resize(x, [self.resize], interpolation=mode, antialias=True)
            if tuple(x.shape[-2:]) != (h, w):
                x = TF.center_crop(x, [h, w])
        elif tuple(x.shape[-2:]) != (h, w):
            x = TF.resize(x, [h, w], interpolation=mode, antialias=True)
        return x

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        if self.mean is None:
            return x
        mean, std = _channel_stats(tuple(self.mean), tuple(self.std), x.dtype, x.device)
        return (x - mean) / std

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [0, 1] (float, CHW or NCHW, any size) -> what the model takes."""
        return self.normalise(self.geometry(x.float()))

    def to_dict(self) -> dict:
        return {"resize": self.resize, "crop": list(self.size) if self.resize is not None else None,
                "mean": list(self.mean) if self.mean is not None else None,
                "std": list(self.std) if self.std is not None else None, "interpolation": self.interpolation}


@functools.lru_cache(maxsize=64)
def _channel_stats(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std as (C, 1, 1) tensors, made once per dtype and device rather than per frame.
    Nothing writes to them; they are made outside inference mode, so that a runtime's inference
    and a training step can both use them."""
    with torch.inference_mode(False):
        return (torch.tensor(mean, dtype=dtype, device=device).reshape(-1, 1, 1),
                torch.tensor(std, dtype=dtype, device=device).reshape(-1, 1, 1))


# --- resolving a workload model's preprocessing and class names ----------------------------


def _named_weights(spec: "ModelSpec"):
    """torchvision's weights enum entry when the model names pretrained weights, else None."""
    source = spec.source
    weights = getattr(source, "weights", None)
    if source.kind != "torchvision" or not weights or "/" in weights \
            or weights.endswith((".pt", ".pth", ".safetensors")):
        return None
    from torchvision.models import get_model_weights

    try:
        enum = get_model_weights(source.architecture)
        return enum.DEFAULT if weights == "DEFAULT" else enum[weights]
    except (KeyError, ValueError):
        return None  # build_model names the bad weight name; the analysis reports it there


def weights_preprocessing(spec: "ModelSpec") -> dict:
    """The fields a model's named torchvision weights prescribe (resize, crop, mean, std,
    interpolation, at the weights' own sizes); {} for none or for detectors (they normalise
    inside the model)."""
    weights = _named_weights(spec)
    if weights is None:
        return {}
    t = weights.transforms()
    out: dict = {}
    for key, attr in (("mean", "mean"), ("std", "std")):
        value = getattr(t, attr, None)
        if value is not None:
            out[key] = [float(v) for v in value]
    crop, resize = getattr(t, "crop_size", None), getattr(t, "resize_size", None)
    if crop and resize:
        out["crop"] = list(crop) * (2 if len(crop) == 1 else 1)
        out["resize"] = int(resize[0])
    mode = getattr(t, "interpolation", None)
    if mode is not None and getattr(mode, "value", None) in INTERPOLATIONS:
        out["interpolation"] = mode.value
    return out


def resolve_preprocessing(workload: "Workload", spec: "ModelSpec") -> ImagePreprocessing:
    """One model's preprocessing: the workload's fields, the rest from its named weights."""
    c, h, w = workload.input_size_of(spec)
    given = spec.preprocessing.model_dump(exclude_none=True) if spec.preprocessing is not None else {}
    derived = weights_preprocessing(spec)
    resize = given.get("resize")
    if resize is None and derived.get("resize") and "crop" not in given:
        # The weights' resize-to-crop ratio, kept at the workload's input size.
        dh, dw = derived["crop"]
        resize = max(1, round(min(h, w) * derived["resize"] / min(dh, dw)))
    mean, std = given.get("mean", derived.get("mean")), given.get("std", derived.get("std"))
    if mean is not None and len(mean) != c:
        if c == 1 and "mean" not in given:  # a grey model from RGB weights: one average channel
            mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
        else:
            from .errors import WorkloadError

            raise WorkloadError(f"model '{spec.name}': preprocessing.mean has {len(mean)} values for a "
                                f"{c}-channel input; give one mean and one std per channel")
    if spec.task == "detection" and (mean is not None or resize is not None):
        from .errors import WorkloadError

        raise WorkloadError(f"model '{spec.name}': a torchvision detector takes the whole image and normalises "
                            "inside the model; remove preprocessing.mean, std, resize and crop")
    return ImagePreprocessing(
        channels=c, size=(h, w), resize=resize,
        mean=tuple(mean) if mean is not None else None, std=tuple(std) if std is not None else None,
        interpolation=given.get("interpolation", derived.get("interpolation", "bilinear")))


def weights_class_names(spec: "ModelSpec") -> list[str] | None:
    """The named weights' categories, when the model keeps their head (same class count)."""
    weights = _named_weights(spec)
    names = list(weights.meta.get("categories") or []) if weights is not None else []
    return names if names and len(names) == spec.num_classes else None


def pinned(workload: "Workload", spec: "ModelSpec") -> "ModelSpec":
    """A copy of `spec` with its preprocessing (and class names from weights) written out, so
    that a workload whose source no longer names the weights (a fine-tuned checkpoint) keeps
    what they prescribed."""
    from .workload import PreprocessingSpec

    new = spec.model_copy(deep=True)
    prep = resolve_preprocessing(workload, spec)
    if prep.resize is not None or prep.mean is not None or spec.preprocessing is not None:
        new.preprocessing = PreprocessingSpec(
            resize=prep.resize, crop=prep.size if prep.resize is not None else None,
            mean=list(prep.mean) if prep.mean is not None else None,
            std=list(prep.std) if prep.std is not None else None,
            interpolation=prep.interpolation if prep.interpolation != "bilinear" else None)
    if new.class_names is None and (spec.dataset is None or spec.dataset.labels == "distill"):
        new.class_names = weights_class_names(spec)
    return new
