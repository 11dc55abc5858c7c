"""ONNX inventory: weights wherever converters put them (initializers, Constant nodes, Identity
and Cast chains, external data), layer kinds and their torch twins' signatures, the bytes
invariant, and shapes at the workload's input size (symbolic dims, opsets 9 to the newest)."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import onnx
import pytest
import torch
import torchvision
from onnx import TensorProto as TP
from onnx import helper, numpy_helper

from gemel_studio.analysis import analyze_workload
from gemel_studio.analysis.inventory import inventory_of_module
from gemel_studio.analysis.onnx_inventory import onnx_layers
from gemel_studio.analysis.signature import linear_signature, module_signature
from gemel_studio.workload import load_workload

NEWEST = onnx.defs.onnx_opset_version()
_FLOATS = {TP.FLOAT, TP.FLOAT16, TP.DOUBLE, TP.BFLOAT16}


def _arr(*shape, dtype=np.float32) -> np.ndarray:
    return np.random.default_rng(0).standard_normal(shape).astype(dtype)


def _init(name: str, *shape) -> onnx.TensorProto:
    return numpy_helper.from_array(_arr(*shape), name)


def _const(name: str, *shape, **value) -> onnx.NodeProto:
    """A Constant node: a tensor of `shape` or, with a keyword, that value form."""
    if not value:
        value = {"value": numpy_helper.from_array(_arr(*shape), name + "_t")}
    return helper.make_node("Constant", [], [name], name=f"const_{name}", **value)


def _model(nodes, inputs, outputs, initializers=(), opset: int = NEWEST) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return model


def _vi(name: str, shape, elem=TP.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _float_constant_bytes(model: onnx.ModelProto) -> int:
    """The bytes of every distinct floating-point constant, counted from the data (the
    inventory counts from dims): the invariant's reference."""
    total = sum(numpy_helper.to_array(t).nbytes for t in model.graph.initializer if t.data_type in _FLOATS)
    for node in model.graph.node:
        if node.op_type != "Constant":
            continue
        for a in node.attribute:
            if a.name == "value" and a.t.data_type in _FLOATS:
                total += numpy_helper.to_array(a.t).nbytes
            elif a.name == "sparse_value" and a.sparse_tensor.values.data_type in _FLOATS:
                total += numpy_helper.to_array(a.sparse_tensor.values).nbytes
            elif a.name == "value_float":
                total += 4
            elif a.name == "value_floats":
                total += 4 * len(a.floats)
    return total


def _layers(model: onnx.ModelProto, batch: int = 1, size=(3, 8, 8)):
    """onnx_layers, with the bytes invariant checked on every graph."""
    records, calls, notes, param_bytes, buffer_bytes = onnx_layers(model, batch, size)
    leftover = param_bytes - sum(r.param_bytes for r in records)
    assert leftover >= 0 and buffer_bytes == sum(r.buffer_bytes for r in records)
    assert param_bytes + buffer_bytes == _float_constant_bytes(model)
    for r in records:  # each record's figures are the sum of the tensors it holds
        assert r.param_bytes == sum(t.nbytes for t in r.params) and r.buffer_bytes == sum(t.nbytes for t in r.buffers)
    held = [t.name for r in records for t in r.params + r.buffers]
    assert len(held) == len(set(held))  # no constant in two records
    if leftover:
        assert any("belong to no layer" in n and f"{leftover} bytes" in n for n in notes)
    return records, calls, notes, param_bytes, buffer_bytes


def _to_constants(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same graph with every initializer moved into a Constant node, as Paddle2ONNX and
    older tf2onnx write them."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    names = {t.name for t in g.initializer}
    consts = [helper.make_node("Constant", [], [t.name], value=t) for t in g.initializer]
    inputs = [i for i in g.input if i.name not in names]
    nodes = list(g.node)
    del g.initializer[:], g.input[:], g.node[:]
    g.input.extend(inputs)
    g.node.extend(consts + nodes)
    return model


def _export(module: torch.nn.Module, x, **kwargs) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notices
        torch.onnx.export(module.eval(), (x,), buf, dynamo=False, **kwargs)
    return onnx.load_from_string(buf.getvalue())


def _conv_bn_gemm(weights: str, opset: int = NEWEST) -> onnx.ModelProto:
    """Conv(3->4, 3x3, pad 1) + bias, BatchNormalization, Flatten, Gemm(256->5): weights as
    initializers or as Constant nodes."""
    tensors = [("W", (4, 3, 3, 3)), ("B", (4,)), ("scale", (4,)), ("bias", (4,)), ("mean", (4,)), ("var", (4,)),
               ("fc_w", (5, 256)), ("fc_b", (5,))]
    nodes = [helper.make_node("Conv", ["x", "W", "B"], ["c"], pads=[1, 1, 1, 1], kernel_shape=[3, 3], name="conv"),
             helper.make_node("BatchNormalization", ["c", "scale", "bias", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Flatten", ["n"], ["f"]),
             helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], transB=1, name="fc")]
    inputs = [_vi("x", [1, 3, 8, 8])]
    if weights == "initializers":
        return _model(nodes, inputs, [_vi("y", [1, 5])], [_init(n, *s) for n, s in tensors], opset)
    return _model([_const(n, *s) for n, s in tensors] + nodes, inputs, [_vi("y", [1, 5])], opset=opset)


def _signatures(records) -> list[tuple]:
    return [(r.name, r.kind, r.signature, r.param_bytes, r.buffer_bytes, r.activation_bytes) for r in records]


# --- where the weights are ---------------------------------------------------------------------


def test_initializers_and_constant_nodes_give_the_same_layers():
    with torch.device("meta"):
        twins = [torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.Linear(256, 5)]
    for weights in ("initializers", "constants"):
        records, calls, notes, param_bytes, buffer_bytes = _layers(_conv_bn_gemm(weights))
        assert [(r.name, r.kind) for r in records] == [("conv", "Conv2d"), ("bn", "BatchNorm2d"), ("fc", "Linear")]
        assert [r.signature for r in records] == [module_signature(m) for m in twins]
        assert [(r.param_bytes, r.buffer_bytes) for r in records] == [(4 * 27 * 4 + 16, 0), (32, 32), (5 * 257 * 4, 0)]
        assert [t.name for t in records[1].buffers] == ["mean", "var"]
        assert [r.activation_bytes for r in records] == [4 * 64 * 4, 4 * 64 * 4, 5 * 4] == calls
        assert (param_bytes, buffer_bytes, notes) == (4 * 27 * 4 + 16 + 32 + 5 * 257 * 4, 32, [])


def test_every_constant_value_form():
    """value (dense), sparse_value, value_float, value_floats are weights; value_int(s) are not."""
    dense = np.zeros((8, 4), np.float32)
    dense[0, 1], dense[5, 3] = 1.0, 2.0
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(np.array([1.0, 2.0], np.float32), "sv"),
                                       numpy_helper.from_array(np.array([1, 23], np.int64), "si"), [8, 4])
    nodes = [helper.make_node("Constant", [], ["shape"], value_ints=[1, 8]),
             helper.make_node("Constant", [], ["one"], value_int=1),
             helper.make_node("Reshape", ["x", "shape"], ["r"]),
             helper.make_node("Constant", [], ["W"], sparse_value=sparse),
             helper.make_node("MatMul", ["r", "W"], ["m"], name="fc"),
             helper.make_node("Constant", [], ["slope"], value_floats=[0.1, 0.2, 0.3, 0.4]),
             helper.make_node("PRelu", ["m", "slope"], ["p"], name="prelu"),
             helper.make_node("Constant", [], ["k"], value_float=2.0),
             helper.make_node("Mul", ["p", "k"], ["y"])]
    records, calls, notes, param_bytes, _ = _layers(_model(nodes, [_vi("x", [1, 2, 4])], [_vi("y", [1, 4])]))
    assert [(r.name, r.kind, r.signature) for r in records] == [
        ("fc", "Linear", linear_signature(8, 4, False, "float32")), ("prelu", "PReLU", "PReLU(n=4,float32)")]
    assert records[0].params[0].shape == (8, 4) and records[0].param_bytes == 8  # two stored fp32 values
    assert records[1].param_bytes == 16
    assert param_bytes == 8 + 16 + 4  # the scalar of Mul belongs to no layer; the ints are not weights
    assert records[0].activation_bytes == 16 and records[1].activation_bytes == 16


def test_identity_and_cast_chains_count_the_stored_constant():
    """An fp32 constant cast to fp16 costs its fp32 bytes, once, at the layer reading the cast."""
    nodes = [helper.make_node("Cast", ["W"], ["w16"], to=TP.FLOAT16),
             helper.make_node("Identity", ["w16"], ["w16b"]),
             helper.make_node("Conv", ["x", "w16b"], ["c"], kernel_shape=[1, 1], name="conv"),
             _const("fc_w", 64, 2),
             helper.make_node("Identity", ["fc_w"], ["fc_w_id"]),
             helper.make_node("Cast", ["fc_w_id"], ["fc_w16"], to=TP.FLOAT16),
             helper.make_node("Flatten", ["c"], ["f"]),
             helper.make_node("MatMul", ["f", "fc_w16"], ["y"], name="fc")]
    model = _model(nodes, [_vi("x", [1, 3, 4, 4], TP.FLOAT16)], [_vi("y", [1, 2], TP.FLOAT16)],
                   [_init("W", 4, 3, 1, 1)])
    records, calls, notes, param_bytes, _ = _layers(model, size=(3, 4, 4))
    assert [(r.name, r.kind) for r in records] == [("conv", "Conv2d"), ("fc", "Linear")]
    assert [(t.name, t.dtype, t.nbytes) for r in records for t in r.params] == [("W", "float32", 4 * 3 * 4),
                                                                                ("fc_w", "float32", 64 * 2 * 4)]
    assert records[1].signature == linear_signature(64, 2, False, "float32")
    assert calls == [4 * 16 * 2, 2 * 2]  # the activations are fp16
    assert param_bytes == (12 + 128) * 4


def test_an_initializer_read_by_two_nodes_counts_once_at_the_first():
    nodes = [helper.make_node("Conv", ["x", "W", "b1"], ["c1"], kernel_shape=[1, 1], name="first"),
             helper.make_node("Conv", ["c1", "W", "b2"], ["y"], kernel_shape=[1, 1], name="second"),
             helper.make_node("Conv", ["y", "W"], ["z"], kernel_shape=[1, 1], name="third")]
    model = _model(nodes, [_vi("x", [1, 4, 4, 4])], [_vi("z", [1, 4, 4, 4])],
                   [_init("W", 4, 4, 1, 1), _init("b1", 4), _init("b2", 4)])
    records, _, _, param_bytes, _ = _layers(model, size=(4, 4, 4))
    assert [(r.name, [t.name for t in r.params]) for r in records] == [("first", ["W", "b1"]), ("second", ["b2"])]
    assert records[0].signature == records[1].signature  # both are the same kind of layer
    assert param_bytes == (16 + 4 + 4) * 4


# --- layer kinds and signatures ----------------------------------------------------------------


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("weight_side", ["B", "A"])
def test_gemm_is_linear_for_every_transposition(trans_a, trans_b, weight_side):
    """nn.Linear(8, 4) on 3 rows, written every way Gemm allows: the weight [out, in] or
    [in, out] as B (X·W) or as A (W·X, the Linear applied to X's transpose)."""
    rows, in_f, out_f = 3, 8, 4
    if weight_side == "B":
        x_shape = [in_f, rows] if trans_a else [rows, in_f]
        w_shape, y_shape, bias_shape = ([out_f, in_f] if trans_b else [in_f, out_f]), [rows, out_f], (out_f,)
        inputs = ["x", "W", "C"]
    else:
        w_shape = [in_f, out_f] if trans_a else [out_f, in_f]
        x_shape, y_shape, bias_shape = ([rows, in_f] if trans_b else [in_f, rows]), [out_f, rows], (out_f, 1)
        inputs = ["W", "x", "C"]
    node = helper.make_node("Gemm", inputs, ["y"], transA=trans_a, transB=trans_b, name="fc")
    model = _model([node], [_vi("x", x_shape)], [_vi("y", y_shape)], [_init("W", *w_shape), _init("C", *bias_shape)])
    records, calls, *_ = _layers(model, size=(3, 8, 8))
    with torch.device("meta"):
        twin = torch.nn.Linear(in_f, out_f)
    assert [(r.kind, r.signature, r.param_bytes) for r in records] == \
           [("Linear", module_signature(twin), (in_f + 1) * out_f * 4)]
    assert calls == [rows * out_f * 4]


def test_scaled_gemm_has_no_linearmodule_signature():
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, alpha=0.5, name="fc")
    records, *_ = _layers(_model([node], [_vi("x", [1, 8])], [_vi("y", [1, 4])], [_init("W", 4, 8)]))
    assert records[0].kind == "Gemm" and "alpha=0.5" in records[0].signature


def test_matmul_and_add_fold_into_one_linear_with_bias():
    """torch's exporter writes nn.Linear on a 3-D input as MatMul + Add; both styles of graph
    give one Linear record whose output is the Add's."""
    linear = torch.nn.Linear(6, 4)
    exported = _export(linear, torch.zeros(1, 3, 6))
    assert [n.op_type for n in exported.graph.node] == ["MatMul", "Add"]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="fc"), helper.make_node("Add", ["b", "m"], ["y"])]
    built = _model(nodes, [_vi("x", [1, 3, 6])], [_vi("y", [1, 3, 4])], [_init("W", 6, 4), _init("b", 4)])
    for model in (exported, built, _to_constants(built)):
        records, calls, notes, *_ = _layers(model, size=(1, 3, 6))
        assert [(r.kind, r.signature, r.param_bytes) for r in records] == [("Linear", module_signature(linear), 28 * 4)]
        assert calls == [3 * 4 * 4]


def test_a_bias_is_not_folded_when_the_matmul_output_is_read_twice():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["m"], name="fc"), helper.make_node("Add", ["m", "b"], ["a"]),
             helper.make_node("Mul", ["a", "m"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 6])], [_vi("y", [1, 4])], [_init("W", 6, 4), _init("b", 4)])
    records, _, notes, param_bytes, _ = _layers(model)
    assert [(r.kind, r.signature) for r in records] == [("Linear", linear_signature(6, 4, False, "float32"))]
    assert param_bytes == 28 * 4 and any("16 bytes, belong to no layer" in n for n in notes)


@pytest.mark.parametrize("module, x, opset", [
    (torch.nn.InstanceNorm2d(4, affine=True), torch.zeros(1, 4, 8, 8), 17),
    (torch.nn.LayerNorm([4, 8], eps=1e-6), torch.zeros(1, 4, 8), 17),
    (torch.nn.LayerNorm(8), torch.zeros(2, 3, 8), 17),  # bias=False: torch exports a zero bias, which the graph holds
    (torch.nn.PReLU(4), torch.zeros(1, 4, 8, 8), 17),
    (torch.nn.PReLU(), torch.zeros(1, 4, 8, 8), 9),
    (torch.nn.Embedding(10, 6), torch.zeros(1, 5, dtype=torch.long), 17),
    (torch.nn.LSTM(6, 5), torch.zeros(3, 1, 6), 17),
    (torch.nn.LSTM(6, 5, bidirectional=True, batch_first=True), torch.zeros(1, 3, 6), 17),
    (torch.nn.GRU(6, 5), torch.zeros(3, 1, 6), 17),
    (torch.nn.RNN(6, 5, nonlinearity="relu"), torch.zeros(3, 1, 6), 17),
    (torch.nn.BatchNorm1d(6), torch.zeros(2, 6), 9),
    (torch.nn.ConvTranspose2d(4, 3, 3, stride=2, output_padding=1), torch.zeros(1, 4, 8, 8), 17),
    (torch.nn.Conv1d(4, 3, 3, padding=2, dilation=2), torch.zeros(1, 4, 8), 9),
], ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else None)
def test_exported_torch_layers_have_their_twins_signature_and_bytes(module, x, opset):
    for p in module.parameters():  # fresh tensors of equal values would be merged by the exporter
        torch.nn.init.normal_(p)
    exported = _export(module, x, opset_version=opset)
    for model in (exported, _to_constants(exported)):
        records, *_ = _layers(model, size=tuple(x.shape[1:]) if x.dim() == 4 else (3, 8, 8))
        assert [(r.kind, r.signature, r.param_bytes) for r in records] == \
               [(type(module).__name__, module_signature(module), sum(p.numel() * 4 for p in module.parameters()))]


def test_single_layer_recurrent_twins_only():
    """A two-layer torch LSTM is two ONNX nodes: it keeps its own description, not a one-layer twin's."""
    assert module_signature(torch.nn.LSTM(6, 5)) == "LSTM(in=6,hidden=5,bias=True,bidirectional=False,float32)"
    assert "hidden=" not in module_signature(torch.nn.LSTM(6, 5, num_layers=2))
    assert module_signature(torch.nn.GRU(6, 5, bias=False)) == \
           "GRU(in=6,hidden=5,bias=False,bidirectional=False,float32)"


@pytest.mark.parametrize("module, x", [
    (torch.nn.LayerNorm([4, 8], eps=1e-6), torch.zeros(1, 4, 8)),
    (torch.nn.InstanceNorm2d(4, affine=True, eps=1e-3), torch.zeros(1, 4, 8, 8)),
    (torch.nn.PReLU(4), torch.zeros(1, 4, 8, 8)),
    (torch.nn.Embedding(10, 6), torch.zeros(1, 5, dtype=torch.long)),
    (torch.nn.GRU(6, 5, bidirectional=True), torch.zeros(3, 1, 6)),
    (torch.nn.RNN(6, 5, nonlinearity="relu"), torch.zeros(3, 1, 6)),
], ids=lambda v: type(v).__name__ if isinstance(v, torch.nn.Module) else None)
def test_torchscript_modules_keep_the_new_signatures(module, x):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notices
        traced = torch.jit.trace(module, (x,), check_trace=False)
    assert module_signature(traced) == module_signature(torch.jit.script(module)) == module_signature(module)


def test_hand_written_norms_gather_and_recurrent_nodes():
    """The ops torch does not export as such here: InstanceNormalization on 3-D input, a
    LayerNormalization without bias, Gather of a table, GRU with ONNX's default reset, LSTM
    with peepholes and an initial state (a buffer)."""
    h = 5
    nodes = [helper.make_node("InstanceNormalization", ["x", "s", "b"], ["i"], epsilon=1e-3, name="inorm"),
             helper.make_node("LayerNormalization", ["i", "ln_s"], ["l"], axis=-1, name="ln"),
             helper.make_node("Gather", ["table", "ids"], ["e"], name="emb"),
             helper.make_node("Transpose", ["l"], ["seq"], perm=[2, 0, 1]),
             helper.make_node("GRU", ["seq", "gw", "gr", "gb"], ["g", "gh"], hidden_size=h, name="gru"),
             helper.make_node("Squeeze", ["g", "axis1"], ["gs"]),
             helper.make_node("LSTM", ["gs", "lw", "lr", "", "", "h0", "", "p"], ["o"], hidden_size=h, name="lstm")]
    inits = [_init("s", 4), _init("b", 4), _init("ln_s", 6), _init("table", 10, 3), _init("gw", 1, 3 * h, 4),
             _init("gr", 1, 3 * h, h), _init("gb", 1, 6 * h), _init("lw", 1, 4 * h, h), _init("lr", 1, 4 * h, h),
             _init("h0", 1, 1, h), _init("p", 1, 3 * h), numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    model = _model(nodes, [_vi("x", [1, 4, "length"]), _vi("ids", [2], TP.INT64)],
                   [_vi("o", ["length", 1, 1, h]), _vi("e", [2, 3]), _vi("gh", [1, 1, h])], inits)
    records, calls, notes, *_ = _layers(model, size=(1, 4, 6))
    by = {r.name: r for r in records}
    assert by["inorm"].signature == "InstanceNorm1d(n=4,eps=0.001,affine=True,float32)"
    with torch.device("meta"):
        assert by["ln"].signature == module_signature(torch.nn.LayerNorm(6, bias=False))
        assert by["emb"].signature == module_signature(torch.nn.Embedding(10, 3))
    assert by["gru"].signature == "GRU(in=4,hidden=5,bias=True,bidirectional=False,lbr=0,float32)"
    assert by["lstm"].signature == "LSTM(in=5,hidden=5,bias=False,bidirectional=False,peepholes=True,float32)"
    assert [t.name for t in by["lstm"].buffers] == ["h0"] and by["lstm"].buffer_bytes == h * 4
    assert by["gru"].activation_bytes == (6 * 1 * h + 1 * h) * 4  # Y [seq, dirs, batch, h] and Y_h
    assert by["lstm"].activation_bytes == 6 * 1 * h * 4
    assert any("rank 3: taken as one [C, H, W] image" in n for n in notes)


def test_a_large_constant_on_an_unknown_op_is_a_layer_of_its_kind():
    nodes = [helper.make_node("Mul", ["x", "big"], ["m"], name="scale"),
             helper.make_node("Add", ["m", "small"], ["a"]),
             helper.make_node("Relu", ["a"], ["y"])]
    model = _model(nodes, [_vi("x", [1, 32, 8, 8])], [_vi("y", [1, 32, 8, 8])],
                   [_init("big", 1, 32, 8, 8), _init("small", 1, 32, 1, 1)])
    records, calls, notes, param_bytes, _ = _layers(model, size=(32, 8, 8))
    assert [(r.name, r.kind, r.param_bytes) for r in records] == [("scale", "Mul", 32 * 64 * 4)]
    assert records[0].signature.startswith("Mul(|1:(1,32,8,8),float32)")
    assert param_bytes == (32 * 64 + 32) * 4
    assert calls == [32 * 64 * 4]


def test_constants_inside_subgraphs_are_counted():
    then_nodes = [_const("tw", 32, 32), helper.make_node("MatMul", ["x", "tw"], ["t"], name="then_fc")]
    then_graph = helper.make_graph(then_nodes, "then", [], [_vi("t", [1, 32])])
    else_graph = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [], [_vi("e", [1, 32])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph, name="if")]
    model = _model(nodes, [_vi("x", [1, 32]), _vi("cond", [], TP.BOOL)], [_vi("y", [1, 32])])
    records, _, _, param_bytes, _ = onnx_layers(model, 1, (3, 8, 8))
    assert [(r.name, r.kind, r.param_bytes) for r in records] == [("then_fc", "Linear", 32 * 32 * 4)]
    assert param_bytes == 32 * 32 * 4


# --- files, opsets and inputs ------------------------------------------------------------------


@pytest.mark.parametrize("convert_attribute", [False, True])
def test_external_data_is_never_read(tmp_path, convert_attribute):
    """Byte counts come from dims: the inventory is the same with the data file gone."""
    model = _conv_bn_gemm("constants" if convert_attribute else "initializers")
    want, total = _signatures(_layers(model)[0]), _float_constant_bytes(model)
    copy = onnx.ModelProto.FromString(model.SerializeToString())  # saving converts the model in place
    onnx.save_model(copy, tmp_path / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
                    location="m.onnx.data", size_threshold=0, convert_attribute=convert_attribute)
    (tmp_path / "m.onnx.data").unlink()
    loaded = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    stored = [t for t in loaded.graph.initializer] + [a.t for n in loaded.graph.node for a in n.attribute
                                                     if a.name == "value"]
    assert stored and all(t.data_location == TP.EXTERNAL for t in stored if math.prod(t.dims) > 4)
    records, _, _, param_bytes, buffer_bytes = onnx_layers(loaded, 1, (3, 8, 8))
    assert _signatures(records) == want
    assert param_bytes + buffer_bytes == total


def test_a_missing_constant_external_data_file_is_named(tmp_path, write_workload):
    from gemel_studio.errors import ModelLoadError
    from gemel_studio.models import build_model

    onnx.save_model(_conv_bn_gemm("constants"), tmp_path / "m.onnx", save_as_external_data=True,
                    location="weights.bin", size_threshold=0, convert_attribute=True)
    (tmp_path / "weights.bin").unlink()
    w = load_workload(write_workload([{"name": "o", "source": {"kind": "onnx", "path": "m.onnx"}}]))
    with pytest.raises(ModelLoadError, match=r"m.onnx: its weights are in an external data file, weights.bin, "):
        build_model(w, w.models[0])


@pytest.mark.parametrize("opset", [9, NEWEST])
def test_opset_9_and_the_newest(opset):
    want = _signatures(_layers(_conv_bn_gemm("initializers"))[0])
    for weights in ("initializers", "constants"):
        assert _signatures(_layers(_conv_bn_gemm(weights, opset))[0]) == want


def test_symbolic_input_dims_take_the_workload_size():
    model = _conv_bn_gemm("initializers")
    model.graph.input[0].CopyFrom(_vi("x", ["N", 3, "H", "W"]))
    model.graph.output[0].CopyFrom(_vi("y", ["N", 5]))
    records, calls, notes, *_ = _layers(model, batch=2, size=(3, 8, 8))
    assert calls == [2 * 4 * 64 * 4, 2 * 4 * 64 * 4, 2 * 5 * 4] and notes == []
    # At another size the Gemm no longer fits (256 inputs): the layers before it are still measured.
    records, calls, notes, *_ = _layers(model, batch=1, size=(3, 16, 16))
    assert [r.activation_bytes for r in records] == [4 * 256 * 4, 4 * 256 * 4, None]
    assert any("1 ONNX layer(s) have no activation figure" in n and "fc" in n for n in notes)


def test_a_fixed_input_size_and_batch_are_noted():
    records, calls, notes, *_ = _layers(_conv_bn_gemm("initializers"), batch=4, size=(3, 16, 16))
    assert calls == [4 * 4 * 64 * 4, 4 * 4 * 64 * 4, 4 * 5 * 4]  # the graph's 8x8, scaled to batch 4
    assert any("is fixed at 3x8x8: activations are measured there, not at the workload's 3x16x16" in n for n in notes)
    assert any("batch is fixed at 1; activations are scaled to batch 4" in n for n in notes)


def test_an_input_of_another_rank_is_noted():
    node = helper.make_node("Gemm", ["x", "W"], ["y"], transB=1, name="fc")
    model = _model([node], [_vi("x", ["N", 8])], [_vi("y", ["N", 4])], [_init("W", 4, 8)])
    records, calls, notes, *_ = _layers(model, batch=3, size=(3, 8, 8))
    assert any("input 'x' has rank 2, not 4 ([batch, C, H, W])" in n for n in notes)
    assert calls == [3 * 4 * 4]  # its first dim is still taken as the batch


# --- graphs exported by torch ------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18():
    torch.manual_seed(0)
    net = torchvision.models.resnet18(num_classes=10).eval()
    # No constant folding: batch norm stays a node, as in the bundles' graphs.
    proto = _export(net, torch.zeros(1, 3, 32, 32), do_constant_folding=False, keep_initializers_as_inputs=True)
    return net, proto


def test_torch_export_and_its_constant_node_rewrite_give_one_inventory(resnet18):
    net, proto = resnet18
    rewritten = _to_constants(proto)
    assert not rewritten.graph.initializer and sum(n.op_type == "Constant" for n in rewritten.graph.node) > 60
    a, b = _layers(proto, size=(3, 32, 32)), _layers(rewritten, size=(3, 32, 32))
    assert _signatures(a[0]) == _signatures(b[0])
    assert [[(t.name, t.shape, t.nbytes) for t in r.params + r.buffers] for r in a[0]] == \
           [[(t.name, t.shape, t.nbytes) for t in r.params + r.buffers] for r in b[0]]
    assert a[1:] == b[1:]  # calls, notes and both totals


def test_torch_export_has_the_torch_models_signatures_and_bytes(resnet18):
    net, proto = resnet18
    records = _layers(proto, size=(3, 32, 32))[0]
    with torch.device("meta"):
        twin = torchvision.models.resnet18(num_classes=10)
    eager = inventory_of_module(twin, "t", input_size=(3, 32, 32)).layers
    assert [(r.kind, r.signature, r.param_bytes, r.activation_bytes) for r in records] == \
           [(r.kind, r.signature, r.param_bytes, r.activation_bytes) for r in eager]
    # torch's num_batches_tracked counter (8 bytes per batch norm) is not in the graph.
    assert [r.buffer_bytes + 8 * (r.kind == "BatchNorm2d") for r in records] == [r.buffer_bytes for r in eager]


def test_folded_batch_norm_export_keeps_the_convolution_shapes(resnet18):
    """Eval export with constant folding merges batch norm into the convolutions (a bias
    appears); the convolutions' shapes and hyperparameters are still the torch model's."""
    net, _ = resnet18
    records = _layers(_to_constants(_export(net, torch.zeros(1, 3, 32, 32))), size=(3, 32, 32))[0]
    convs = [r.signature.replace("bias=True", "bias=False") for r in records if r.kind == "Conv2d"]
    assert convs == [module_signature(m) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]


def test_shapes_computed_from_shapes_are_followed_at_a_symbolic_size():
    """ShuffleNet's channel shuffle reshapes to a shape computed at run time (Shape, Gather,
    Div, Cast, Concat); with symbolic batch, height and width every layer is still measured,
    as on the torch model."""
    with torch.device("meta"):
        twin = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    net = torchvision.models.shufflenet_v2_x0_5(num_classes=10)
    proto = _to_constants(_export(net, torch.zeros(1, 3, 32, 32), input_names=["x"],
                                  dynamic_axes={"x": {0: "n", 2: "h", 3: "w"}}))
    records, calls, notes, *_ = _layers(proto, batch=2, size=(3, 64, 64))
    eager = [r for r in inventory_of_module(twin, "t", input_size=(3, 64, 64), batch_size=2).layers
             if r.kind in ("Conv2d", "Linear")]
    assert [r.activation_bytes for r in records] == [r.activation_bytes for r in eager]
    assert None not in calls and notes == []


def test_constant_node_graph_through_a_workload(tmp_path, write_workload):
    onnx.save(_to_constants(_export(torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.Flatten(),
                                                        torch.nn.Linear(8 * 30 * 30, 4)), torch.zeros(1, 3, 32, 32))),
              tmp_path / "c.onnx")
    w = load_workload(write_workload([{"name": "o", "source": {"kind": "onnx", "path": "c.onnx"}}],
                                     input_size=[3, 32, 32]))
    inv = analyze_workload(w).models[0]
    assert [r.kind for r in inv.layers] == ["Conv2d", "Linear"]
    assert inv.param_bytes == (8 * 27 + 8 + 8 * 900 * 4 + 4) * 4
