"""Model sources: checkpoints (safe loading), pretrained weights offline, TorchScript, ONNX."""

from __future__ import annotations

import os
import warnings

import onnx
import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import get_model

from gemel_studio.analysis import analyze_workload, find_share_groups
from gemel_studio.analysis.inventory import inventory_of_module
from gemel_studio.errors import ModelLoadError
from gemel_studio.models import build_model
from gemel_studio.workload import load_workload

from .conftest import SmallNet, tv


def _ckpt_entry(name: str, path: str, architecture: str = "resnet18", classes: int = 4) -> dict:
    return {"name": name, "num_classes": classes,
            "source": {"kind": "checkpoint", "architecture": architecture, "path": path}}


def _save(state, path, wrap: bool = False) -> None:
    if path.suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save({"state_dict": state} if wrap else state, path)


@pytest.fixture(scope="module")
def resnet18_state():
    torch.manual_seed(0)
    return get_model("resnet18", weights=None, num_classes=4).state_dict()


@pytest.mark.parametrize("filename", ["w.safetensors", "w.pt"])
def test_checkpoint_loads_real_weights(tmp_path, write_workload, resnet18_state, filename):
    _save(resnet18_state, tmp_path / filename, wrap=True)  # torch.save inside {'state_dict': ...}, a common wrapper
    w = load_workload(write_workload([_ckpt_entry("c", filename)]))
    built = build_model(w, w.models[0], materialize=True)
    assert torch.equal(built.module.conv1.weight, resnet18_state["conv1.weight"])
    inv = analyze_workload(w).models[0]  # analysis reads only the header
    assert inv.param_bytes == sum(v.numel() * 4 for k, v in resnet18_state.items()
                                  if "running" not in k and "num_batches" not in k)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_pickle_that_runs_code_is_refused(tmp_path, write_workload, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Exploit()}, tmp_path / "evil.pt")
    w = load_workload(write_workload([_ckpt_entry("evil", "evil.pt")]))
    with pytest.raises(ModelLoadError, match="refused: this file needs full unpickling"):
        analyze_workload(w)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("filename", ["w.safetensors", "w.pt"])
def test_truncated_checkpoint_is_reported_as_corrupt(tmp_path, write_workload, resnet18_state, filename):
    path = tmp_path / filename
    _save(resnet18_state, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    w = load_workload(write_workload([_ckpt_entry("c", filename)]))
    with pytest.raises(ModelLoadError, match=r"corrupt or truncated"):
        analyze_workload(w)


def test_checkpoint_that_does_not_fit_names_the_tensor(tmp_path, write_workload, resnet18_state):
    save_file(resnet18_state, tmp_path / "four.safetensors")
    w = load_workload(write_workload([_ckpt_entry("c", "four.safetensors", classes=10)]))
    with pytest.raises(ModelLoadError, match=r"does not fit the architecture: 2 tensor\(s\) of the wrong shape "
                                             r"\(first: fc.weight is \[4, 512\], the model expects \[10, 512\]\)"):
        analyze_workload(w)
    w = load_workload(write_workload([_ckpt_entry("c", "four.safetensors", architecture="resnet34")]))
    with pytest.raises(ModelLoadError, match=r"missing \(first: layer1.2.conv1.weight\)"):
        analyze_workload(w)


def test_missing_checkpoint_and_non_state_dict(tmp_path, write_workload):
    w = load_workload(write_workload([_ckpt_entry("c", "absent.pt")]))
    with pytest.raises(ModelLoadError, match="absent.pt: no such file"):
        analyze_workload(w)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    w = load_workload(write_workload([_ckpt_entry("c", "list.pt")]))
    with pytest.raises(ModelLoadError, match="not a state_dict"):
        analyze_workload(w)


def test_pretrained_weights_resolve_offline_from_the_hub_cache(tmp_path, write_workload, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    hub = tmp_path / "torch" / "hub" / "checkpoints"
    entry = tv("m", "mobilenet_v2", num_classes=3, **{})
    entry["source"]["weights"] = "IMAGENET1K_V1"
    w = load_workload(write_workload([entry]))
    with pytest.raises(ModelLoadError, match=r"weights IMAGENET1K_V1 are not in the torch hub cache"):
        analyze_workload(w)
    # A file of the right name and shapes: analysis uses it and reports the head it leaves out.
    hub.mkdir(parents=True)
    torch.save(get_model("mobilenet_v2", weights=None).state_dict(), hub / "mobilenet_v2-b0353104.pth")
    inv = analyze_workload(w).models[0]
    assert any("pretrained head not loaded" in n and "classifier.1.weight" in n for n in inv.notes)
    # Materialising checks the sha256 prefix in the file name: this file is not torchvision's.
    with pytest.raises(ModelLoadError, match="sha256 does not match"):
        build_model(w, w.models[0], materialize=True)


def test_unknown_weight_name(write_workload):
    entry = tv("m", "resnet18")
    entry["source"]["weights"] = "IMAGENET9K"
    w = load_workload(write_workload([entry]))
    with pytest.raises(ModelLoadError, match=r"no torchvision weights named 'IMAGENET9K' \(known: IMAGENET1K_V1"):
        analyze_workload(w)


def test_task_must_match_the_architecture(write_workload):
    w = load_workload(write_workload([tv("m", "resnet18", task="detection")]))
    with pytest.raises(ModelLoadError, match="resnet18 is a classification architecture but the workload says "
                                             "task: detection"):
        analyze_workload(w)


# --- TorchScript ---------------------------------------------------------------------------


def test_torchscript_layers_match_the_eager_model(tmp_path, write_workload):
    net = SmallNet()
    torch.jit.script(net).save(str(tmp_path / "small.ts"))
    entry = {"name": "ts", "source": {"kind": "torchscript", "path": "small.ts"}}
    w = load_workload(write_workload([entry]))
    inv = analyze_workload(w).models[0]
    eager = inventory_of_module(SmallNet().to("meta"), "eager", input_size=(3, 64, 64))
    assert [(r.name, r.kind, r.signature, r.param_bytes) for r in inv.layers] == \
           [(r.name, r.kind, r.signature, r.param_bytes) for r in eager.layers]
    assert inv.param_bytes == eager.param_bytes
    groups = find_share_groups([inv, eager])
    assert len(groups) == 3  # conv, bn, fc


def test_corrupt_torchscript(tmp_path, write_workload):
    (tmp_path / "bad.ts").write_bytes(b"PK\x03\x04 not really a zip")
    w = load_workload(write_workload([{"name": "ts", "source": {"kind": "torchscript", "path": "bad.ts"}}]))
    with pytest.raises(ModelLoadError, match="not a readable TorchScript file"):
        analyze_workload(w)


# --- ONNX ----------------------------------------------------------------------------------


def _export(net: torch.nn.Module, path, size=(3, 32, 32)) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net.eval(), (torch.zeros(1, *size),), str(path), dynamo=False)


def test_onnx_layers_bytes_and_signatures_match_torch(tmp_path, write_workload):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(16 * 16 * 16, 10))
    _export(net, tmp_path / "net.onnx")
    w = load_workload(write_workload([{"name": "o", "source": {"kind": "onnx", "path": "net.onnx"}}],
                                     input_size=[3, 32, 32], batch_size=2))
    inv = analyze_workload(w).models[0]
    torch_inv = inventory_of_module(net.to("meta"), "t", input_size=(3, 32, 32), batch_size=2)
    assert [r.kind for r in inv.layers] == ["Conv2d", "Conv2d", "Linear"]
    assert [r.signature for r in inv.layers] == [r.signature for r in torch_inv.layers]
    assert [r.param_bytes for r in inv.layers] == [r.param_bytes for r in torch_inv.layers]
    assert [r.activation_bytes for r in inv.layers] == [r.activation_bytes for r in torch_inv.layers]
    assert inv.param_bytes == torch_inv.param_bytes
    # An ONNX model and a torch model of the same layers can share all of them.
    assert len(find_share_groups([inv, torch_inv])) == 3


def test_onnx_that_fails_the_checker(tmp_path, write_workload):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 3])
    node = onnx.helper.make_node("Relu", ["undefined_input"], ["y"])
    model = onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y]))
    onnx.save(model, tmp_path / "broken.onnx")
    w = load_workload(write_workload([{"name": "o", "source": {"kind": "onnx", "path": "broken.onnx"}}]))
    with pytest.raises(ModelLoadError, match="broken.onnx: fails the ONNX checker"):
        analyze_workload(w)
    (tmp_path / "garbage.onnx").write_bytes(b"\x08\x07garbage" * 10)
    w = load_workload(write_workload([{"name": "o", "source": {"kind": "onnx", "path": "garbage.onnx"}}]))
    with pytest.raises(ModelLoadError, match="garbage.onnx: (not a readable ONNX file|fails the ONNX checker)"):
        analyze_workload(w)
