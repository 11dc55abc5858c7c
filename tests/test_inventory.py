"""Per-layer inventory: bytes against torchvision's own counts, order, activations, dtypes."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import get_model

from gemel_studio.analysis import analyze_workload, inventory_from_built
from gemel_studio.analysis.inventory import inventory_of_module
from gemel_studio.models import build_model
from gemel_studio.workload import load_workload

from .conftest import tv


def _real_counts(architecture: str, device: str = "cpu", **kwargs) -> tuple[int, int, int]:
    with torch.device(device):  # numel and element size are the same on meta, without the memory
        model = get_model(architecture, weights=None, **kwargs)
    params = sum(p.numel() for p in model.parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    buffer_bytes = sum(b.numel() * b.element_size() for b in model.buffers())
    return params, param_bytes, buffer_bytes


_HEAVY = ("vgg11", "fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn")  # references built on meta, for speed


@pytest.mark.parametrize("architecture, classes, task", [
    ("resnet18", 1000, "classification"),
    ("mobilenet_v2", 7, "classification"),
    ("efficientnet_b0", 10, "classification"),
    ("ssdlite320_mobilenet_v3_large", 5, "detection"),
    ("vgg11", 1000, "classification"),
    ("fasterrcnn_resnet50_fpn", 91, "detection"),
    ("retinanet_resnet50_fpn", 91, "detection"),
])
def test_param_and_buffer_bytes_match_torchvision(write_workload, architecture, classes, task):
    extra = {"weights_backbone": None} if task == "detection" else {}
    device = "meta" if architecture in _HEAVY else "cpu"
    params, param_bytes, buffer_bytes = _real_counts(architecture, device, num_classes=classes, **extra)
    w = load_workload(write_workload([tv("m", architecture, num_classes=classes, task=task)]))
    inv = analyze_workload(w).models[0]
    assert inv.param_count == params
    assert inv.param_bytes == param_bytes
    assert inv.buffer_bytes == buffer_bytes
    # Every parameter belongs to exactly one layer record.
    assert sum(layer.param_bytes for layer in inv.layers) == param_bytes
    assert sum(layer.buffer_bytes for layer in inv.layers) == buffer_bytes


def test_resnet18_layers_in_execution_order_with_activation_bytes(write_workload):
    w = load_workload(write_workload([tv("r", "resnet18", num_classes=10)], input_size=[3, 224, 224],
                                     batch_size=2))
    built = build_model(w, w.models[0])
    assert all(p.is_meta for p in built.module.parameters())  # analysis allocates no weight memory
    inv = inventory_from_built(built, w)
    names = [layer.name for layer in inv.layers]
    assert names[:3] == ["conv1", "bn1", "layer1.0.conv1"]
    assert names[-1] == "fc"
    # downsample runs after the block's second conv in torchvision's BasicBlock.forward
    assert names.index("layer2.0.downsample.0") > names.index("layer2.0.conv2")
    conv1 = inv.layer("conv1")
    assert conv1.activation_bytes == 2 * 64 * 112 * 112 * 4
    assert conv1.signature == "Conv2d(in=3,out=64,k=(7,7),s=(2,2),p=(3,3),d=(1,1),g=1,bias=False,float32)"
    assert inv.layer("fc").activation_bytes == 2 * 10 * 4
    assert inv.layer("bn1").buffer_bytes == (64 + 64) * 4 + 8  # running mean/var + num_batches_tracked
    # Peak: the largest input+output pair of consecutive layers: conv1 -> bn1 at 112x112x64.
    assert inv.activation_bytes == 2 * (2 * 64 * 112 * 112 * 4)


def test_activations_scale_with_batch_and_input(write_workload):
    def conv1_bytes(size, batch):
        w = load_workload(write_workload([tv("r", "resnet18")], input_size=size, batch_size=batch))
        return analyze_workload(w).models[0].layer("conv1").activation_bytes

    assert conv1_bytes([3, 64, 64], 4) == 4 * conv1_bytes([3, 64, 64], 1)
    assert conv1_bytes([3, 128, 128], 1) == 4 * conv1_bytes([3, 64, 64], 1)


def test_bytes_follow_the_checkpoint_dtype(tmp_path, write_workload):
    ref = get_model("resnet18", weights=None, num_classes=4)
    save_file({k: v.half() if v.is_floating_point() else v for k, v in ref.state_dict().items()},
              tmp_path / "half.safetensors")
    entry = {"name": "h", "num_classes": 4,
             "source": {"kind": "checkpoint", "architecture": "resnet18", "path": "half.safetensors"}}
    inv = analyze_workload(load_workload(write_workload([entry]))).models[0]
    full = sum(p.numel() for p in ref.parameters()) * 4
    assert inv.param_bytes == full // 2
    assert "float16" in inv.layer("conv1").signature


def test_faster_rcnn_box_head_is_measured_past_nms(write_workload):
    w = load_workload(write_workload([tv("det", "fasterrcnn_resnet50_fpn", task="detection", num_classes=5)],
                                     input_size=[3, 224, 224]))
    inv = analyze_workload(w).models[0]
    cls = inv.layer("roi_heads.box_predictor.cls_score")
    # 1000 post-NMS proposals per image at test time, 5 class scores each, fp32.
    assert cls.activation_bytes == 1000 * 5 * 4
    assert all(layer.executed for layer in inv.layers)
    # The transform resizes to 800 px: the stem's output is 400x400.
    assert inv.layer("backbone.body.conv1").activation_bytes == 64 * 400 * 400 * 4


def test_constructor_that_needs_real_tensors_falls_back_to_cpu(write_workload):
    w = load_workload(write_workload([tv("rg", "regnet_y_400mf", num_classes=3)]))
    inv = analyze_workload(w).models[0]
    _, param_bytes, _ = _real_counts("regnet_y_400mf", num_classes=3)
    assert inv.built_on == "cpu" and inv.param_bytes == param_bytes
    assert any("built on the CPU" in n for n in inv.notes)


def test_too_small_input_is_a_note_not_a_crash(write_workload):
    w = load_workload(write_workload([tv("inc", "inception_v3", num_classes=3)], input_size=[3, 32, 32]))
    inv = analyze_workload(w).models[0]
    assert inv.param_bytes > 0 and inv.activation_bytes is None
    assert any("forward pass at input [3, 32, 32] failed" in n for n in inv.notes)


def test_tied_weights_inside_one_model_are_counted_once():
    with torch.device("meta"):
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8))
    net[3].weight = net[1].weight
    inv = inventory_of_module(net, "tied", input_size=(8, 1, 1))
    assert inv.param_bytes == (64 + 8 + 8) * 4
    assert [layer.param_bytes for layer in inv.layers] == [(64 + 8) * 4, 8 * 4]
    assert sum(layer.param_bytes for layer in inv.layers) == inv.param_bytes


def test_meta_analysis_gives_the_figures_of_real_cpu_models(write_workload):
    w = load_workload(write_workload([tv("a", "mobilenet_v3_small", num_classes=3), tv("b", "resnet18")],
                                     batch_size=2))
    meta, cpu = analyze_workload(w, device="meta"), analyze_workload(w, device="cpu")
    assert [m.built_on for m in cpu.models] == ["cpu", "cpu"]
    for m, c in zip(meta.models, cpu.models):
        assert (m.param_bytes, m.buffer_bytes, m.activation_bytes) == (c.param_bytes, c.buffer_bytes, c.activation_bytes)
        assert [(r.name, r.signature, r.activation_bytes) for r in m.layers] == \
               [(r.name, r.signature, r.activation_bytes) for r in c.layers]
    assert [g.to_dict() for g in meta.groups] == [g.to_dict() for g in cpu.groups]


class _FailsAfterFirstLayer(torch.nn.Module):
    def __init__(self, error: type[Exception]):
        super().__init__()
        self.error = error
        self.first = torch.nn.Conv2d(3, 4, 3)
        self.second = torch.nn.Conv2d(4, 4, 3)

    def forward(self, x):
        self.first(x)
        raise self.error("boom after the first layer")


@pytest.mark.parametrize("error", [RuntimeError, AssertionError])
def test_failed_forward_pass_leaves_no_partial_activations(error):
    net = _FailsAfterFirstLayer(error).to("meta")
    inv = inventory_of_module(net, "f", input_size=(3, 8, 8))
    assert [(r.name, r.activation_bytes, r.executed) for r in inv.layers] == \
           [("first", None, False), ("second", None, False)]
    assert inv.activation_bytes is None and inv.param_bytes == (4 * 3 * 9 + 4 + 4 * 4 * 9 + 4) * 4
    assert len(inv.notes) == 1 and "forward pass at input [3, 8, 8] failed" in inv.notes[0]
    assert "boom after the first layer" in inv.notes[0]


def test_input_check_of_a_torchvision_model_is_a_note(write_workload):
    """ViT asserts its input size (AssertionError): a note, not a traceback."""
    w = load_workload(write_workload([tv("vit", "vit_b_16", num_classes=3)], input_size=[3, 64, 64]))
    inv = analyze_workload(w).models[0]
    assert inv.activation_bytes is None and not any(layer.executed for layer in inv.layers)
    assert any("forward pass at input [3, 64, 64] failed" in n for n in inv.notes)


def test_no_module_of_the_analysis_package_imports_itself_back():
    """Every import inside a function counts too: a lazy import that closes a circle is still one."""
    import ast
    from pathlib import Path

    import gemel_studio.analysis as package

    folder = Path(package.__file__).parent
    modules = {p.stem for p in folder.glob("*.py")}
    edges: dict[str, set[str]] = {}
    for name in modules:
        tree = ast.parse((folder / f"{name}.py").read_text(encoding="utf-8"))
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import y, from . import x
                targets |= {node.module.split(".")[0]} if node.module else {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gemel_studio.analysis."):
                targets.add(node.module.split(".")[2])
        edges[name] = targets & modules - {"__init__"}

    def circle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            name, path = stack.pop()
            for nxt in edges[name]:
                if nxt == start:
                    return path + [start]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    circles = [c for m in sorted(modules) if (c := circle_from(m))]
    assert not circles, f"import circle(s) in gemel_studio/analysis: {[' -> '.join(c) for c in circles]}"
