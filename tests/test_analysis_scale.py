"""Workloads of many models: identical models are built and measured once, and the result is
the same as analysing every model on its own."""

from __future__ import annotations

import pytest
import torch

import gemel_studio.analysis as analysis_module
from gemel_studio.analysis import analyze_workload, find_share_groups, inventory_from_built
from gemel_studio.errors import ModelLoadError
from gemel_studio.models import build_model
from gemel_studio.workload import load_workload

from .conftest import SmallNet, tv


@pytest.fixture
def count_builds(monkeypatch):
    """Counts the models analyze_workload builds (by model name)."""
    built: list[str] = []

    def counting(workload, spec, materialize=False):
        built.append(spec.name)
        return build_model(workload, spec, materialize=materialize)

    monkeypatch.setattr(analysis_module, "build_model", counting)
    return built


def _alone(workload) -> list:
    """Each model built and measured on its own, as before fleets were deduplicated."""
    return [inventory_from_built(build_model(workload, spec), workload) for spec in workload.models]


def test_a_fleet_of_two_architectures_builds_each_distinct_model_once(write_workload, count_builds):
    archs, classes = ("resnet18", "squeezenet1_1"), (3, 5)
    models = [tv(f"cam{i:02d}", archs[i % 2], num_classes=classes[(i // 2) % 2]) for i in range(40)]
    models[7]["input_size"] = [3, 48, 48]  # another input size is another model
    w = load_workload(write_workload(models, input_size=[3, 32, 32]))
    result = analyze_workload(w)
    assert len(count_builds) == result.built_models == 5
    assert count_builds == ["cam00", "cam01", "cam02", "cam03", "cam07"]  # the first of each kind, in order
    alone = _alone(w)
    assert [m.to_dict() for m in result.models] == [m.to_dict() for m in alone]
    assert [m.name for m in result.models] == [spec.name for spec in w.models]
    assert result.model("cam07").input_size == (3, 48, 48)
    assert result.model("cam07").activation_bytes != result.model("cam03").activation_bytes
    for alignment in ("structure", "order"):
        groups = analyze_workload(w, alignment=alignment).groups if alignment == "order" else result.groups
        assert [g.to_dict() for g in groups] == [g.to_dict() for g in find_share_groups(alone, alignment)]
    # Copies carry their own name and their own lists; the records themselves are shared.
    a, b = result.model("cam00"), result.model("cam04")
    assert a.layers is not b.layers and a.notes is not b.notes and a.layers[0] is b.layers[0]
    assert result.max_savings_fraction == pytest.approx(
        sum(g.savings_bytes for g in find_share_groups(alone)) / sum(m.param_bytes for m in alone))


def _small_state(num_classes: int = 2, dtype=torch.float32) -> dict:
    torch.manual_seed(0)
    from torchvision.models import mobilenet_v3_small

    return {k: v.to(dtype) if v.is_floating_point() else v
            for k, v in mobilenet_v3_small(num_classes=num_classes).state_dict().items()}


def _ckpt(name: str, path, num_classes: int = 2) -> dict:
    return {"name": name, "source": {"kind": "checkpoint", "architecture": "mobilenet_v3_small", "path": str(path)},
            "num_classes": num_classes}


def test_weight_files_are_keyed_on_their_header_and_each_is_checked(tmp_path, write_workload, count_builds):
    from safetensors.torch import save_file

    state = _small_state()
    save_file(state, tmp_path / "a.safetensors")
    save_file({k: v + 1 if v.is_floating_point() else v for k, v in state.items()}, tmp_path / "b.safetensors")
    save_file(_small_state(dtype=torch.float16), tmp_path / "half.safetensors")
    torch.save(state, tmp_path / "c.pt")
    models = [_ckpt("a", tmp_path / "a.safetensors"), _ckpt("b", tmp_path / "b.safetensors"),
              _ckpt("a2", tmp_path / "a.safetensors"), _ckpt("half", tmp_path / "half.safetensors"),
              _ckpt("c", tmp_path / "c.pt")]
    w = load_workload(write_workload(models))
    result = analyze_workload(w)
    # a, b and c hold the same names, shapes and dtypes: one build; the fp16 file is another model.
    assert count_builds == ["a", "half"]
    assert [m.to_dict() for m in result.models] == [m.to_dict() for m in _alone(w)]
    assert result.model("half").param_bytes * 2 == result.model("b").param_bytes
    assert [m.source_kind for m in result.models] == ["checkpoint"] * 5

    # Every file is still checked, also when its model's twin was analysed before it.
    for broken, message in (
        ({"path": str(tmp_path / "missing.safetensors")}, "missing.safetensors: no such file"),
        ({"num_classes": 7}, "does not fit the architecture"),
    ):
        bad = {**_ckpt("late", tmp_path / "b.safetensors"), **{k: v for k, v in broken.items() if k != "path"}}
        if "path" in broken:
            bad["source"] = {**bad["source"], "path": broken["path"]}
        w = load_workload(write_workload(models + [bad], name="broken.yaml"))
        with pytest.raises(ModelLoadError, match=message):
            analyze_workload(w)
    (tmp_path / "trunc.safetensors").write_bytes((tmp_path / "a.safetensors").read_bytes()[:100])
    w = load_workload(write_workload(models + [_ckpt("late", tmp_path / "trunc.safetensors")], name="trunc.yaml"))
    with pytest.raises(ModelLoadError, match="trunc.safetensors: corrupt or truncated"):
        analyze_workload(w)


def test_an_error_of_a_twin_reads_as_it_did_before(write_workload):
    """A model whose key cannot be computed is built, so its error is the build's own."""
    models = [tv("a", "resnet18"), tv("b", "resnet18", task="detection")]
    w = load_workload(write_workload(models))
    with pytest.raises(ModelLoadError) as caught:
        analyze_workload(w)
    with pytest.raises(ModelLoadError) as direct:
        build_model(w, w.models[1])
    assert str(caught.value) == str(direct.value)


def test_torchscript_files_are_keyed_on_the_file(tmp_path, write_workload, count_builds):
    torch.manual_seed(0)
    torch.jit.script(SmallNet()).save(str(tmp_path / "net.pt"))
    torch.jit.script(SmallNet(classes=6)).save(str(tmp_path / "other.pt"))
    models = [{"name": n, "source": {"kind": "torchscript", "path": str(tmp_path / f)}}
              for n, f in (("s1", "net.pt"), ("s2", "other.pt"), ("s3", "net.pt"))]
    models[2]["source"]["architecture"] = "labelled"
    w = load_workload(write_workload(models))
    result = analyze_workload(w)
    assert count_builds == ["s1", "s2"]
    assert [m.to_dict() for m in result.models] == [m.to_dict() for m in _alone(w)]
    assert result.model("s3").architecture == "labelled"
    missing = {"name": "s4", "source": {"kind": "torchscript", "path": str(tmp_path / "gone.pt")}}
    with pytest.raises(ModelLoadError, match="gone.pt: no such file"):
        analyze_workload(load_workload(write_workload(models + [missing], name="gone.yaml")))


def test_real_weights_on_the_cpu_key_on_the_file(tmp_path, write_workload, count_builds):
    from safetensors.torch import save_file

    state = _small_state()
    save_file(state, tmp_path / "a.safetensors")
    save_file(state, tmp_path / "b.safetensors")
    models = [_ckpt("a", tmp_path / "a.safetensors"), _ckpt("b", tmp_path / "b.safetensors"),
              _ckpt("a2", tmp_path / "a.safetensors")]
    w = load_workload(write_workload(models, input_size=[3, 32, 32]))
    meta = analyze_workload(w)
    count_builds.clear()
    cpu = analyze_workload(w, device="cpu")
    assert count_builds == ["a", "b"]  # each file's data read once
    assert [m.activation_bytes for m in cpu.models] == [m.activation_bytes for m in meta.models]
    assert [g.to_dict() for g in cpu.groups] == [g.to_dict() for g in meta.groups]
