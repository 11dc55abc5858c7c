"""Deployable bundles on the edge side: the manifest schema, verified loading, tied models.

A bundle is a folder (or a .tar / .tar.gz of one) holding `manifest.json`, `weights.safetensors`
(every tensor of the merged workload once), one ONNX graph per model whose initializers point
into `weights.safetensors` as ONNX external data, and the plan and accuracy report it came
from. `load_bundle` checks the schema version and every file's sha256, extracts archives only
after refusing unsafe members, reads each stored tensor once and builds the torch models so
that models which share a tensor share its storage. This module must not import the merging
code or Qt: an edge box runs it without either.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import tarfile
import tempfile
import weakref
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import GemelError
from ..preprocessing import ImagePreprocessing

BUNDLE_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"


class BundleError(GemelError):
    """A bundle that is missing, damaged, tampered with, unsafe or of another schema version."""


# --- the manifest schema -------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Preprocessing(_Strict):
    """What a model expects as input: float32 RGB (or grey) laid out NCHW at `size`, made from
    an image in [0, 1] by scaling its shorter side to `resize` and cropping the centre `size`
    (or, with no `resize`, scaling straight to `size`), then subtracting `mean` and dividing
    by `std` per channel where they are given (absent: the model takes [0, 1] as it is).
    Bundles written before `resize` and `interpolation` existed load as a straight resize."""

    layout: Literal["NCHW"] = "NCHW"
    dtype: Literal["float32"] = "float32"
    color: Literal["RGB", "GRAY"] = "RGB"
    value_range: tuple[float, float] = (0.0, 1.0)
    channels: int = Field(gt=0)
    size: tuple[int, int]  # height, width
    resize: int | None = Field(None, gt=0)
    interpolation: Literal["bilinear", "bicubic", "nearest"] = "bilinear"
    mean: list[float] | None = None
    std: list[float] | None = None

    def image_preprocessing(self) -> ImagePreprocessing:
        return ImagePreprocessing(channels=self.channels, size=tuple(self.size), resize=self.resize,
                                  mean=tuple(self.mean) if self.mean is not None else None,
                                  std=tuple(self.std) if self.std is not None else None,
                                  interpolation=self.interpolation)


class BundleModel(_Strict):
    name: str
    task: Literal["classification", "detection"]
    architecture: str
    num_classes: int = Field(gt=0)
    input_size: tuple[int, int, int]  # channels, height, width
    preprocessing: Preprocessing
    labels: list[str]
    onnx: str | None  # file in the bundle; None where the model could not be exported
    onnx_input: str = "input"
    onnx_output: str = "output"  # a classifier's logits; a detector's first output
    # A detector's outputs, in the graph's order, named as torchvision's detection dict names
    # them: boxes (N x 4, x1 y1 x2 y2 in input pixels), scores, labels (and masks or keypoints
    # where the architecture has them), for a batch of one image. None for a classifier (its one
    # output is `onnx_output`), and in bundles written before detectors had ONNX graphs.
    onnx_outputs: list[str] | None = None
    tensors: dict[str, str]  # state_dict key -> key in weights.safetensors


class FileEntry(_Strict):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class BundleManifest(_Strict):
    version: Literal[1] = BUNDLE_VERSION
    format: Literal["gemel-bundle"] = "gemel-bundle"
    workload: str
    created_by: str
    weights: str = WEIGHTS
    plan: str = "plan.yaml"
    report: str = "report.json"
    models: list[BundleModel]
    files: dict[str, FileEntry]  # every file of the bundle except the manifest itself

    def model(self, name: str) -> BundleModel:
        for m in self.models:
            if m.name == name:
                return m
        raise KeyError(name)


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def safetensors_layout(path: Path) -> tuple[int, dict]:
    """(byte offset where tensor data starts, the JSON header). Offsets in the header are
    relative to that start: tensor k lies at start + header[k]['data_offsets']."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise BundleError(f"{path}: not a safetensors file (too short); re-export the bundle")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            raise BundleError(f"{path}: not a safetensors file (bad header); re-export the bundle") from None
    return 8 + n, header


# --- archives ------------------------------------------------------------------------------


def _is_archive(path: Path) -> bool:
    return path.is_file() and (path.name.endswith((".tar", ".tar.gz", ".tgz")) or tarfile.is_tarfile(path))


def _check_member(archive: Path, member: tarfile.TarInfo) -> None:
    name = member.name
    parts = PurePosixPath(name.replace("\\", "/")).parts
    why = None
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        why = "an absolute path"
    elif ".." in parts:
        why = "a '..' component"
    elif member.issym() or member.islnk():
        why = "a link"
    elif not (member.isreg() or member.isdir()):
        why = "a device, FIFO or other special file"
    if why:
        raise BundleError(f"{archive}: member '{name}' is {why}; refusing to extract it (re-export the bundle "
                          "with `gemel export`, or get it from a trusted source)")


def extract_archive(archive: Path, dest: Path) -> Path:
    """Extract a bundle archive into `dest` after checking every member; returns the folder
    holding manifest.json (the archive's root or its single top-level folder)."""
    try:
        with tarfile.open(archive) as tar:
            members = tar.getmembers()
            for m in members:
                _check_member(archive, m)
            # The "data" filter refuses the same things again, should a check above miss one.
            tar.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, EOFError, zlib.error) as exc:  # a truncated .tar.gz ends in EOFError
        raise BundleError(f"{archive}: not a readable bundle archive ({exc or 'truncated'}); re-export the "
                          "bundle") from None
    if (dest / MANIFEST).is_file():
        return dest
    tops = [p for p in dest.iterdir()]
    if len(tops) == 1 and (tops[0] / MANIFEST).is_file():
        return tops[0]
    raise BundleError(f"{archive}: no {MANIFEST} in the archive; is it a gemel bundle?")


# --- loading -------------------------------------------------------------------------------


def read_manifest(folder: Path) -> BundleManifest:
    path = folder / MANIFEST
    if not path.is_file():
        raise BundleError(f"{folder}: no {MANIFEST}; is it a gemel bundle (made by `gemel export`)?")
    return parse_manifest(path.read_bytes(), str(path))


def parse_manifest(raw: bytes, where: str) -> BundleManifest:
    """A manifest's bytes as a BundleManifest; `where` names it in the one-line errors."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BundleError(f"{where}: not valid JSON ({exc}); re-export the bundle") from None
    version = data.get("version") if isinstance(data, dict) else None
    if version != BUNDLE_VERSION:
        raise BundleError(f"{where}: bundle schema version {version!r}; this runtime reads version "
                          f"{BUNDLE_VERSION} (re-export the bundle with a matching gemel)")
    try:
        return BundleManifest.model_validate(data)
    except ValidationError as exc:
        e = exc.errors()[0]
        field_path = ".".join(str(p) for p in e["loc"])
        raise BundleError(f"{where}: field '{field_path}': {e['msg']}; re-export the bundle") from None


def peek_manifest(path: Path | str) -> BundleManifest:
    """The manifest of a bundle folder or archive, without reading (or verifying) its weights;
    from an archive only manifest.json is read, nothing is extracted."""
    path = Path(path)
    if path.is_dir():
        return read_manifest(path)
    if not path.exists():
        raise BundleError(f"{path}: no such bundle (check the path)")
    try:
        with tarfile.open(path) as tar:
            for member in tar:  # stop at the manifest: a .tar.gz is not read to its end
                parts = PurePosixPath(member.name).parts
                if member.isreg() and parts and parts[-1] == MANIFEST and len(parts) <= 2:
                    raw = tar.extractfile(member).read()
                    break
            else:
                raise BundleError(f"{path}: no {MANIFEST} in the archive; is it a gemel bundle?")
    except (tarfile.TarError, EOFError, zlib.error, OSError):
        raise BundleError(f"{path}: neither a bundle folder nor a readable .tar/.tar.gz bundle archive "
                          "(truncated?)") from None
    return parse_manifest(raw, f"{path} ({MANIFEST})")


def verify_files(folder: Path, manifest: BundleManifest) -> None:
    """Every file the manifest lists is present, inside the bundle, and has its sha256."""
    needed = {manifest.weights, manifest.plan, manifest.report} | {m.onnx for m in manifest.models if m.onnx}
    missing = needed - set(manifest.files)
    if missing:
        raise BundleError(f"{folder / MANIFEST}: no checksum for {', '.join(sorted(missing))}; re-export the bundle")
    root = folder.resolve()
    for name, entry in manifest.files.items():
        parts = PurePosixPath(name).parts
        if PurePosixPath(name).is_absolute() or ".." in parts or not parts:
            raise BundleError(f"{folder / MANIFEST}: file '{name}' points outside the bundle; re-export the bundle")
        path = folder / name
        if path.is_symlink() or not path.resolve().is_relative_to(root):
            raise BundleError(f"{path}: is a link or lies outside the bundle; re-export the bundle")
        if not path.is_file():
            raise BundleError(f"{path}: missing from the bundle; re-export the bundle")
        if path.stat().st_size != entry.bytes or sha256_of(path) != entry.sha256:
            raise BundleError(f"{path}: checksum mismatch (changed or damaged since export); re-export the bundle")


def _set_tensor(model: torch.nn.Module, key: str, value: torch.Tensor, params: dict[str, torch.nn.Parameter],
                stored_key: str) -> None:
    owner_name, _, attr = key.rpartition(".")
    try:
        owner = model.get_submodule(owner_name) if owner_name else model
    except AttributeError:
        raise BundleError(f"the manifest names '{key}', which the architecture does not have; "
                          "re-export the bundle") from None
    if attr in owner._parameters:
        # One Parameter object per stored tensor, as weight tying does: models share it.
        if stored_key not in params:
            params[stored_key] = torch.nn.Parameter(value, requires_grad=False)
        old = owner._parameters[attr]
        if old is not None and tuple(old.shape) != tuple(value.shape):
            raise BundleError(f"tensor '{stored_key}' has shape {tuple(value.shape)} but {key} needs "
                              f"{tuple(old.shape)}; re-export the bundle")
        owner._parameters[attr] = params[stored_key]
    elif attr in owner._buffers:
        owner._buffers[attr] = value
    else:
        raise BundleError(f"the manifest names '{key}', which the architecture does not have; re-export the bundle")


def build_models(specs: list[BundleModel], tensors: dict[str, torch.Tensor]) -> dict[str, torch.nn.Module]:
    """Torch models (eval mode, CPU) whose parameters and buffers are the stored tensors
    themselves: a tensor two models use is one storage."""
    from ..models.zoo import construct

    params: dict[str, torch.nn.Parameter] = {}
    out: dict[str, torch.nn.Module] = {}
    for spec in specs:
        # Built on the meta device (no memory); every tensor is then replaced by a stored one.
        model, _ = construct(spec.architecture, spec.num_classes, "meta")
        for key, stored in spec.tensors.items():
            if stored not in tensors:
                raise BundleError(f"model '{spec.name}': tensor '{stored}' is not in {WEIGHTS}; re-export the bundle")
            _set_tensor(model, key, tensors[stored], params, stored)
        left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
        if left:
            raise BundleError(f"model '{spec.name}': no stored tensor for {', '.join(left[:3])}"
                              f"{' ...' if len(left) > 3 else ''}; re-export the bundle")
        out[spec.name] = model.eval()
    return out


@dataclass
class Bundle:
    """A loaded, verified bundle. `models` are torch modules sharing stored tensors;
    `session(name)` opens the model's ONNX graph in onnxruntime."""

    path: Path  # what the caller named (folder or archive)
    folder: Path  # the folder the files are read from (an extraction folder for an archive)
    manifest: BundleManifest
    tensors: dict[str, torch.Tensor]
    models: dict[str, torch.nn.Module]
    _scratch: Path | None = None
    _sessions: dict = field(default_factory=dict)
    _ort_values: dict = field(default_factory=dict)  # stored key -> OrtValue over the torch tensor
    _initializer_names: dict = field(default_factory=dict)  # model -> its graph's initializer names

    def __post_init__(self) -> None:
        # An extraction folder goes when the bundle is closed or garbage-collected.
        self._cleanup = (weakref.finalize(self, shutil.rmtree, self._scratch, True)
                         if self._scratch is not None else None)

    def unique_bytes(self) -> int:
        return sum(t.untyped_storage().nbytes() for t in self.tensors.values())

    def session(self, name: str, providers: list[str] | None = None, share_weights: bool = False):
        """An onnxruntime InferenceSession for model `name` (made once per setting, then reused).

        With `share_weights`, the graph's initializers are the loaded tensors themselves (one
        OrtValue per stored tensor, over the torch tensor's memory), so sessions share them with
        each other and with the torch models instead of each reading its own copy from disk.
        Graph optimizations are off then: fusing batch norm into convolutions would make
        private copies again. (Three 16x16 resnet18 sessions, 43 MiB of unique weights: about
        75 MiB more resident with sharing, 204 MiB without, both unoptimized; 347 MiB with
        onnxruntime's default optimizations.)"""
        import onnxruntime as ort

        spec = self._onnx_spec(name)
        key = (name, share_weights)
        if key not in self._sessions:
            if share_weights:
                for stored in spec.tensors.values():
                    if stored not in self._ort_values:
                        self._ort_values[stored] = ort.OrtValue.ortvalue_from_numpy(self.tensors[stored].numpy())
                values = {k: self._ort_values[s] for k, s in spec.tensors.items()}
                self._sessions[key] = self._session_over_values(spec, values, providers)
            else:
                self._sessions[key] = ort.InferenceSession(str(self.folder / spec.onnx), ort.SessionOptions(),
                                                           providers=providers or ["CPUExecutionProvider"])
        return self._sessions[key]

    def session_over(self, name: str, state: dict[str, torch.Tensor], providers: list[str] | None = None,
                     threads: int | None = None):
        """A new (uncached) onnxruntime session for model `name` whose initializers are the given
        CPU tensors (state-dict key -> tensor, e.g. the runtime's resident copies), read in place:
        the session holds references to them, so drop it when they are evicted. `threads`: its
        intra-op threads (None: onnxruntime's own)."""
        import onnxruntime as ort

        spec = self._onnx_spec(name)
        values = {k: ort.OrtValue.ortvalue_from_numpy(t.numpy()) for k, t in state.items()}
        return self._session_over_values(spec, values, providers, threads)

    def _onnx_spec(self, name: str) -> BundleModel:
        spec = self.manifest.model(name)
        if spec.onnx is None:
            raise BundleError(f"model '{name}' has no ONNX graph in this bundle; use the torch backend")
        return spec

    def _session_over_values(self, spec: BundleModel, values: dict, providers: list[str] | None,
                             threads: int | None = None):
        import onnx
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = threads
        if spec.name not in self._initializer_names:  # read once: sessions are remade at every load
            graph = onnx.load(str(self.folder / spec.onnx), load_external_data=False).graph
            self._initializer_names[spec.name] = [init.name for init in graph.initializer]
        for name in self._initializer_names[spec.name]:
            if name in values:  # else a constant of the graph's own
                options.add_initializer(name, values[name])
        # The initializers must outlive the session: onnxruntime reads them in place.
        session = ort.InferenceSession(str(self.folder / spec.onnx), options,
                                       providers=providers or ["CPUExecutionProvider"])
        session._gemel_initializers = values
        return session

    def close(self) -> None:
        self._sessions.clear()
        self._ort_values.clear()
        if self._cleanup is not None:
            self._cleanup()

    def __enter__(self) -> "Bundle":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_bundle(path: Path | str, extract_to: Path | None = None) -> Bundle:
    """Verify and load a bundle folder or archive. An archive is extracted into `extract_to`
    (default: a new temporary folder, removed by `Bundle.close()`)."""
    from safetensors.torch import load_file

    path = Path(path)
    scratch = None
    if path.is_dir():
        folder = path
    elif path.exists() and _is_archive(path):
        if extract_to is None:
            scratch = Path(tempfile.mkdtemp(prefix="gemel-bundle-"))
            dest = scratch
        else:
            dest = Path(extract_to)
            dest.mkdir(parents=True, exist_ok=True)
        try:
            folder = extract_archive(path, dest)
        except BaseException:
            if scratch is not None:
                shutil.rmtree(scratch, ignore_errors=True)
            raise
    elif path.exists():
        raise BundleError(f"{path}: neither a bundle folder nor a .tar/.tar.gz bundle archive")
    else:
        raise BundleError(f"{path}: no such bundle (check the path)")
    try:
        manifest = read_manifest(folder)
        verify_files(folder, manifest)
        tensors = load_file(str(folder / manifest.weights))  # each stored tensor once
        models = build_models(manifest.models, tensors)
    except BaseException:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        raise
    return Bundle(path, folder, manifest, tensors, models, scratch)


__all__ = ["BUNDLE_VERSION", "Bundle", "BundleError", "BundleManifest", "BundleModel", "FileEntry", "MANIFEST",
           "Preprocessing", "WEIGHTS", "build_models", "extract_archive", "load_bundle", "parse_manifest",
           "peek_manifest", "read_manifest", "safetensors_layout", "sha256_of", "verify_files"]
