"""Reading weight files safely: safetensors, or .pt/.pth through torch.load(weights_only=True).

Files that need full unpickling are refused (unpickling untrusted data runs code). A header
read (`read_tensor_specs`) gives names, shapes and dtypes without loading tensor data, which
is all the analysis needs; `read_state_dict` loads the tensors for real use.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelLoadError

SAFETENSORS_SUFFIXES = (".safetensors",)
# Checkpoints saved from training scripts often wrap the state_dict in one of these keys.
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
NUM_BATCHES_TRACKED = "num_batches_tracked"

# safetensors dtype -> torch dtype; bytes follow the torch dtype's element size.
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "C64": torch.complex64, "BOOL": torch.bool,
}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def _unwrap(obj: object, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelLoadError(
            f"{path}: not a state_dict (a mapping of names to tensors); save one with "
            "torch.save(model.state_dict(), ...) or safetensors"
        )
    # Checkpoints written from DataParallel prefix every key with 'module.'.
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k.removeprefix("module."): v for k, v in obj.items()}
    return obj


def _torch_load(path: Path, mmap: bool) -> dict[str, torch.Tensor]:
    try:
        # torch warns about its own unpickler (e.g. 'Detected pickle protocol 4 ... please file an
        # issue') before the refusal below: two lines of noise in front of the one that matters.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch(\.|$)")
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        if "weights_only" in str(exc) or "Unsupported global" in str(exc):
            raise ModelLoadError(
                f"{path}: refused: this file needs full unpickling, which can run arbitrary code; "
                "re-save it as a plain state_dict or as safetensors"
            ) from None
        raise ModelLoadError(f"{path}: corrupt or truncated checkpoint ({_first_line(exc)})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        if mmap and "mmap" in str(exc):
            return _torch_load(path, mmap=False)  # legacy (non-zip) format cannot be mapped
        raise ModelLoadError(f"{path}: corrupt or truncated checkpoint ({_first_line(exc)})") from None
    return _unwrap(obj, path)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:160] if text else type(exc).__name__


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file (check the path in the workload)")
    if path.is_dir():
        raise ModelLoadError(f"{path}: is a folder; expected a weights file")


def _header_dtypes(path: Path) -> list[str]:
    """The dtypes a safetensors header names (an 8-byte length, then JSON); empty if unreadable."""
    try:
        with path.open("rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(min(size, 100 << 20)))
        return [v["dtype"] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


def _safetensors_error(path: Path, exc: BaseException) -> ModelLoadError:
    """A file whose header names a dtype this reader cannot hold is not corrupt: say which."""
    unknown = [d for d in _header_dtypes(path) if d not in _SAFETENSORS_DTYPES]
    if unknown:
        return ModelLoadError(f"{path}: unsupported dtype {unknown[0]} in the safetensors file; save its tensors "
                              "in a dtype torch holds (F32, F16, BF16, F8_E4M3, ...)")
    return ModelLoadError(f"{path}: corrupt or truncated safetensors file ({_first_line(exc)})")


def read_tensor_specs(path: Path) -> dict[str, TensorSpec]:
    """Names, shapes and dtypes of a weights file, reading as little as the format allows."""
    _check_exists(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                specs = {}
                for key in f.keys():
                    sl = f.get_slice(key)
                    specs[key] = TensorSpec(tuple(sl.get_shape()), _SAFETENSORS_DTYPES[sl.get_dtype()])
                return specs
        except (SafetensorError, KeyError, OSError, ValueError) as exc:
            raise _safetensors_error(path, exc) from None
    state = _torch_load(path, mmap=True)
    return {k: TensorSpec(tuple(v.shape), v.dtype) for k, v in state.items()}


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    _check_exists(path)
    if path.suffix in SAFETENSORS_SUFFIXES:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError, TypeError) as exc:
            raise _safetensors_error(path, exc) from None
    return _torch_load(path, mmap=False)


_HASH_IN_NAME = re.compile(r"-([a-f0-9]{8,})\.")


def verify_hub_hash(path: Path) -> None:
    """torchvision's file names carry a sha256 prefix (e.g. mobilenet_v2-b0353104.pth)."""
    match = _HASH_IN_NAME.search(path.name)
    if not match:
        return
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    if not digest.hexdigest().startswith(match.group(1)):
        raise ModelLoadError(
            f"{path}: sha256 does not match the prefix in its name; the file is corrupt: delete it and fetch it again"
        )


def check_fits(specs: dict[str, TensorSpec], module: torch.nn.Module, origin: str,
               allow_head_mismatch: bool = False) -> set[str]:
    """Check that a file's tensors fit a module's state_dict by name and shape.

    Returns the keys to skip: with `allow_head_mismatch` (pretrained weights for a model with
    another number of classes), keys whose shape differs are skipped, not refused.
    """
    expected = module.state_dict()
    # Older checkpoints predate BatchNorm's step counter: the module's own (zero) stands in.
    missing = [k for k in expected if k not in specs and not k.endswith(NUM_BATCHES_TRACKED)]
    unexpected = [k for k in specs if k not in expected]
    wrong = [k for k in expected if k in specs and tuple(expected[k].shape) != specs[k].shape]
    if allow_head_mismatch:
        missing = [k for k in missing if k not in wrong]
        skip = set(wrong)
        wrong = []
    else:
        skip = set()
    if missing or unexpected or wrong:
        parts = []
        if wrong:
            k = wrong[0]
            parts.append(f"{len(wrong)} tensor(s) of the wrong shape (first: {k} is "
                         f"{list(specs[k].shape)}, the model expects {list(expected[k].shape)})")
        if missing:
            parts.append(f"{len(missing)} missing (first: {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (first: {unexpected[0]})")
        raise ModelLoadError(
            f"{origin}: does not fit the architecture: {'; '.join(parts)}; "
            "check the architecture and num_classes in the workload"
        )
    return skip
