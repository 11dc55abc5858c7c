"""Writing a deployable bundle from a merged folder (`gemel export`), and checking it.

The bundle's `weights.safetensors` is the merged folder's `merged.safetensors` byte for byte:
every distinct tensor once. Each model's ONNX graph is exported without constant folding and
without initializer deduplication, so its initializers are named by the model's state_dict
keys; each one that is a stored tensor becomes ONNX external data pointing into
`weights.safetensors` (offset = 8 + header length + the tensor's data offset), so no graph
carries a copy of a shared weight. Initializers that are not stored tensors stay inside the
graph and are counted as unshared bytes. After writing, the export runs its checks (onnx's
checker, onnxruntime against torch, bytes on disk against the merged workload's unique bytes)
and returns them in an `ExportResult`.

Detectors (torchvision's SSD, RetinaNet, FCOS and R-CNN families) are exported whole, their
resizing and normalising transform and their postprocessing (top-k, score threshold, NMS)
included, for a batch of one image of the model's input size; the graph's outputs are the
detection dict's entries (boxes, scores, labels, ...), named in the manifest's `onnx_outputs`.
Their onnxruntime check matches detections one to one instead of comparing tensors elementwise
(see `_compare_detections`).
"""

from __future__ import annotations

import copy
import io
import json
import mmap
import re
import shutil
import tarfile
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..errors import GemelError
from ..models import build_model
from ..preprocessing import resolve_preprocessing, weights_class_names
from ..runtime.bundle import (MANIFEST, WEIGHTS, BundleManifest, BundleModel, FileEntry, Preprocessing, build_models,
                              safetensors_layout, sha256_of)
from ..workload import CheckpointSource, ModelSpec, TorchvisionSource, Workload, load_workload

MERGED_FILES = ("merged.safetensors", "plan.yaml", "report.json", "workload.yaml")
OPSET = 17
# onnxruntime agrees with torch when max |ort - torch| <= REL_TOLERANCE * max |torch| + ABS_FLOOR.
REL_TOLERANCE = 1e-4
ABS_FLOOR = 1e-6
TOLERANCE_TEXT = f"max|onnxruntime - torch| <= {REL_TOLERANCE:g} * max|torch| + {ABS_FLOOR:g}"
# Detectors: each torch detection must have an onnxruntime one of the same label whose score is
# within DETECTION_TOLERANCE and whose box coordinates are within DETECTION_TOLERANCE * the
# input's larger side. Looser than the logits' 1e-4: scores and boxes come out of a deep
# network, a resize and an exp() in box decoding, and float32 torch alone is off by up to 4e-5
# in score and 1.2e-3 px in a box (against float64, on the test's SSDlite at 64x64), while
# a wrong graph misses by far more than 1e-3.
DETECTION_TOLERANCE = 1e-3
DETECTION_TOLERANCE_TEXT = (f"detections matched one to one: same label, |score difference| <= "
                            f"{DETECTION_TOLERANCE:g}, box coordinates within {DETECTION_TOLERANCE:g} * the input's "
                            "larger side; unmatched ones only below a score tie")

_ONNX_TO_SAFETENSORS = {1: "F32", 2: "U8", 3: "I8", 5: "I16", 6: "I32", 7: "I64", 9: "BOOL", 10: "F16",
                        11: "F64", 16: "BF16"}

FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                        "Ankle boot"]


@dataclass
class ExportCheck:
    name: str
    passed: bool
    detail: str


@dataclass
class ModelExport:
    name: str
    onnx: str | None
    onnx_bytes: int  # size of the .onnx file (graph plus any embedded initializers)
    external_initializers: int  # initializers read from weights.safetensors
    copied_tensor_bytes: int  # stored tensors the graph had to keep its own copy of: not shared
    constant_bytes: int  # the graph's own constants (not model tensors), inside the .onnx file
    # onnxruntime against torch on the check input. Classifiers: max |difference| of the logits
    # and max |torch logits|. Detectors: the largest box-coordinate difference over the matched
    # detections (None where none matched) and the input's larger side in pixels.
    max_abs_diff: float | None
    output_scale: float | None


@dataclass
class ExportResult:
    bundle: Path  # the folder, or the archive when archive=True
    models: list[ModelExport]
    weights_data_bytes: int  # tensor data in weights.safetensors (its size less the header)
    weights_file_bytes: int
    unique_bytes: int  # the merged workload's distinct parameter and buffer bytes
    sum_model_bytes: int  # what the models would take stored apart
    bundle_bytes: int  # every file of the bundle (the archive's size with archive=True)
    tolerance: str = TOLERANCE_TEXT
    checks: list[ExportCheck] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.passed for c in self.checks)

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return {**asdict(self), "bundle": str(self.bundle), "ok": self.ok}


# --- what goes in the manifest -------------------------------------------------------------


def labels_of(workload: Workload, spec: ModelSpec) -> list[str]:
    """Class names: the workload's `class_names`, else the dataset's, else the pretrained
    weights' categories (when their head was kept), else the class indices as text."""
    if spec.class_names:
        return list(spec.class_names)
    names: list[str] = []
    ds = spec.dataset
    if ds is not None and ds.labels == "truth":
        if ds.kind == "synthetic":
            from ..merging.datasets import COLORS, SHAPES

            names = {"shape": list(SHAPES), "color": list(COLORS), "size": ["small", "large"],
                     "count": ["1", "2", "3", "4"], "detect": ["background", *SHAPES]}.get(ds.task, [])
        elif ds.kind == "fashion_mnist":
            names = [FASHION_MNIST_LABELS[c] for c in ds.classes] if ds.classes else list(FASHION_MNIST_LABELS)
        elif ds.kind == "image_folder":
            folder = workload.resolve(ds.path)
            names = sorted(p.name for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        elif ds.kind in ("coco", "voc", "yolo"):
            from ..merging.annotations import class_names
            from ..merging.datasets import DatasetError

            try:  # background, then the categories as the loader maps them
                names = class_names(workload, spec)
            except DatasetError:  # annotations not on this machine: as for a missing image folder
                names = []
    if not names:
        names = weights_class_names(spec) or []
    names = names[: spec.num_classes]
    return names + [str(i) for i in range(len(names), spec.num_classes)]


def _manifest_preprocessing(workload: Workload, spec: ModelSpec) -> Preprocessing:
    prep = resolve_preprocessing(workload, spec)
    return Preprocessing(color="GRAY" if prep.channels == 1 else "RGB", channels=prep.channels, size=prep.size,
                         resize=prep.resize, interpolation=prep.interpolation,
                         mean=list(prep.mean) if prep.mean is not None else None,
                         std=list(prep.std) if prep.std is not None else None)


def _bundle_model(workload: Workload, spec: ModelSpec, tensors: dict[str, str], onnx_file: str | None) -> BundleModel:
    c, h, w = workload.input_size_of(spec)
    return BundleModel(name=spec.name, task=spec.task, architecture=spec.source.architecture,
                       num_classes=spec.num_classes, input_size=(c, h, w),
                       preprocessing=_manifest_preprocessing(workload, spec),
                       labels=labels_of(workload, spec), onnx=onnx_file, tensors=tensors)


def _file_name(name: str, taken: set[str]) -> str:
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", name).strip(".") or "model"
    candidate, i = f"{stem}.onnx", 1
    while candidate in taken:
        i += 1
        candidate = f"{stem}-{i}.onnx"
    taken.add(candidate)
    return candidate


# --- ONNX with external data in weights.safetensors ----------------------------------------


def output_names(spec: BundleModel) -> list[str]:
    """The graph's output names: a detector's `onnx_outputs`, else the one `onnx_output`."""
    return list(spec.onnx_outputs) if spec.onnx_outputs else [spec.onnx_output]


def _trace_input(spec: BundleModel) -> torch.Tensor:
    if spec.task == "detection":
        # An image-like input: tracing runs the detector's postprocessing on real candidates.
        return torch.rand(1, *spec.input_size, generator=torch.Generator().manual_seed(0))
    return torch.zeros(1, *spec.input_size)


def detection_outputs(model: torch.nn.Module, spec: BundleModel) -> list[str]:
    """A torchvision detector's output names, in the order of its detection dict (which is the
    order of the traced graph's outputs): boxes, labels, scores for the R-CNN family, boxes,
    scores, labels for SSD, RetinaNet and FCOS, then masks or keypoints where it has them."""
    with torch.no_grad():
        out = model(_trace_input(spec))
    if not (isinstance(out, (list, tuple)) and len(out) == 1 and isinstance(out[0], dict)
            and {"boxes", "scores", "labels"} <= set(out[0])):
        raise GemelError(f"model '{spec.name}': a detector should return a list with one dict of boxes, scores "
                         f"and labels per image; {spec.architecture} returned {type(out).__name__}")
    return list(out[0])


def _trace(model: torch.nn.Module, spec: BundleModel):
    """The model's ONNX graph as the TorchScript exporter writes it (initializers embedded and
    named by their state_dict keys, not listed as graph inputs)."""
    import onnx

    buf = io.BytesIO()
    names = output_names(spec)
    # Classifiers take any batch size. A detector returns one dict per image: its graph is
    # traced, and runs, for a batch of one image of its input size.
    axes = (None if spec.onnx_outputs else {spec.onnx_input: {0: "batch"}, spec.onnx_output: {0: "batch"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notices
        # keep_initializers_as_inputs=True skips the pass that merges equal-valued initializers
        # (fresh batch norms all hold ones and zeros) so every initializer keeps its state_dict
        # name; no constant folding, so batch norm is not folded into the convolutions.
        torch.onnx.export(model, (_trace_input(spec),), buf, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, keep_initializers_as_inputs=True,
                          input_names=[spec.onnx_input], output_names=names, opset_version=OPSET,
                          dynamic_axes=axes)
    proto = onnx.load_from_string(buf.getvalue())
    init_names = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init_names]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)
    got = [o.name for o in proto.graph.output]
    if got != names:
        raise GemelError(f"model '{spec.name}': the exported graph's outputs are {got}, expected {names}")
    return proto


def export_onnx(model: torch.nn.Module, spec: BundleModel, weights: Path) -> tuple[bytes, int, int, int]:
    """The model's ONNX graph with every stored tensor as external data in `weights` (a file
    beside the graph). Returns (serialized graph, external initializers, bytes of stored tensors
    the graph had to keep a copy of, bytes of the graph's own constants)."""
    import onnx
    from onnx import numpy_helper

    proto = _trace(model, spec)
    start, header = safetensors_layout(weights)
    external, copied, constants = 0, 0, 0
    with open(weights, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        for init in proto.graph.initializer:
            stored = spec.tensors.get(init.name)
            entry = header.get(stored) if stored else None
            raw = init.raw_data or numpy_helper.to_array(init).tobytes()
            if entry is None:
                constants += len(raw)  # not a model tensor: a constant the exporter made
                continue
            begin, end = entry["data_offsets"]
            if (_ONNX_TO_SAFETENSORS.get(init.data_type) != entry["dtype"] or list(init.dims) != list(entry["shape"])
                    or raw != data[start + begin:start + end]):
                # Not the stored tensor after all (the exporter changed it): the graph keeps a copy.
                copied += len(raw)
                continue
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            for k, v in (("location", weights.name), ("offset", str(start + begin)), ("length", str(end - begin))):
                e = init.external_data.add()
                e.key, e.value = k, v
            external += 1
    return proto.SerializeToString(), external, copied, constants


# --- the export ----------------------------------------------------------------------------


def _read_merged(merged_dir: Path):
    from safetensors import safe_open

    if not merged_dir.is_dir():
        raise GemelError(f"{merged_dir}: no such folder; name the folder `gemel merge --out` wrote")
    missing = [n for n in MERGED_FILES if not (merged_dir / n).is_file()]
    if missing:
        hint = ("merge with this version of gemel, which writes it" if missing == ["workload.yaml"]
                else "run `gemel merge` to completion first")
        raise GemelError(f"{merged_dir}: not a complete merged folder, missing {', '.join(missing)}; {hint}")
    workload = load_workload(merged_dir / "workload.yaml")
    try:
        with safe_open(str(merged_dir / "merged.safetensors"), "pt") as f:
            meta = f.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise GemelError(f"{merged_dir / 'merged.safetensors'}: unreadable ({exc}); run `gemel merge` again") from None
    if "gemel.tensor_map" not in meta:
        raise GemelError(f"{merged_dir / 'merged.safetensors'}: no gemel.tensor_map metadata; "
                         "it was not written by `gemel merge`")
    try:
        tensor_map = json.loads(meta["gemel.tensor_map"])
    except ValueError:
        raise GemelError(f"{merged_dir / 'merged.safetensors'}: its gemel.tensor_map is not valid JSON; "
                         "run `gemel merge` again") from None
    return workload, tensor_map


def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise GemelError(f"{out}: exists and is not a folder; choose another bundle path")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise GemelError(f"{out}: folder is not empty and not a bundle; choose an empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)


def _archive_path(out: Path) -> Path:
    return out if out.name.endswith((".tar", ".tar.gz", ".tgz")) else out.with_name(out.name + ".tar")


def write_archive(folder: Path, archive: Path) -> None:
    """A .tar (or .tar.gz) with the bundle's files at its root: regular files only."""
    mode = "w:gz" if archive.name.endswith((".gz", ".tgz")) else "w"
    tmp = archive.with_name(archive.name + ".tmp")
    with tarfile.open(tmp, mode) as tar:
        for path in sorted(folder.iterdir()):
            info = tar.gettarinfo(str(path), arcname=path.name)
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            with open(path, "rb") as f:
                tar.addfile(info, f)
    tmp.replace(archive)


def export_bundle(merged_dir: Path | str, out: Path | str, archive: bool = False) -> ExportResult:
    """Write the bundle for the merged folder `merged_dir` to `out` (a folder; with
    `archive=True` a .tar file, '.tar' appended unless `out` ends in .tar/.tar.gz), then check it."""
    import onnx

    from ..merging.plan import GroupState, load_plan
    from ..merging.tying import unique_param_bytes

    merged_dir, out = Path(merged_dir), Path(out)
    workload, tensor_map = _read_merged(merged_dir)
    notes: list[str] = []
    specs: list[BundleModel] = []
    taken: set[str] = set()

    def add(spec: ModelSpec, tensors: dict[str, str]) -> None:
        if not isinstance(spec.source, (TorchvisionSource, CheckpointSource)):
            raise GemelError(f"model '{spec.name}': only torchvision and checkpoint models can be bundled "
                             f"(its source is {spec.source.kind}); merge it again from one of those")
        specs.append(_bundle_model(workload, spec, tensors, _file_name(spec.name, taken)))

    for name, tensors in tensor_map.items():
        try:
            spec = workload.model(name)
        except KeyError:
            raise GemelError(f"{merged_dir}: merged.safetensors names model '{name}', which workload.yaml "
                             "does not have; run `gemel merge` again") from None
        add(spec, tensors)

    from safetensors.torch import load_file, save_file

    stored = load_file(str(merged_dir / "merged.safetensors"))
    # Models the merge did not touch (no group of theirs was merged) still run on the edge box:
    # their own weights go into the bundle too, unshared.
    untouched = []
    for spec in (s for s in workload.models if s.name not in tensor_map):
        if not isinstance(spec.source, (TorchvisionSource, CheckpointSource)):
            notes.append(f"{spec.name}: not bundled: a {spec.source.kind} model is analysed only, not deployed")
            continue
        module = build_model(workload, spec, materialize=True).module
        own: dict[str, str] = {}
        for key, t in module.state_dict().items():
            name = f"{spec.name}.{key}"
            while name in stored:
                name = "_" + name
            stored[name] = t.detach().cpu().contiguous()
            own[key] = name
        add(spec, own)
        untouched.append(spec.name)
        notes.append(f"{spec.name}: not merged with any model; its own weights are bundled unshared")
    models = build_models(specs, stored)

    archive_path = _archive_path(out) if archive else None
    scratch = Path(tempfile.mkdtemp(prefix="gemel-export-")) if archive else None
    folder = scratch / "bundle" if scratch else out
    try:
        _prepare_out(folder)
        weights = folder / WEIGHTS
        if untouched:
            full_map = {s.name: s.tensors for s in specs}
            save_file(stored, str(weights), metadata={"gemel.format": "1", "gemel.tensor_map": json.dumps(full_map)})
        else:
            shutil.copyfile(merged_dir / "merged.safetensors", weights)  # already each tensor once
        shutil.copyfile(merged_dir / "plan.yaml", folder / "plan.yaml")
        shutil.copyfile(merged_dir / "report.json", folder / "report.json")
        exports: dict[str, tuple[int, int, int]] = {}
        for i, spec in enumerate(specs):
            if spec.onnx is None:
                continue
            try:
                if spec.task == "detection":
                    names = detection_outputs(models[spec.name], spec)
                    spec = specs[i] = spec.model_copy(update={"onnx_outputs": names, "onnx_output": names[0]})
                graph, *counts = export_onnx(models[spec.name], spec, weights)
            except Exception as exc:  # the exporter's errors have many types
                why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                if spec.task != "detection":
                    if isinstance(exc, GemelError):
                        raise
                    raise GemelError(f"model '{spec.name}': ONNX export failed: {exc}") from None
                # A detector the exporter cannot trace still runs on the torch backend.
                specs[i] = spec.model_copy(update={"onnx": None, "onnx_outputs": None, "onnx_output": "output"})
                notes.append(f"{spec.name}: no ONNX graph ({spec.architecture}: the TorchScript exporter failed: "
                             f"{why}); torch backend only")
                continue
            (folder / spec.onnx).write_bytes(graph)
            exports[spec.name] = tuple(counts)
        files = {p.name: FileEntry(sha256=sha256_of(p), bytes=p.stat().st_size)
                 for p in sorted(folder.iterdir()) if p.name != MANIFEST}
        manifest = BundleManifest(workload=workload.name, created_by=f"gemel-studio {__version__}", models=specs,
                                  files=files)
        (folder / MANIFEST).write_text(manifest.model_dump_json(indent=2), encoding="utf-8")

        # --- checks, on the written files --------------------------------------------------
        checks: list[ExportCheck] = []
        rows: list[ModelExport] = []
        gen = torch.Generator().manual_seed(0)
        for spec in specs:
            if spec.onnx is None:
                rows.append(ModelExport(spec.name, None, 0, 0, 0, 0, None, None))
                continue
            path = folder / spec.onnx
            try:
                onnx.checker.check_model(str(path))
                checks.append(ExportCheck(f"{spec.name}: onnx checker", True, "passed"))
            except onnx.checker.ValidationError as exc:
                checks.append(ExportCheck(f"{spec.name}: onnx checker", False, str(exc).splitlines()[0]))
            if spec.task == "detection":
                diff, scale, ok, detail = _compare_detections(models[spec.name], path, spec, gen)
            else:
                diff, scale = _compare(models[spec.name], path, spec, gen)
                ok = diff <= REL_TOLERANCE * scale + ABS_FLOOR
                detail = f"max abs diff {diff:.3g}, output scale {scale:.3g} ({TOLERANCE_TEXT})"
            checks.append(ExportCheck(f"{spec.name}: onnxruntime vs torch", ok, detail))
            rows.append(ModelExport(spec.name, spec.onnx, path.stat().st_size, *exports[spec.name], diff, scale))

        start, _ = safetensors_layout(weights)
        weights_file = weights.stat().st_size
        data_bytes = weights_file - start
        unique = unique_param_bytes(models.values(), include_buffers=True)
        summed = sum(t.numel() * t.element_size() for m in models.values() for t in m.state_dict().values())
        checks.append(ExportCheck("weights stored once", data_bytes == unique,
                                  f"{data_bytes} bytes of tensor data on disk; the merged workload's unique "
                                  f"parameter and buffer bytes {unique}; stored apart {summed}"))
        # Independently of the tensor map: the sharing on disk is what the plan's kept groups save.
        kept = sum(g.savings_bytes for g in load_plan(merged_dir / "plan.yaml").groups if g.state is GroupState.kept)
        params_apart = sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters())
        params_unique = unique_param_bytes(models.values())
        checks.append(ExportCheck("sharing matches the plan", params_unique == params_apart - kept,
                                  f"unique parameter bytes {params_unique}; stored apart {params_apart} less the "
                                  f"kept groups' savings {kept} = {params_apart - kept}"))
        copied = sum(r.copied_tensor_bytes for r in rows)
        checks.append(ExportCheck("ONNX graphs add no copy of stored tensors", copied == 0,
                                  f"{copied} bytes of model tensors copied into the graphs; "
                                  f"{sum(r.constant_bytes for r in rows)} bytes of the graphs' own constants"))
        if archive_path is not None:
            archive_path.parent.mkdir(parents=True, exist_ok=True)
            write_archive(folder, archive_path)
            total = archive_path.stat().st_size
        else:
            total = sum(p.stat().st_size for p in folder.iterdir())
        tolerance = TOLERANCE_TEXT
        if any(s.task == "detection" and s.onnx for s in specs):
            tolerance = f"classifiers: {TOLERANCE_TEXT}; detectors: {DETECTION_TOLERANCE_TEXT}"
        return ExportResult(archive_path or folder, rows, data_bytes, weights_file, unique, summed, total,
                            tolerance=tolerance, checks=checks, notes=notes)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


def _compare(model: torch.nn.Module, path: Path, spec: BundleModel, gen: torch.Generator) -> tuple[float, float]:
    import onnxruntime as ort

    x = torch.rand(2, *spec.input_size, generator=gen)  # what the model expects: [0, 1] images
    with torch.no_grad():
        ref = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([spec.onnx_output], {spec.onnx_input: x.numpy()})[0]
    return float(abs(got - ref).max()), float(abs(ref).max())


# --- checking a detector's graph -----------------------------------------------------------
#
# A detector's output is not a smooth function of its input: top-k, the score threshold and NMS
# make choices, and a choice between two candidates whose scores (nearly) tie depends on rounding.
# So onnxruntime is compared with torch detection by detection: each torch detection must have
# an onnxruntime detection of the same label whose score and box agree within tolerance, and
# every detection left unmatched on either side must be one that a tie can explain.


def _postprocessor(model: torch.nn.Module) -> torch.nn.Module | None:
    """The module holding a torchvision detector's final score threshold and cap on detections
    per image: the detector itself for SSD, RetinaNet and FCOS, its roi_heads for the R-CNNs."""
    for mod in model.modules():
        if (isinstance(getattr(mod, "score_thresh", None), (int, float))
                and isinstance(getattr(mod, "detections_per_img", None), int)):
            return mod
    return None


@contextmanager
def _score_threshold(post: torch.nn.Module, value: float):
    old = post.score_thresh
    post.score_thresh = value
    try:
        yield
    finally:
        post.score_thresh = old


def _torch_detections(model: torch.nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = model(x)[0]
    return {k: v.detach().cpu().numpy() for k, v in out.items()}


def _match(ref: dict, got: dict, box_tol: float, score_tol: float) -> list[tuple[int, int]]:
    """One-to-one (torch, onnxruntime) pairs: torch's detections, best first, each take the
    unmatched onnxruntime detection of the same label whose score is within `score_tol` and
    whose box is nearest, if every coordinate is within `box_tol`."""
    used = np.zeros(len(got["scores"]), dtype=bool)
    pairs = []
    if not len(used):
        return pairs
    for i in np.argsort(-ref["scores"], kind="stable"):
        box_diff = np.abs(got["boxes"] - ref["boxes"][i]).max(axis=1)
        ok = ((~used) & (got["labels"] == ref["labels"][i]) & (np.abs(got["scores"] - ref["scores"][i]) <= score_tol)
              & (box_diff <= box_tol))
        if ok.any():
            j = int(np.flatnonzero(ok)[np.argmin(box_diff[ok])])
            used[j] = True
            pairs.append((int(i), j))
    return pairs


def _tie_levels(ref: dict, got: dict, pairs: list[tuple[int, int]], tie_tol: float) -> dict[int, float]:
    """Per label, the highest score at which two different detections (on either side, not a
    matched pair) score within `tie_tol` of each other: from there down, NMS and top-k may
    order, and so choose, differently in torch and onnxruntime."""
    n = len(ref["scores"])
    scores = np.concatenate([ref["scores"], got["scores"]]).astype(np.float64)
    labels = np.concatenate([ref["labels"], got["labels"]])
    partner = np.arange(len(scores))
    for i, j in pairs:
        partner[i], partner[n + j] = n + j, i
    levels: dict[int, float] = {}
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        s = scores[idx]
        close = np.abs(s[:, None] - s[None, :]) <= tie_tol
        close &= idx[:, None] != idx[None, :]
        close &= partner[idx][:, None] != idx[None, :]
        if close.any():
            levels[int(label)] = float(s[close.any(axis=1)].max())
    return levels


_TIED = "so no detection could be compared"


def _compare_detections(model: torch.nn.Module, path: Path, spec: BundleModel,
                        gen: torch.Generator) -> tuple[float | None, float, bool, str]:
    """(max box-coordinate difference over matched detections, the input's larger side,
    passed, detail) for the detector's graph at `path` against torch on a random image."""
    import onnx
    import onnxruntime as ort

    names = output_names(spec)
    scale = float(max(spec.input_size[1:]))  # boxes are in input pixels
    x = torch.rand(1, *spec.input_size, generator=gen)  # an image in [0, 1], as the model expects

    def run(graph: str | bytes, state: dict[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
        options = ort.SessionOptions()
        values = {}
        if state is not None:  # these tensors instead of the graph's own initializers
            # (optimizations off: with them on, onnxruntime 1.32 computed with the file's values)
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            proto = (onnx.load_from_string(graph) if isinstance(graph, bytes)
                     else onnx.load(graph, load_external_data=False))
            for init in proto.graph.initializer:
                if init.name in state:
                    values[init.name] = ort.OrtValue.ortvalue_from_numpy(state[init.name].contiguous().numpy())
                    options.add_initializer(init.name, values[init.name])
        session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
        return dict(zip(names, session.run(names, {spec.onnx_input: x.numpy()})))

    graph: str | bytes = str(path)
    ref, got = _torch_detections(model, x), run(graph)
    post = _postprocessor(model)
    thresh = float(post.score_thresh) if post is not None else None
    cap = post.detections_per_img if post is not None else None
    lead = ""
    if len(ref["scores"]) == 0 and len(got["scores"]) == 0 and thresh is not None and thresh > 0:
        # Nothing scores above the threshold (untrained weights often don't): both empty says
        # little, so compare a graph traced with the threshold at 0 (every scored candidate kept).
        lead = (f"no detections above the score threshold {thresh:g} on the check input in either; with the "
                "threshold at 0 (a graph traced so, for this check only): ")
        try:
            with _score_threshold(post, 0.0):
                ref = _torch_detections(model, x)
                graph = _trace(model, spec).SerializeToString()
            got = run(graph)
        except Exception as exc:  # the exporter's errors have many types
            return None, scale, False, f"{lead}could not check ({exc})"
        thresh = 0.0
    diff, _, ok, detail = judge_detections(ref, got, scale, thresh, cap)
    if ok or not detail.endswith(_TIED):
        return diff, scale, ok, lead + detail
    # Every score ties (an untrained detector's activations fade to nothing, so its heads see
    # the same input everywhere). Compare once more, torch and onnxruntime on the same tensors
    # but with batch-norm statistics measured on random images, which spreads the scores. The
    # graph is the same; that its initializers are the stored tensors, byte for byte, the export
    # checked when it wrote them.
    twin = copy.deepcopy(model)
    norms = [m for m in twin.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return diff, scale, ok, lead + detail
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # the average over the batch seen
        m.train()
    again = "with batch-norm statistics measured on random images instead (the same graph and weights otherwise): "
    try:
        with torch.no_grad():
            twin(torch.rand(4, *spec.input_size, generator=gen))
        twin.eval()
        twin_post = _postprocessor(twin)
        if lead and twin_post is not None:
            twin_post.score_thresh = 0.0
        ref = _torch_detections(twin, x)
        got = run(graph, twin.state_dict())
    except Exception as exc:  # noqa: BLE001 (keep the first, inconclusive, answer)
        return diff, scale, ok, f"{lead}{detail}; {again}could not run ({exc})"
    diff, _, ok, second = judge_detections(ref, got, scale, thresh, cap)
    return diff, scale, ok, f"{lead}{detail}; {again}{second}"


def judge_detections(ref: dict, got: dict, scale: float, thresh: float | None = None,
                     cap: int | None = None) -> tuple[float | None, float, bool, str]:
    """Torch's detections `ref` against onnxruntime's `got` (dicts of numpy arrays: boxes,
    scores, labels, ...) for an input whose larger side is `scale` pixels, from a detector with
    score threshold `thresh` and at most `cap` detections per image. Returns (max box-coordinate
    difference over matched detections or None, scale, passed, detail).

    Passes when every detection on either side is matched (same label, score within
    DETECTION_TOLERANCE, each box coordinate within DETECTION_TOLERANCE * scale), except those
    a tie explains: NMS and top-k take candidates in score order, so two implementations whose
    scores differ by at most e choose alike until two candidates of a class score within 2e of
    each other (e: the largest score difference of the matched detections); below that score
    either may keep the other candidate, and every later choice in that class may differ. So a
    detection may go unmatched if it scores no higher than the highest such tie in its class
    (seen among both sides' detections), lies at the score threshold, or scores below the other
    side's lowest while the other side is full (`cap`). It fails, inconclusive, when some go
    unmatched and no match scores above its class's ties (every score tying, as with untrained
    weights), or when there are no detections at all."""
    box_tol = DETECTION_TOLERANCE * scale
    score_tol = DETECTION_TOLERANCE  # scores lie in [0, 1]
    for k in ("boxes", "scores", "labels"):
        if k not in got or ref[k].shape[1:] != got[k].shape[1:]:
            shape = got[k].shape if k in got else "missing"
            return None, scale, False, f"output '{k}': {shape} in onnxruntime, {ref[k].shape} in torch"
    pairs = _match(ref, got, box_tol, score_tol)
    noise = max((float(abs(ref["scores"][i] - got["scores"][j])) for i, j in pairs), default=score_tol)
    tie_tol = 2 * max(noise, 1e-5)
    levels = _tie_levels(ref, got, pairs, tie_tol)
    n_ref, n_got = len(ref["scores"]), len(got["scores"])

    def explained(side: dict, i: int, other: dict) -> bool:
        s = float(side["scores"][i])
        if s <= levels.get(int(side["labels"][i]), -1.0) + tie_tol:
            return True  # at or below a tie in its class
        if thresh is not None and abs(s - thresh) <= score_tol:
            return True  # at the score threshold
        # Cut by the cap on detections per image on the other side.
        return cap is not None and len(other["scores"]) >= cap and s <= float(other["scores"].min()) + tie_tol

    matched_ref = {i for i, _ in pairs}
    matched_got = {j for _, j in pairs}
    unmatched = [(ref, i, got) for i in range(n_ref) if i not in matched_ref]
    unmatched += [(got, j, ref) for j in range(n_got) if j not in matched_got]
    bad = [(side, i) for side, i, other in unmatched if not explained(side, i, other)]
    # Matches above their class's ties are the ones that must agree.
    clear = [(i, j) for i, j in pairs if float(ref["scores"][i]) > levels.get(int(ref["labels"][i]), -1.0) + tie_tol]

    diff = None
    parts = [f"{n_ref} torch / {n_got} onnxruntime detections, {len(pairs)} matched"]
    if pairs:
        i, j = (np.array(v) for v in zip(*pairs))
        diff = float(np.abs(ref["boxes"][i] - got["boxes"][j]).max())
        score_diff = float(np.abs(ref["scores"][i] - got["scores"][j]).max())
        parts[0] += (f" ({len(clear)} above any score tie; same label, max box diff {diff:.3g} px, tolerance "
                     f"{box_tol:.3g} = {DETECTION_TOLERANCE:g} * {scale:g} px; max score diff {score_diff:.3g}, "
                     f"tolerance {score_tol:.3g})")
        for k in ref:
            if k not in ("boxes", "scores", "labels") and k in got and ref[k].shape[1:] == got[k].shape[1:]:
                parts.append(f"max {k} diff {float(np.abs(ref[k][i] - got[k][j]).max()):.3g} (reported, not checked)")
    if unmatched:
        parts.append(f"{len(unmatched) - len(bad)} unmatched at or below a score tie in their class, at the "
                     "threshold or cut by the cap (NMS and top-k break ties their own way)")
    ok = not bad
    if bad:
        side, i = bad[0]
        who = "torch" if side is ref else "onnxruntime"
        parts.append(f"{len(bad)} unmatched that no tie explains, e.g. {who}'s label {int(side['labels'][i])} "
                     f"score {float(side['scores'][i]):.4g} box {np.round(side['boxes'][i], 2).tolist()}")
    elif not (n_ref or n_got):
        ok = False
        parts.append("inconclusive: no detections to compare")
    elif unmatched and not clear:
        ok = False
        parts.append("inconclusive: scores tie from the top of every class (weights that are not trained? or boxes "
                     f"that differ where scores agree), {_TIED}")
    return diff, scale, ok, "; ".join(parts)


__all__ = ["DETECTION_TOLERANCE", "ExportCheck", "ExportResult", "ModelExport", "TOLERANCE_TEXT", "detection_outputs",
           "export_bundle", "export_onnx", "judge_detections", "labels_of", "output_names"]
