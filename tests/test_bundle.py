"""Bundles: `gemel export` writes weights once and ONNX graphs that point into them; the
runtime's `load_bundle` verifies checksums, refuses unsafe archives and shares tensors."""

from __future__ import annotations

import io
import json
import shutil
import tarfile

import numpy as np
import pytest
import torch

from gemel_studio.cli import main
from gemel_studio.errors import GemelError
from gemel_studio.export import export_bundle
from gemel_studio.runtime import BundleError, load_bundle
from gemel_studio.runtime.bundle import safetensors_layout
from gemel_studio.workload import load_workload

from .conftest import EDGE_BLOCKED, run_python_blocking, tv

HEADS = {"color": 3, "shape": 3, "size": 2}


@pytest.fixture(scope="module")
def merged(tmp_path_factory):
    """A merged folder as `gemel merge` writes it, without retraining: three resnet18s at
    16x16 tied by every proposed group (the two 3-class heads share their classifier too),
    and a mobilenet that shares nothing, so the merge leaves it out of merged.safetensors."""
    import yaml

    from gemel_studio.analysis import analyze_workload
    from gemel_studio.merging import GroupState, apply_plan, propose_plan
    from gemel_studio.merging.pipeline import write_merged_folder
    from gemel_studio.models.zoo import construct

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("merge")
    entries = [tv(t, "resnet18", num_classes=n, dataset={"kind": "synthetic", "task": t, "samples": 8, "seed": i})
               for i, (t, n) in enumerate(HEADS.items())]
    entries.append(tv("spare", "mobilenet_v3_small", num_classes=2))
    src = root / "workload.yaml"
    src.write_text(yaml.safe_dump({"version": 1, "name": "bundle-test", "input_size": [3, 16, 16],
                                   "models": entries}, sort_keys=False))
    workload = load_workload(src)
    plan = propose_plan(workload, analyze_workload(workload))
    for g in plan.groups:
        g.state = GroupState.kept
    models = {n: construct("resnet18", k, "cpu")[0].eval() for n, k in HEADS.items()}
    for m in models.values():  # batch-norm statistics that are not all ones and zeros
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    apply_plan(models, plan)
    out = root / "merged"
    write_merged_folder(out, workload, models, plan, {"workload": workload.name, "models": {}})
    return out, models


@pytest.fixture(scope="module")
def bundle(merged, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle") / "b"
    return export_bundle(merged[0], out), out


def _param_bytes(models) -> int:
    return sum(p.numel() * p.element_size() for m in models.values() for p in m.parameters())


def test_export_checks_pass_and_shared_weights_are_on_disk_once(merged, bundle):
    _, models = merged
    result, out = bundle
    assert result.ok, [c for c in result.checks if not c.passed]
    assert {c.name for c in result.checks} >= {"color: onnx checker", "shape: onnxruntime vs torch",
                                               "weights stored once"}
    # Tensor data on disk is the unique bytes, far below the models stored apart.
    assert result.weights_data_bytes == result.unique_bytes < 0.5 * result.sum_model_bytes
    assert (out / "weights.safetensors").stat().st_size - result.weights_data_bytes < 256 * 1024  # header and tensor map only
    # The graphs hold no weights of their own: the whole bundle is smaller than the models' parameters.
    for row in result.models:
        assert row.copied_tensor_bytes == 0 and row.constant_bytes < 1024 and row.external_initializers > 60
        assert row.onnx_bytes < 200 * 1024
    total = sum(p.stat().st_size for p in out.iterdir())
    assert total == result.bundle_bytes < _param_bytes(models)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["version"] == 1 and set(manifest["files"]) == {
        "weights.safetensors", "plan.yaml", "report.json", "color.onnx", "shape.onnx", "size.onnx", "spare.onnx"}
    assert any(n.startswith("spare: not merged") for n in result.notes)
    color = next(m for m in manifest["models"] if m["name"] == "color")
    assert color["labels"] == ["red", "green", "blue"] and color["input_size"] == [3, 16, 16]
    assert color["preprocessing"]["value_range"] == [0.0, 1.0] and color["preprocessing"]["layout"] == "NCHW"


def test_onnx_initializers_point_into_the_weights_file(bundle):
    import onnx

    _, out = bundle
    start, header = safetensors_layout(out / "weights.safetensors")
    proto = onnx.load(str(out / "shape.onnx"), load_external_data=False)
    tmap = json.loads((out / "manifest.json").read_text())["models"][1]["tensors"]
    shared = 0
    for init in proto.graph.initializer:
        ext = {e.key: e.value for e in init.external_data}
        assert ext["location"] == "weights.safetensors"
        begin, end = header[tmap[init.name]]["data_offsets"]
        assert (int(ext["offset"]), int(ext["length"])) == (start + begin, end - begin)
        shared += tmap[init.name].startswith("color.")
    assert shared > 60  # the shape model reads the color model's stored tensors


def test_load_round_trips_with_shared_storage_and_both_backends(merged, bundle):
    _, models = merged
    _, out = bundle
    with load_bundle(out) as b:
        assert set(b.models) == {*HEADS, "spare"}
        a, s, z = (b.models[n] for n in ("color", "shape", "size"))
        assert a.conv1.weight.data_ptr() == s.conv1.weight.data_ptr() == z.conv1.weight.data_ptr()
        assert a.fc.weight.data_ptr() == s.fc.weight.data_ptr() != z.fc.weight.data_ptr()
        assert b.unique_bytes() == sum(t.untyped_storage().nbytes() for t in b.tensors.values())
        x = torch.rand(2, 3, 16, 16)
        for name, model in b.models.items():
            with torch.no_grad():
                got = model(x)
                want = models[name](x) if name in models else got  # spare: the ONNX check below
            assert torch.equal(got, want)
            for share in (False, True):
                onnx_out = b.session(name, share_weights=share).run(None, {"input": x.numpy()})[0]
                assert np.abs(onnx_out - want.numpy()).max() <= 1e-4 * want.abs().max().item() + 1e-6


def test_archive_round_trips(merged, tmp_path):
    result = export_bundle(merged[0], tmp_path / "edge", archive=True)
    assert result.bundle == tmp_path / "edge.tar" and result.bundle.is_file() and result.ok
    with load_bundle(result.bundle) as b:
        folder = b.folder
        assert folder.is_dir() and set(b.models) == {*HEADS, "spare"}
    assert not folder.exists()  # the extraction folder goes with the bundle


def _copy(out, tmp_path):
    dest = tmp_path / "copy"
    shutil.copytree(out, dest)
    return dest


@pytest.mark.parametrize("name", ["weights.safetensors", "shape.onnx"])
def test_a_tampered_file_is_refused(bundle, tmp_path, name):
    dest = _copy(bundle[1], tmp_path)
    data = bytearray((dest / name).read_bytes())
    data[-5] ^= 0xFF
    (dest / name).write_bytes(bytes(data))
    with pytest.raises(BundleError, match=rf"{name}: checksum mismatch.*re-export") as info:
        load_bundle(dest)
    assert "\n" not in str(info.value)


def test_another_schema_version_is_refused(bundle, tmp_path):
    dest = _copy(bundle[1], tmp_path)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["version"] = 2
    (dest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 2"):
        load_bundle(dest)


def _evil_archive(path, member: tarfile.TarInfo, data: bytes = b"x"):
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
        member.size = len(data) if member.isreg() else 0
        tar.addfile(member, io.BytesIO(data) if member.isreg() else None)
    return path


def _link(name, target, kind):
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


@pytest.mark.parametrize("member,why", [
    (tarfile.TarInfo("../evil"), "'..'"),
    (tarfile.TarInfo("bundle/../../evil"), "'..'"),
    (tarfile.TarInfo("/tmp/evil"), "absolute path"),
    (_link("weights.safetensors", "/etc/passwd", tarfile.SYMTYPE), "a link"),
    (_link("weights.safetensors", "manifest.json", tarfile.LNKTYPE), "a link"),
    (_link("dev", "", tarfile.CHRTYPE), "device"),
])
def test_unsafe_archives_are_refused_before_extraction(tmp_path, member, why):
    archive = _evil_archive(tmp_path / "evil.tar", member)
    dest = tmp_path / "x"
    with pytest.raises(BundleError, match=why):
        load_bundle(archive, extract_to=dest)
    assert not (tmp_path / "evil").exists() and not list(dest.iterdir())


def test_cli_export_prints_checks_and_refuses_an_incomplete_folder(merged, tmp_path, capsys):
    src, _ = merged
    assert main(["export", str(src), "-o", str(tmp_path / "b.tar"), "--archive"]) == 0
    text = capsys.readouterr().out
    assert "onnxruntime vs torch" in text and "pass" in text and (tmp_path / "b.tar").is_file()
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(src / "merged.safetensors", partial)
    assert main(["export", str(partial), "-o", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing plan.yaml, report.json, workload.yaml" in err
    assert main(["export", str(tmp_path / "nowhere"), "-o", str(tmp_path / "c")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_export_refuses_to_overwrite_a_folder_that_is_not_a_bundle(merged, tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "notes.txt").write_text("mine")
    with pytest.raises(GemelError, match="not empty and not a bundle"):
        export_bundle(merged[0], tmp_path / "docs")
    assert (tmp_path / "docs" / "notes.txt").read_text() == "mine"


def test_a_fresh_interpreter_loads_a_bundle_without_the_merging_code(bundle):
    """What an edge box does: the runtime alone, with merging, export and Qt unimportable."""
    body = f"""
import torch
from gemel_studio.runtime import load_bundle
with load_bundle({str(bundle[1])!r}) as b:
    x = torch.rand(1, 3, 16, 16)
    assert b.models['size'](x).shape == (1, 2)
    assert b.session('size', share_weights=True).run(None, {{'input': x.numpy()}})[0].shape == (1, 2)
"""
    proc = run_python_blocking(EDGE_BLOCKED, body)
    assert proc.returncode == 0, proc.stderr


def test_a_gzipped_archive_loads(bundle, tmp_path):
    from gemel_studio.export.bundle import write_archive

    write_archive(bundle[1], tmp_path / "b.tar.gz")
    with load_bundle(tmp_path / "b.tar.gz") as b:
        assert set(b.models) == {*HEADS, "spare"}


def test_a_manifest_naming_files_outside_the_bundle_is_refused(bundle, tmp_path):
    dest = _copy(bundle[1], tmp_path)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["files"]["../outside"] = manifest["files"]["plan.yaml"]
    (dest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="'../outside' points outside the bundle"):
        load_bundle(dest)
    (dest / "plan.yaml").unlink()
    del manifest["files"]["../outside"]
    (dest / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="plan.yaml: missing from the bundle; re-export"):
        load_bundle(dest)



def test_a_truncated_gzip_archive_is_a_one_line_error(bundle, tmp_path):
    from gemel_studio.runtime.bundle import peek_manifest

    _, out = bundle
    archive = tmp_path / "b.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(out, arcname="b")
    data = archive.read_bytes()
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(data[: len(data) // 3])
    with pytest.raises(BundleError, match="cut.tar.gz.*re-export") as info:
        load_bundle(cut)
    assert "\n" not in str(info.value)
    cut.write_bytes(data[:60])  # cut before the manifest: peeking at it fails too
    with pytest.raises(BundleError, match="cut.tar.gz.*truncated") as info:
        peek_manifest(cut)
    assert "\n" not in str(info.value)


def test_export_steps_its_progress_once_per_stage_and_a_cancel_leaves_no_folder(merged, tmp_path):
    from gemel_studio.errors import Cancelled
    from gemel_studio.progress import Progress

    seen = []
    result = export_bundle(merged[0], tmp_path / "b", archive=True,
                           progress=Progress(lambda d, t, m: seen.append((d, t)), 0))
    assert result.ok
    assert seen == [(d, 6) for d in range(7)]  # read, weights, graphs, manifest, checks, archive

    for stage in (1, 2, 3):
        progress = Progress(min_interval=0)
        progress._callback = lambda d, t, m, p=progress, n=stage: p.cancel() if d == n else None
        with pytest.raises(Cancelled):
            export_bundle(merged[0], tmp_path / f"x{stage}", progress=progress)
        assert not (tmp_path / f"x{stage}").exists()
