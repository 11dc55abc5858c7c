"""The checks an export runs on the files it wrote: onnx's checker on each graph, onnxruntime
against torch on each graph, the bytes on disk against the merged workload's unique bytes, the
sharing on disk against the plan, and no graph keeping a copy of a stored tensor. What they
found, with the bundle's byte counts, is the export's result (`ExportResult`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..analysis.inventory import tensor_nbytes
from ..runtime.bundle import WEIGHTS, BundleModel, safetensors_layout
from .detection_match import DETECTION_TOLERANCE_TEXT, compare_detections

# onnxruntime agrees with torch when max |ort - torch| <= REL_TOLERANCE * max |torch| + ABS_FLOOR.
REL_TOLERANCE = 1e-4
ABS_FLOOR = 1e-6
TOLERANCE_TEXT = f"max|onnxruntime - torch| <= {REL_TOLERANCE:g} * max|torch| + {ABS_FLOOR:g}"


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
    """What `export_bundle` wrote and what its checks found."""
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
        return {**asdict(self), "bundle": str(self.bundle), "ok": self.ok}


def _compare_logits(model: torch.nn.Module, path: Path, spec: BundleModel,
                    gen: torch.Generator) -> tuple[float, float]:
    """(max |onnxruntime - torch| of the logits, max |torch logits|) on two random images."""
    import onnxruntime as ort

    x = torch.rand(2, *spec.input_size, generator=gen)  # what the model expects: [0, 1] images
    with torch.no_grad():
        ref = model(x).numpy()
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run([spec.onnx_output], {spec.onnx_input: x.numpy()})[0]
    return float(abs(got - ref).max()), float(abs(ref).max())


def _check_graphs(folder: Path, specs: list[BundleModel], models: dict[str, torch.nn.Module],
                  exports: dict[str, tuple[int, int, int]]) -> tuple[list[ExportCheck], list[ModelExport]]:
    """onnx's checker and onnxruntime against torch on each graph; one row per model."""
    import onnx

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
            diff, scale, ok, detail = compare_detections(models[spec.name], path, spec, gen)
        else:
            diff, scale = _compare_logits(models[spec.name], path, spec, gen)
            ok = diff <= REL_TOLERANCE * scale + ABS_FLOOR
            detail = f"max abs diff {diff:.3g}, output scale {scale:.3g} ({TOLERANCE_TEXT})"
        checks.append(ExportCheck(f"{spec.name}: onnxruntime vs torch", ok, detail))
        rows.append(ModelExport(spec.name, spec.onnx, path.stat().st_size, *exports[spec.name], diff, scale))
    return checks, rows


def run_checks(folder: Path, specs: list[BundleModel], models: dict[str, torch.nn.Module],
               exports: dict[str, tuple[int, int, int]], plan_path: Path, notes: list[str]) -> ExportResult:
    """Every check on the bundle written to `folder`, as the export's result for that folder:
    `exports` holds each graph's counts from `export_onnx` (external initializers, copied tensor
    bytes, constant bytes), `plan_path` the merge plan whose kept groups the sharing on disk
    must match."""
    from ..merging.plan import GroupState, load_plan
    from ..merging.tying import unique_param_bytes

    checks, rows = _check_graphs(folder, specs, models, exports)
    weights = folder / WEIGHTS
    start, _ = safetensors_layout(weights)
    weights_file = weights.stat().st_size
    data_bytes = weights_file - start
    unique = unique_param_bytes(models.values(), include_buffers=True)
    summed = sum(tensor_nbytes(t) for m in models.values() for t in m.state_dict().values())
    checks.append(ExportCheck("weights stored once", data_bytes == unique,
                              f"{data_bytes} bytes of tensor data on disk; the merged workload's unique "
                              f"parameter and buffer bytes {unique}; stored apart {summed}"))
    # Independently of the tensor map: the sharing on disk is what the plan's kept groups save.
    kept = sum(g.savings_bytes for g in load_plan(plan_path).groups if g.state is GroupState.kept)
    params_apart = sum(tensor_nbytes(p) for m in models.values() for p in m.parameters())
    params_unique = unique_param_bytes(models.values())
    checks.append(ExportCheck("sharing matches the plan", params_unique == params_apart - kept,
                              f"unique parameter bytes {params_unique}; stored apart {params_apart} less the "
                              f"kept groups' savings {kept} = {params_apart - kept}"))
    copied = sum(r.copied_tensor_bytes for r in rows)
    checks.append(ExportCheck("ONNX graphs add no copy of stored tensors", copied == 0,
                              f"{copied} bytes of model tensors copied into the graphs; "
                              f"{sum(r.constant_bytes for r in rows)} bytes of the graphs' own constants"))
    tolerance = TOLERANCE_TEXT
    if any(s.task == "detection" and s.onnx for s in specs):
        tolerance = f"classifiers: {TOLERANCE_TEXT}; detectors: {DETECTION_TOLERANCE_TEXT}"
    total = sum(p.stat().st_size for p in folder.iterdir())
    return ExportResult(folder, rows, data_bytes, weights_file, unique, summed, total, tolerance=tolerance,
                        checks=checks, notes=notes)


__all__ = ["ABS_FLOOR", "REL_TOLERANCE", "TOLERANCE_TEXT", "ExportCheck", "ExportResult", "ModelExport",
           "run_checks"]
