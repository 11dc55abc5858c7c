"""Model sources: checkpoints (safe loading), pretrained weights offline, TorchScript, ONNX."""

from __future__ import annotations

import json
import os
import random
import struct
import warnings

import numpy as np
import onnx
import onnx.numpy_helper
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


# --- checkpoint dtypes and older checkpoints -----------------------------------------------


def test_checkpoint_without_num_batches_tracked_loads(tmp_path, write_workload, resnet18_state):
    """Checkpoints from before BatchNorm counted its steps lack those keys; the module's own stand in."""
    old = {k: v for k, v in resnet18_state.items() if not k.endswith("num_batches_tracked")}
    assert len(old) < len(resnet18_state)
    save_file(old, tmp_path / "old.safetensors")
    w = load_workload(write_workload([_ckpt_entry("c", "old.safetensors")]))
    inv = analyze_workload(w).models[0]
    assert inv.param_bytes == sum(v.numel() * 4 for k, v in old.items() if "running" not in k)
    built = build_model(w, w.models[0], materialize=True)
    assert torch.equal(built.module.layer1[0].bn1.running_var, resnet18_state["layer1.0.bn1.running_var"])
    assert built.module.bn1.num_batches_tracked.item() == 0


def test_float8_and_unsigned_safetensors_dtypes_are_read(tmp_path, write_workload, resnet18_state):
    from gemel_studio.models.checkpoints import read_tensor_specs

    dtypes = [torch.float8_e4m3fn, torch.float8_e5m2, torch.uint16, torch.uint32, torch.uint64]
    save_file({str(d): torch.zeros(3).to(d) for d in dtypes}, tmp_path / "mixed.safetensors")
    specs = read_tensor_specs(tmp_path / "mixed.safetensors")
    assert {k: (s.shape, s.dtype) for k, s in specs.items()} == {str(d): ((3,), d) for d in dtypes}
    # A float8 checkpoint: one byte a parameter.
    save_file({k: v.to(torch.float8_e4m3fn) if v.is_floating_point() else v for k, v in resnet18_state.items()},
              tmp_path / "fp8.safetensors")
    inv = analyze_workload(load_workload(write_workload([_ckpt_entry("c", "fp8.safetensors")]))).models[0]
    assert inv.param_bytes == inv.param_count
    assert "float8_e4m3fn" in inv.layer("conv1").signature


def _raw_safetensors(path, dtype: str, nbytes: int) -> None:
    header = json.dumps({"w": {"dtype": dtype, "shape": [2], "data_offsets": [0, nbytes]}}).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * nbytes)


@pytest.mark.parametrize("dtype, nbytes", [("X9", 2), ("F4", 1)])
def test_unknown_safetensors_dtype_is_unsupported_not_corrupt(tmp_path, write_workload, dtype, nbytes):
    _raw_safetensors(tmp_path / "odd.safetensors", dtype, nbytes)
    w = load_workload(write_workload([_ckpt_entry("c", "odd.safetensors")]))
    with pytest.raises(ModelLoadError, match=f"odd.safetensors: unsupported dtype {dtype} ") as err:
        analyze_workload(w)
    assert "corrupt" not in str(err.value)


# --- traced TorchScript --------------------------------------------------------------------


class _Strided(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.dw = torch.nn.Conv2d(8, 8, 3, padding="same", groups=4, bias=False)
        self.bn = torch.nn.BatchNorm2d(8, eps=1e-3)
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.bn(self.dw(self.conv(x)))
        return self.fc(x.mean((2, 3)))


def test_traced_torchscript_gets_layer_records(tmp_path, write_workload):
    """A traced module keeps none of in_channels, stride, eps...: they come from its graph and weights."""
    net = _Strided().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(net, torch.zeros(1, 3, 32, 32)).save(str(tmp_path / "traced.ts"))
    w = load_workload(write_workload([{"name": "ts", "source": {"kind": "torchscript", "path": "traced.ts"}}]))
    inv = analyze_workload(w).models[0]
    eager = inventory_of_module(_Strided().to("meta"), "eager", input_size=(3, 32, 32))
    assert [(r.name, r.kind, r.signature, r.param_bytes, r.buffer_bytes) for r in inv.layers] == \
           [(r.name, r.kind, r.signature, r.param_bytes, r.buffer_bytes) for r in eager.layers]
    assert inv.layer("conv").signature.startswith("Conv2d(in=3,out=8,k=(3,3),s=(2,2),p=(1,1),")
    assert inv.layer("dw").signature.startswith("Conv2d(in=8,out=8,k=(3,3),s=(1,1),p=same,d=(1,1),g=4,bias=False")
    assert inv.layer("bn").signature == "BatchNorm2d(n=8,eps=0.001,affine=True,float32)"
    assert len(find_share_groups([inv, eager])) == 4


# --- ONNX: dtypes, external data, corrupt files ----------------------------------------------


def _gemm_model(weight: onnx.TensorProto, elem_type: int, extra_inits=()) -> onnx.ModelProto:
    out, inp = weight.dims
    x = onnx.helper.make_tensor_value_info("x", elem_type, [1, inp])
    y = onnx.helper.make_tensor_value_info("y", elem_type, [1, out])
    node = onnx.helper.make_node("Gemm", ["x", weight.name], ["y"], transB=1, name="fc")
    return onnx.helper.make_model(onnx.helper.make_graph([node], "g", [x], [y], initializer=[weight, *extra_inits]))


def test_onnx_bfloat16_and_float8_initializers_count(tmp_path, write_workload):
    tp = onnx.TensorProto
    weight = onnx.helper.make_tensor("W", tp.BFLOAT16, [4, 8], [1.0] * 32)
    unused_fp8 = onnx.helper.make_tensor("scale", tp.FLOAT8E4M3FN, [10], [0.5] * 10)
    shape = onnx.helper.make_tensor("shape", tp.INT64, [2], [1, 4])  # not a weight
    onnx.save(_gemm_model(weight, tp.BFLOAT16, [unused_fp8, shape]), tmp_path / "bf16.onnx")
    w = load_workload(write_workload([{"name": "o", "source": {"kind": "onnx", "path": "bf16.onnx"}}],
                                     input_size=[1, 1, 8]))
    inv = analyze_workload(w).models[0]
    assert [(r.name, r.signature, r.param_bytes) for r in inv.layers] == \
           [("fc", "Linear(in=8,out=4,bias=False,bfloat16)", 4 * 8 * 2)]
    assert inv.layers[0].params[0].dtype == "bfloat16"
    assert inv.param_bytes == 4 * 8 * 2 + 10  # the float8 initializer no node consumes: one byte each
    with torch.device("meta"):
        twin = torch.nn.Linear(8, 4, bias=False, dtype=torch.bfloat16)
    assert inv.layers[0].signature == inventory_of_module(twin, "t", input_size=(1, 1, 8)).layers[0].signature


def _save_with_external_data(tmp_path) -> None:
    weight = onnx.numpy_helper.from_array(np.ones((4, 8), np.float32), "W")
    onnx.save_model(_gemm_model(weight, onnx.TensorProto.FLOAT), tmp_path / "ext.onnx", save_as_external_data=True,
                    all_tensors_to_one_file=True, location="ext.onnx.data", size_threshold=0)


def test_onnx_external_data_is_found_next_to_the_file(tmp_path, write_workload, monkeypatch):
    _save_with_external_data(tmp_path)
    monkeypatch.chdir(tmp_path.parent)  # not the model's folder
    w = load_workload(write_workload([{"name": "o", "source": {"kind": "onnx", "path": "ext.onnx"}}],
                                     input_size=[1, 1, 8]))
    assert analyze_workload(w).models[0].param_bytes == 4 * 8 * 4


def test_onnx_with_missing_external_data_names_the_file(tmp_path, write_workload):
    _save_with_external_data(tmp_path)
    (tmp_path / "ext.onnx.data").unlink()
    w = load_workload(write_workload([{"name": "o", "source": {"kind": "onnx", "path": "ext.onnx"}}]))
    with pytest.raises(ModelLoadError, match=r"ext.onnx: its weights are in an external data file, ext.onnx.data, "
                                             r"which is missing from .*; keep the .data file next to the .onnx"):
        analyze_workload(w)


def test_onnx_of_random_bytes_is_a_clear_error(tmp_path, write_workload):
    (tmp_path / "random.onnx").write_bytes(random.Random(0).randbytes(4096))
    w = load_workload(write_workload([{"name": "o", "source": {"kind": "onnx", "path": "random.onnx"}}]))
    with pytest.raises(ModelLoadError, match=r"random.onnx: not a readable ONNX file \(.*\); export it again") as err:
        analyze_workload(w)
    assert "\n" not in str(err.value)
