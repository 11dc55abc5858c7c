"""Workload files: schema validation with messages that name the file, model and field."""

from __future__ import annotations

import pytest

from gemel_studio.errors import WorkloadError
from gemel_studio.workload import CheckpointSource, Workload, load_workload, parse_workload, save_workload

from .conftest import SAMPLES, tv


def test_quickstart_sample_loads_with_defaults():
    w = load_workload(SAMPLES / "quickstart.yaml")
    assert w.name == "quickstart"
    assert [m.name for m in w.models] == ["shape", "count", "color", "size"]
    spec = w.model("count")
    assert spec.num_classes == 4 and spec.task == "classification"
    assert w.input_size_of(spec) == (3, 32, 32)
    assert spec.target.relative == 0.95 and spec.target.absolute is None
    assert spec.dataset.kind == "synthetic" and spec.dataset.seed == 2


def test_unknown_key_names_file_model_and_field(write_workload):
    path = write_workload([tv("cam1", "resnet18", num_clases=3)])
    with pytest.raises(WorkloadError) as err:
        load_workload(path)
    msg = str(err.value)
    assert str(path) in msg and "model 'cam1'" in msg and "num_clases" in msg and "unknown key" in msg
    assert "\n" not in msg


def test_unknown_architecture_suggests_close_names(write_workload):
    path = write_workload([tv("cam1", "resnet19")])
    with pytest.raises(WorkloadError, match=r"model 'cam1', field 'source.architecture': unknown torchvision "
                                            r"architecture 'resnet19'; did you mean .*resnet18"):
        load_workload(path)


def test_wrong_type_and_bad_source_kind(write_workload):
    with pytest.raises(WorkloadError, match=r"model 'a', field 'num_classes'.*integer"):
        load_workload(write_workload([tv("a", "resnet18", num_classes="ten")]))
    bad = {"name": "b", "source": {"kind": "keras", "path": "m.h5"}}
    with pytest.raises(WorkloadError, match=r"model 'b', field 'source'.*expected one of torchvision"):
        load_workload(write_workload([bad]))


def test_duplicate_model_names_are_refused(write_workload):
    path = write_workload([tv("cam", "resnet18"), tv("cam", "resnet34")])
    with pytest.raises(WorkloadError, match="duplicate model name 'cam'"):
        load_workload(path)


def test_target_needs_exactly_one_kind(write_workload):
    path = write_workload([tv("a", "resnet18", target={"relative": 0.9, "absolute": 0.8})])
    with pytest.raises(WorkloadError, match="exactly one of 'relative' or 'absolute'"):
        load_workload(path)


@pytest.mark.parametrize("content, expected", [
    ("models: [\n  - name: a\n", "not valid YAML at line"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_malformed_files(tmp_path, content, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(WorkloadError, match=expected):
        load_workload(path)


def test_missing_and_binary_files(tmp_path):
    with pytest.raises(WorkloadError, match="no such workload file"):
        load_workload(tmp_path / "nope.yaml")
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(WorkloadError, match="not a text file"):
        load_workload(binary)


def test_save_round_trip_rebases_relative_paths(tmp_path, write_workload):
    (tmp_path / "weights").mkdir()
    ckpt = {"name": "c", "source": {"kind": "checkpoint", "architecture": "resnet18", "path": "weights/c.pt"}}
    original = load_workload(write_workload([tv("a", "mobilenet_v2", num_classes=3), ckpt]))
    elsewhere = tmp_path / "sub" / "dir"
    elsewhere.mkdir(parents=True)
    save_workload(original, elsewhere / "copy.yaml")
    again = load_workload(elsewhere / "copy.yaml")
    assert [m.name for m in again.models] == ["a", "c"]
    assert again.model("a").num_classes == 3
    source = again.model("c").source
    assert isinstance(source, CheckpointSource)
    assert not source.path.is_absolute()
    assert again.resolve(source.path) == (tmp_path / "weights" / "c.pt").resolve()
    # The saved object now stands for the new file and still names the same weights.
    assert original.path == (elsewhere / "copy.yaml").resolve()
    assert original.resolve(original.model("c").source.path) == (tmp_path / "weights" / "c.pt").resolve()


def test_workload_file_without_models_is_refused(tmp_path, write_workload):
    with pytest.raises(WorkloadError, match=r"workload has no models; add at least one under models:"):
        load_workload(write_workload([]))
    (tmp_path / "bare.yaml").write_text("name: bare\n")
    with pytest.raises(WorkloadError, match="bare.yaml: workload has no models"):
        load_workload(tmp_path / "bare.yaml")
    # The studio starts from an empty workload in memory.
    empty = parse_workload({"name": "untitled", "models": []})
    assert empty.models == [] and Workload(name="untitled").models == []


def test_workload_path_that_is_a_folder(tmp_path):
    with pytest.raises(WorkloadError, match=r"is a folder; name the workload's YAML file"):
        load_workload(tmp_path)
