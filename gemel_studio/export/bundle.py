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
"""

from __future__ import annotations

import io
import json
import mmap
import re
import shutil
import tarfile
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..errors import GemelError
from ..models import build_model
from ..runtime.bundle import (MANIFEST, WEIGHTS, BundleManifest, BundleModel, FileEntry, Preprocessing, build_models,
                              safetensors_layout, sha256_of)
from ..workload import CheckpointSource, ModelSpec, TorchvisionSource, Workload, load_workload

MERGED_FILES = ("merged.safetensors", "plan.yaml", "report.json", "workload.yaml")
OPSET = 17
# onnxruntime agrees with torch when max |ort - torch| <= REL_TOLERANCE * max |torch| + ABS_FLOOR.
REL_TOLERANCE = 1e-4
ABS_FLOOR = 1e-6
TOLERANCE_TEXT = f"max|onnxruntime - torch| <= {REL_TOLERANCE:g} * max|torch| + {ABS_FLOOR:g}"

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
    max_abs_diff: float | None  # onnxruntime against torch on the check input
    output_scale: float | None  # max |torch output|


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
    """Class names where the dataset says them, else the class indices as text."""
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
    names = names[: spec.num_classes]
    return names + [str(i) for i in range(len(names), spec.num_classes)]


def _bundle_model(workload: Workload, spec: ModelSpec, tensors: dict[str, str], onnx_file: str | None) -> BundleModel:
    c, h, w = workload.input_size_of(spec)
    return BundleModel(name=spec.name, task=spec.task, architecture=spec.source.architecture,
                       num_classes=spec.num_classes, input_size=(c, h, w),
                       preprocessing=Preprocessing(color="GRAY" if c == 1 else "RGB", channels=c, size=(h, w)),
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


def export_onnx(model: torch.nn.Module, spec: BundleModel, weights: Path) -> tuple[bytes, int, int, int]:
    """The model's ONNX graph with every stored tensor as external data in `weights` (a file
    beside the graph). Returns (serialized graph, external initializers, bytes of stored tensors
    the graph had to keep a copy of, bytes of the graph's own constants)."""
    import onnx
    from onnx import numpy_helper

    buf = io.BytesIO()
    x = torch.zeros(1, *spec.input_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        # keep_initializers_as_inputs=True skips the pass that merges equal-valued initializers
        # (fresh batch norms all hold ones and zeros) so every initializer keeps its state_dict
        # name; no constant folding, so batch norm is not folded into the convolutions.
        torch.onnx.export(model, (x,), buf, dynamo=False, do_constant_folding=False,
                          training=torch.onnx.TrainingMode.EVAL, keep_initializers_as_inputs=True,
                          input_names=[spec.onnx_input], output_names=[spec.onnx_output], opset_version=OPSET,
                          dynamic_axes={spec.onnx_input: {0: "batch"}, spec.onnx_output: {0: "batch"}})
    proto = onnx.load_from_string(buf.getvalue())
    init_names = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init_names]
    del proto.graph.input[:]
    proto.graph.input.extend(inputs)

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
        onnx_file = _file_name(spec.name, taken) if spec.task == "classification" else None
        if onnx_file is None:
            notes.append(f"{spec.name}: {spec.task} models get no ONNX graph yet (torch backend only)")
        specs.append(_bundle_model(workload, spec, tensors, onnx_file))

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
        for spec in specs:
            if spec.onnx is None:
                continue
            try:
                graph, *counts = export_onnx(models[spec.name], spec, weights)
            except GemelError:
                raise
            except Exception as exc:  # the exporter's errors have many types
                raise GemelError(f"model '{spec.name}': ONNX export failed: {exc}") from None
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
            diff, scale = _compare(models[spec.name], path, spec, gen)
            ok = diff <= REL_TOLERANCE * scale + ABS_FLOOR
            checks.append(ExportCheck(f"{spec.name}: onnxruntime vs torch", ok,
                                      f"max abs diff {diff:.3g}, output scale {scale:.3g} ({TOLERANCE_TEXT})"))
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
        return ExportResult(archive_path or folder, rows, data_bytes, weights_file, unique, summed, total,
                            checks=checks, notes=notes)
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


__all__ = ["ExportCheck", "ExportResult", "ModelExport", "TOLERANCE_TEXT", "export_bundle", "export_onnx", "labels_of"]
