"""Writing a deployable bundle from a merged folder (`gemel export`), and checking it.

`export_bundle` runs named steps in order: read the merged folder (`merged_folder`), write the
weights, write each model's ONNX graph (`onnx_graph`), write the manifest (`manifest`), run
the checks on the written files (`checks`; detectors' in `detection_match`) and, if asked,
archive the folder. The bundle's `weights.safetensors` is the merged folder's
`merged.safetensors` byte for byte, every distinct tensor once, and every graph reads its
stored tensors from there as ONNX external data, so no graph carries a copy of a shared weight.
"""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from pathlib import Path

from ..errors import Cancelled, GemelError
from ..merging.folder import save_shared_weights
from ..progress import Progress
from ..runtime.bundle import MANIFEST, WEIGHTS
from .checks import TOLERANCE_TEXT, ExportCheck, ExportResult, ModelExport, run_checks
from .detection_match import DETECTION_TOLERANCE, compare_detections, judge_detections
from .manifest import labels_of, write_manifest
from .merged_folder import MergedFolder, read_merged_folder
from .onnx_graph import detection_outputs, export_onnx, output_names

def _prepare_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise GemelError(f"{out}: exists and is not a folder; choose another bundle path")
        if any(out.iterdir()) and not (out / MANIFEST).is_file():
            raise GemelError(f"{out}: folder is not empty and not a bundle; choose an empty or new folder")
        shutil.rmtree(out)
    out.mkdir(parents=True)


def write_weights(merged: MergedFolder, folder: Path) -> Path:
    """`weights.safetensors` (with the plan and the merge report beside it) in `folder`."""
    weights = folder / WEIGHTS
    if merged.untouched:
        save_shared_weights(weights, merged.stored, {s.name: s.tensors for s in merged.specs})
    else:
        shutil.copyfile(merged.weights, weights)  # already each tensor once
    shutil.copyfile(merged.path / "plan.yaml", folder / "plan.yaml")
    shutil.copyfile(merged.path / "report.json", folder / "report.json")
    return weights


def write_graphs(merged: MergedFolder, folder: Path, weights: Path) -> dict[str, tuple[int, int, int]]:
    """Each model's graph beside `weights`; returns each written graph's counts from
    `export_onnx`. A detector the exporter cannot trace loses its graph (and runs on the torch
    backend) with a note; any other model's export failure is an error."""
    specs = merged.specs
    exports: dict[str, tuple[int, int, int]] = {}
    for i, spec in enumerate(specs):
        if spec.onnx is None:
            continue
        model = merged.models[spec.name]
        try:
            if spec.task == "detection":
                names = detection_outputs(model, spec)
                spec = specs[i] = spec.model_copy(update={"onnx_outputs": names, "onnx_output": names[0]})
            graph, *counts = export_onnx(model, spec, weights)
        except Exception as exc:  # the exporter's errors have many types
            why = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            if spec.task != "detection":
                if isinstance(exc, GemelError):
                    raise
                raise GemelError(f"model '{spec.name}': ONNX export failed: {exc}") from None
            specs[i] = spec.model_copy(update={"onnx": None, "onnx_outputs": None, "onnx_output": "output"})
            merged.notes.append(f"{spec.name}: no ONNX graph ({spec.architecture}: the TorchScript exporter failed: "
                                f"{why}); torch backend only")
            continue
        (folder / spec.onnx).write_bytes(graph)
        exports[spec.name] = tuple(counts)
    return exports


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


def export_bundle(merged_dir: Path | str, out: Path | str, archive: bool = False,
                  progress: Progress | None = None) -> ExportResult:
    """Write the bundle for the merged folder `merged_dir` to `out` (a folder; with
    `archive=True` a .tar file, '.tar' appended unless `out` ends in .tar/.tar.gz), then check it.
    `progress` steps once per stage (five, six with the archive) and may cancel between stages;
    a cancelled export leaves no half-written bundle behind."""
    progress = progress or Progress()
    merged_dir, out = Path(merged_dir), Path(out)
    progress.start(6 if archive else 5, "reading the merged folder")
    merged = read_merged_folder(merged_dir)
    progress.step("writing the weights")
    archive_path = _archive_path(out) if archive else None
    scratch = Path(tempfile.mkdtemp(prefix="gemel-export-")) if archive else None
    folder = scratch / "bundle" if scratch else out
    try:
        _prepare_out(folder)
        weights = write_weights(merged, folder)
        progress.step("writing the ONNX graphs")
        exports = write_graphs(merged, folder, weights)
        progress.step("writing the manifest")
        write_manifest(folder, merged.workload, merged.specs)
        progress.step("checking the bundle")
        result = run_checks(folder, merged.specs, merged.models, exports, merged_dir / "plan.yaml", merged.notes)
        if archive_path is None:
            progress.step(f"checked: {sum(c.passed for c in result.checks)}/{len(result.checks)} passed",
                          check=False)
            return result
        progress.step("archiving the bundle")
        archive_path.parent.mkdir(parents=True, exist_ok=True)
        write_archive(folder, archive_path)
        progress.step(f"archived to {archive_path.name}", check=False)
        result.bundle, result.bundle_bytes = archive_path, archive_path.stat().st_size
        return result
    except Cancelled:
        if scratch is None:
            shutil.rmtree(folder, ignore_errors=True)  # emptied or created above: nothing of the user's
        raise
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)


# Re-exported: callers import these names from here.
__all__ = ["DETECTION_TOLERANCE", "ExportCheck", "ExportResult", "ModelExport", "TOLERANCE_TEXT", "compare_detections",
           "detection_outputs", "export_bundle", "export_onnx", "judge_detections", "labels_of", "output_names",
           "write_archive"]
