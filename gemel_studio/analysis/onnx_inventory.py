"""Layer records from an ONNX graph: the nodes that hold floating-point constants become layers.

Weights are the graph's floating-point constants wherever a converter put them: initializers
(dense or sparse), `Constant` nodes (any value form), and `Identity`/`Cast` chains onto
either. Conv, ConvTranspose, Gemm and MatMul on a constant (with the Add of its bias) as
Linear, BatchNormalization, InstanceNormalization, LayerNormalization, PRelu, Gather on a
constant table (Embedding), LSTM, GRU and RNN get the signatures of their torch twins, so an
ONNX model can share layers with a torchvision one. A layer's activation bytes are its
output's (as a torch module's forward hook sees them; the model's peak is read from
consecutive layers, as for torch models), from ONNX shape inference at the workload's input
size on a copy of the graph without its large constants (types and dims kept, data not
copied), completed where needed by a node-by-node pass that evaluates shape arithmetic.

Bytes come from each constant's dims and dtype, never from its data, so external data is
never read. Every distinct floating-point constant is counted once, as stored (a Cast to fp16
of an fp32 constant costs the fp32 bytes; a sparse constant its stored values), and belongs to
  1. the first parameterised layer (the ops above) that reads it; else
  2. the first other node (not Shape or Size) that reads it while holding at least one
     unclaimed floating constant over 4 KiB: that node is a layer of its own kind (its
     op_type) and holds all its unclaimed floating constants; else
  3. no layer: it counts in the model's parameter bytes only, and a note gives the total
     (constants of at most 4 KiB read by arithmetic, and constants no node reads).
So a model's param_bytes + buffer_bytes is the sum over its distinct floating constants, and
equals the sum over its layer records plus the constants of rule 3. Buffers are batch-norm
running statistics and recurrent layers' initial states; the rest are parameters. Integer,
boolean and string constants are shapes, indices and labels, not weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .inventory import LayerRecord, TensorInfo
from .signature import (batchnorm_signature, conv_signature, embedding_signature, instancenorm_signature,
                        layernorm_signature, linear_signature, prelu_signature, rnn_signature)

_LARGE = 4096  # bytes: a constant over this is a layer of its own (rule 2) and is left out of inference


def _types(*names: str) -> dict[int, str]:
    """TensorProto type id -> name, for the names this onnx version knows."""
    return {getattr(onnx.TensorProto, n): n for n in names if hasattr(onnx.TensorProto, n)}


# Weights are floating-point constants, recognised by their TensorProto type (numpy has no
# kind for bfloat16 or float8); integer ones are shapes and axes, not layers.
_WEIGHT_TYPES = _types("FLOAT", "FLOAT16", "BFLOAT16", "DOUBLE", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2",
                       "FLOAT8E5M2FNUZ", "FLOAT8E8M0", "FLOAT4E2M1", "COMPLEX64", "COMPLEX128")
# Element sizes in bits where numpy's item size is not the stored one (sub-byte types are packed).
_BITS = {t: bits for names, bits in ((("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ",
                                       "FLOAT8E8M0"), 8), (("FLOAT4E2M1", "INT4", "UINT4"), 4),
                                     (("INT2", "UINT2"), 2))
         for t in _types(*names)}
# Names as torch spells them, so that signatures compare across formats.
_TORCH_NAMES = {"FLOAT": "float32", "FLOAT16": "float16", "BFLOAT16": "bfloat16", "DOUBLE": "float64",
                "FLOAT8E4M3FN": "float8_e4m3fn", "FLOAT8E4M3FNUZ": "float8_e4m3fnuz", "FLOAT8E5M2": "float8_e5m2",
                "FLOAT8E5M2FNUZ": "float8_e5m2fnuz", "FLOAT8E8M0": "float8_e8m0fnu"}

_AUTO_PAD = {"SAME_UPPER": "same", "VALID": "valid"}  # as torch's string paddings
_DTYPE_NAMES = {t: _TORCH_NAMES[n] for t, n in _types(*_TORCH_NAMES).items()}
_ALIASES = ("Identity", "Cast", "CastLike")  # their output is the constant they read, in another dtype at most
_SHAPE_ONLY = ("Shape", "Size")  # read a constant's dims, not its data
_RNN_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh"), "RNN": ("tanh",)}  # defaults
_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _nbytes(elem_type: int, count: int) -> int:
    if elem_type == onnx.TensorProto.STRING or elem_type == onnx.TensorProto.UNDEFINED:
        return 0  # never a weight; its stored size is not in its dims
    bits = _BITS.get(elem_type) or helper.tensor_dtype_to_np_dtype(elem_type).itemsize * 8
    return (count * bits + 7) // 8


def _dtype(elem_type: int) -> str:
    return _DTYPE_NAMES.get(elem_type) or str(helper.tensor_dtype_to_np_dtype(elem_type))


def _attrs(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
            out[a.name] = "<graph>"
        elif a.type in (onnx.AttributeProto.TENSOR, onnx.AttributeProto.SPARSE_TENSOR, onnx.AttributeProto.TENSORS,
                        onnx.AttributeProto.SPARSE_TENSORS):
            out[a.name] = "<tensor>"  # its data may be large; signatures say what the node holds anyway
        else:
            value = helper.get_attribute_value(a)
            if isinstance(value, bytes):
                value = value.decode("utf-8", "replace")
            elif isinstance(value, list):
                value = [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in value]
            out[a.name] = value
    return out


# --- the graph's constants ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Const:
    name: str
    dims: tuple[int, ...]
    elem_type: int
    nbytes: int  # as stored, from dims: external data need not be read

    @property
    def floating(self) -> bool:
        return self.elem_type in _WEIGHT_TYPES

    @property
    def numel(self) -> int:
        return math.prod(self.dims)

    def info(self) -> TensorInfo:
        return TensorInfo(self.name, self.dims, _dtype(self.elem_type), self.nbytes)


def _dense(name: str, t: onnx.TensorProto) -> _Const:
    return _Const(name, tuple(t.dims), t.data_type, _nbytes(t.data_type, math.prod(t.dims)))


def _sparse(name: str, sp: onnx.SparseTensorProto) -> _Const:
    """The dense shape (what the graph computes with) and the bytes of the stored values; the
    indices are integers."""
    return _Const(name, tuple(sp.dims), sp.values.data_type, _nbytes(sp.values.data_type, math.prod(sp.values.dims)))


def _constant_value(node: onnx.NodeProto) -> _Const | None:
    """What a Constant node produces (opset 9 has `value` only; 11 adds sparse_value, 12 the rest)."""
    out, tp = node.output[0], onnx.TensorProto
    for a in node.attribute:
        if a.name == "value":
            return _dense(out, a.t)
        if a.name == "sparse_value":
            return _sparse(out, a.sparse_tensor)
        if a.name == "value_float":
            return _Const(out, (), tp.FLOAT, 4)
        if a.name == "value_floats":
            return _Const(out, (len(a.floats),), tp.FLOAT, 4 * len(a.floats))
        if a.name == "value_int":
            return _Const(out, (), tp.INT64, 8)
        if a.name == "value_ints":
            return _Const(out, (len(a.ints),), tp.INT64, 8 * len(a.ints))
        if a.name in ("value_string", "value_strings"):
            return _Const(out, () if a.name == "value_string" else (len(a.strings),), tp.STRING, 0)
    return None


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


class _Graph:
    """The model's nodes in execution order (a control-flow node's subgraphs before it), its
    constants by name, and Identity/Cast outputs resolved to the constant they carry."""

    def __init__(self, model: onnx.ModelProto):
        self.consts: dict[str, _Const] = {}
        self.alias: dict[str, str] = {}
        self.nodes: list[onnx.NodeProto] = []
        self.top: list[bool] = []  # in the main graph (shape inference covers those)
        self.constant_nodes: set[int] = set()  # produce a constant: not layers, no activation
        self.consumers: dict[str, list[int]] = {}
        self.outputs = {o.name for o in model.graph.output}
        self._visit(model.graph, top=True)

    def _visit(self, graph: onnx.GraphProto, top: bool) -> None:
        for t in graph.initializer:
            self.consts[t.name] = _dense(t.name, t)
        for sp in graph.sparse_initializer:
            self.consts[sp.values.name] = _sparse(sp.values.name, sp)
        for node in graph.node:
            for sub in _subgraphs(node):
                self._visit(sub, top=False)
            index = len(self.nodes)
            self.nodes.append(node)
            self.top.append(top)
            for name in node.input:
                if name:
                    self.consumers.setdefault(name, []).append(index)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                value = _constant_value(node)
                if value is not None:
                    self.consts[value.name] = value
                    self.constant_nodes.add(index)
            elif node.op_type in _ALIASES and node.domain in ("", "ai.onnx") and node.input and node.output \
                    and self.const(node.input[0]) is not None:
                self.alias[node.output[0]] = self.alias.get(node.input[0], node.input[0])
                self.constant_nodes.add(index)

    def const(self, name: str) -> _Const | None:
        return self.consts.get(self.alias.get(name, name)) if name else None

    def weight(self, node: onnx.NodeProto, k: int) -> _Const | None:
        """Input k of a node if it is a floating-point constant."""
        c = self.const(node.input[k]) if len(node.input) > k else None
        return c if c is not None and c.floating else None


# --- parameterised layers ---------------------------------------------------------------------


@dataclass
class _Layer:
    kind: str
    signature: str
    tensors: list[tuple[_Const, bool]]  # (constant, is a buffer)
    absorbed: int | None = None  # a following node folded into this layer (MatMul's bias Add)
    first_output_only: bool = False  # BatchNormalization's training outputs are statistics


def _rank(name: str, shapes: dict) -> int | None:
    known = shapes.get(name)
    return len(known[0]) if known else None


def _conv(node, a, w, b) -> _Layer | None:
    if w is None or len(w.dims) < 3:
        return None
    dims, spatial = list(w.dims), len(w.dims) - 2
    kind = f"{node.op_type}{spatial}d"
    groups = a.get("group", 1)
    if node.op_type == "Conv":
        out_ch, in_ch = dims[0], dims[1] * groups
    else:
        in_ch, out_ch = dims[0], dims[1] * groups
    pads = list(a.get("pads", [0] * 2 * spatial))
    padding = tuple(pads[:spatial]) if pads[:spatial] == pads[spatial:] else tuple(pads)
    auto_pad = a.get("auto_pad", "NOTSET")
    if auto_pad != "NOTSET":
        # torch exports padding='same' as SAME_UPPER (extra padding at the end) and 'valid' as VALID.
        padding = _AUTO_PAD.get(auto_pad, auto_pad.lower())
    output_padding = tuple(a.get("output_padding", [0] * spatial)) if node.op_type == "ConvTranspose" else None
    signature = conv_signature(kind, in_ch, out_ch, tuple(a.get("kernel_shape", dims[2:])),
                               tuple(a.get("strides", [1] * spatial)), padding,
                               tuple(a.get("dilations", [1] * spatial)), groups, b is not None, _dtype(w.elem_type),
                               output_padding=output_padding)
    return _Layer(kind, signature, [(w, False)] + ([(b, False)] if b else []))


def _linear(w: _Const, in_f: int, out_f: int, b: _Const | None, extra: str = "") -> _Layer:
    if extra:  # scaled (Gemm alpha/beta): no torch twin
        signature = f"Gemm(in={in_f},out={out_f},bias={b is not None}{extra},{_dtype(w.elem_type)})"
        return _Layer("Gemm", signature, [(w, False)] + ([(b, False)] if b else []))
    return _Layer("Linear", linear_signature(in_f, out_f, b is not None, _dtype(w.elem_type)),
                  [(w, False)] + ([(b, False)] if b else []))


def _gemm(node, a, g: _Graph) -> _Layer | None:
    """Y = alpha·A'·B' + beta·C. The constant operand is the weight; whichever of A or B it is
    and however it is transposed, its dims give the twin nn.Linear(in, out)."""
    wa, wb = g.weight(node, 0), g.weight(node, 1)
    if (wa is None) == (wb is None):  # both constant (folding left over) or neither: no weight
        return None
    w = wb if wb is not None else wa
    if len(w.dims) != 2:
        return None
    if wb is not None:  # X·B': B' is [in, out]
        in_f, out_f = (w.dims[1], w.dims[0]) if a.get("transB", 0) else (w.dims[0], w.dims[1])
    else:  # A'·X: A' is [out, in], a Linear on X's transpose
        in_f, out_f = (w.dims[0], w.dims[1]) if a.get("transA", 0) else (w.dims[1], w.dims[0])
    c = g.weight(node, 2)
    if c is not None and c.numel != out_f:  # a bias broadcast otherwise is not a Linear's bias
        return None
    alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
    extra = "" if alpha == 1.0 and (c is None or beta == 1.0) else f",alpha={alpha:g},beta={beta:g}"
    return _linear(w, in_f, out_f, c, extra)


def _matmul(index: int, node, g: _Graph) -> _Layer | None:
    """X·W (W [in, out]) or W·X (W [out, in]) with W a 2-D constant, as Linear; an Add of a
    constant bias that alone reads its output is folded in."""
    wa, wb = g.weight(node, 0), g.weight(node, 1)
    if (wa is None) == (wb is None):
        return None
    w = wb if wb is not None else wa
    if len(w.dims) != 2:
        return None
    in_f, out_f = (w.dims[0], w.dims[1]) if wb is not None else (w.dims[1], w.dims[0])
    out = node.output[0]
    readers = g.consumers.get(out, [])
    bias, absorbed = None, None
    if len(readers) == 1 and out not in g.outputs and g.top[readers[0]] == g.top[index]:
        add = g.nodes[readers[0]]
        if add.op_type == "Add" and add.domain in ("", "ai.onnx") and len(add.input) == 2:
            other = add.input[1] if add.input[0] == out else add.input[0]
            c = g.const(other)
            if c is not None and c.floating and c.numel == out_f and other != out:
                bias, absorbed = c, readers[0]
    layer = _linear(w, in_f, out_f, bias)
    layer.absorbed = absorbed
    return layer


def _norm_kind(prefix: str, rank: int | None) -> str:
    """BatchNorm1d for [N, C] and [N, C, L] inputs, 3d for [N, C, D, H, W]; 2d otherwise or unknown."""
    spatial = {2: 1, 3: 1, 5: 3}.get(rank, 2)
    return f"{prefix}{spatial}d"


def _rnn(node, a, g: _Graph) -> _Layer | None:
    """ONNX LSTM/GRU/RNN nodes are one layer each: W [dirs, gates·hidden, in], R, B [dirs, 2·gates·hidden]."""
    w, r, b = g.weight(node, 1), g.weight(node, 2), g.weight(node, 3)
    if w is None or len(w.dims) != 3:
        return None
    op = node.op_type
    hidden = a.get("hidden_size") or (r.dims[-1] if r is not None else w.dims[1] // _RNN_GATES[op])
    direction = a.get("direction", "forward")
    dirs = 2 if direction == "bidirectional" else 1
    acts = [s.lower() for s in a.get("activations", [])]
    extra = ""
    if direction == "reverse":
        extra += ",direction=reverse"
    if op == "RNN":  # torch's nonlinearity: tanh or relu
        extra += f",act={acts[0] if acts and acts == acts[:1] * len(acts) else 'tanh'}"
        if acts and acts != acts[:1] * len(acts):
            extra += f",acts={'/'.join(acts)}"
    elif acts and acts != list(_RNN_ACTIVATIONS[op]) * dirs:
        extra += f",acts={'/'.join(acts)}"
    for name in ("activation_alpha", "activation_beta", "clip"):
        if name in a:
            extra += f",{name}={a[name]}"
    if op == "LSTM" and a.get("input_forget", 0):
        extra += ",input_forget=1"
    if op == "GRU" and not a.get("linear_before_reset", 0):  # torch's GRU resets after the linear map
        extra += ",lbr=0"
    tensors = [(t, False) for t in (w, r, b) if t is not None]
    if op == "LSTM" and (p := g.weight(node, 7)) is not None:
        extra += ",peepholes=True"
        tensors.append((p, False))
    states = (5, 6) if op == "LSTM" else (5,)
    tensors += [(s, True) for k in states if (s := g.weight(node, k)) is not None]
    return _Layer(op, rnn_signature(op, w.dims[2], hidden, b is not None, dirs == 2, _dtype(w.elem_type), extra),
                  tensors)


def _layer(index: int, node: onnx.NodeProto, g: _Graph, shapes: dict) -> _Layer | None:
    """The parameterised layer a node is, or None (then rule 2 or 3 decides its constants)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
                  "LayerNormalization", "PRelu", "Gather", "LSTM", "GRU", "RNN"):
        return None
    a = _attrs(node)
    if op in ("Conv", "ConvTranspose"):
        return _conv(node, a, g.weight(node, 1), g.weight(node, 2))
    if op == "Gemm":
        return _gemm(node, a, g)
    if op == "MatMul":
        return _matmul(index, node, g)
    if op in ("LSTM", "GRU", "RNN"):
        return _rnn(node, a, g)
    if op == "BatchNormalization":  # X, scale, B, mean, var
        scale, bias, mean, var = (g.weight(node, k) for k in range(1, 5))
        sized = next((t for t in (scale, bias, mean, var) if t is not None), None)
        if sized is None or not sized.dims:
            return None
        kind = _norm_kind("BatchNorm", _rank(node.input[0], shapes))
        signature = batchnorm_signature(kind, sized.dims[0], a.get("epsilon", 1e-5), True, _dtype(sized.elem_type))
        return _Layer(kind, signature, [(t, False) for t in (scale, bias) if t is not None]
                      + [(t, True) for t in (mean, var) if t is not None], first_output_only=True)
    if op == "InstanceNormalization":  # X, scale, B
        scale, bias = g.weight(node, 1), g.weight(node, 2)
        sized = scale if scale is not None else bias
        if sized is None or not sized.dims:
            return None
        kind = _norm_kind("InstanceNorm", _rank(node.input[0], shapes))
        signature = instancenorm_signature(kind, sized.dims[0], a.get("epsilon", 1e-5), True, _dtype(sized.elem_type))
        return _Layer(kind, signature, [(t, False) for t in (scale, bias) if t is not None])
    if op == "LayerNormalization":  # X, Scale, B; normalises the dims from `axis` on
        scale, bias = g.weight(node, 1), g.weight(node, 2)
        if scale is None:
            return None
        axis, rank = a.get("axis", -1), _rank(node.input[0], shapes)
        if not (axis == -len(scale.dims) or (rank is not None and axis % rank == rank - len(scale.dims))):
            return None  # the scale broadcasts over other dims: no nn.LayerNorm twin
        signature = layernorm_signature(scale.dims, a.get("epsilon", 1e-5), True, bias is not None,
                                        _dtype(scale.elem_type))
        return _Layer("LayerNorm", signature, [(t, False) for t in (scale, bias) if t is not None])
    if op == "PRelu":
        slope = g.weight(node, 1)
        return None if slope is None else _Layer("PReLU", prelu_signature(slope.numel, _dtype(slope.elem_type)),
                                                 [(slope, False)])
    if op == "Gather":  # a table looked up by computed indices
        table = g.weight(node, 0)
        if table is None or len(table.dims) != 2 or a.get("axis", 0) != 0 or g.const(node.input[1]) is not None:
            return None
        return _Layer("Embedding", embedding_signature(table.dims[0], table.dims[1], _dtype(table.elem_type)),
                      [(table, False)])
    return None


def _generic(node: onnx.NodeProto, held: list[tuple[int, _Const]]) -> str:
    attrs = ",".join(f"{k}={v}" for k, v in sorted(_attrs(node).items()))
    shapes = ";".join(f"{k}:({','.join(map(str, c.dims))})" for k, c in held)
    return f"{node.op_type}({attrs}|{shapes},{_dtype(held[0][1].elem_type)})"


# --- shapes --------------------------------------------------------------------------------------
# ONNX shape inference runs on a light copy of the graph at the workload's input size. Where it
# leaves a layer's output unknown (a shape computed at run time from other shapes, e.g.
# Shape -> Gather -> Div -> Cast -> Concat -> Reshape, which onnx's data propagation does not
# follow through Div or Cast), a second pass goes node by node and evaluates such small shape
# computations with numpy.

_MAX_VALUE = 1024  # elements: the shape computations the second pass evaluates are small


def _typed(name: str, c: _Const) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, c.elem_type, list(c.dims))


def _fix_input(vi: onnx.ValueInfoProto, batch: int, size: tuple[int, int, int], notes: list[str]) -> int | None:
    """Set an input's symbolic dims to the workload's batch and size, in place; the graph's own
    batch if it fixes one."""
    tt = vi.type.tensor_type if vi.type.HasField("tensor_type") else None
    if tt is None or not tt.HasField("shape"):
        notes.append(f"ONNX input '{vi.name}' has no declared shape: the workload's input size is not applied to it")
        return None
    dims = tt.shape.dim
    if len(dims) == 3:  # one [C, H, W] image, as torchvision detectors take them
        wanted, graph_batch = list(size), 1
        if any(not d.HasField("dim_value") for d in dims):
            notes.append(f"ONNX input '{vi.name}' has rank 3: taken as one [C, H, W] image")
    elif len(dims) == 4:
        wanted, graph_batch = [batch, *size], None
    else:
        if dims and not dims[0].HasField("dim_value"):
            dims[0].dim_value = batch
        notes.append(f"ONNX input '{vi.name}' has rank {len(dims)}, not 4 ([batch, C, H, W]): the workload's input "
                     f"size is not applied to it")
        return None
    fixed = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    for d, w in zip(dims, wanted):
        if not d.HasField("dim_value"):
            d.dim_value = w
    if len(dims) == 4 and fixed[0] is not None:
        graph_batch = fixed[0]
    image = fixed[-3:]
    if any(f is not None and f != w for f, w in zip(image, size)):
        notes.append(f"ONNX input '{vi.name}' is fixed at {'x'.join(str(d.dim_value) for d in dims[-3:])}: "
                     f"activations are measured there, not at the workload's {'x'.join(map(str, size))}")
    return graph_batch


def _inference_copy(model: onnx.ModelProto, g: _Graph, batch: int, size: tuple[int, int, int]):
    """A light copy for shape inference: large constants (over 4 KiB: weights) become typed
    graph inputs, so none of their data are copied; small ones (shapes, axes, scales, which
    Reshape, Slice or Resize need the values of) stay as they are. The real inputs take the
    workload's batch and size where their dims are symbolic. Returns the copy, the batch the
    graph runs at and notes."""
    src = model.graph
    copy = onnx.ModelProto()
    copy.ir_version = max(model.ir_version, 4)  # IR 4 on: initializers need no graph input to be typed
    copy.opset_import.extend(model.opset_import)
    copy.functions.extend(model.functions)
    graph = copy.graph
    graph.name = src.name
    notes: list[str] = []
    graph_batch = batch
    init_names = {t.name for t in src.initializer} | {sp.values.name for sp in src.sparse_initializer}
    for vi in src.input:
        if vi.name not in init_names:
            inp = graph.input.add()
            inp.CopyFrom(vi)
            fixed = _fix_input(inp, batch, size, notes)
            graph_batch = fixed if fixed is not None else graph_batch
    for t in src.initializer:
        if g.consts[t.name].nbytes > _LARGE:
            graph.input.append(_typed(t.name, g.consts[t.name]))
        else:
            graph.initializer.append(t)
    for sp in src.sparse_initializer:
        if g.consts[sp.values.name].nbytes > _LARGE:
            graph.input.append(_typed(sp.values.name, g.consts[sp.values.name]))
        else:
            graph.sparse_initializer.append(sp)
    for node in src.node:
        c = g.consts.get(node.output[0]) if node.op_type == "Constant" and node.output else None
        if c is not None and c.nbytes > _LARGE:
            graph.input.append(_typed(c.name, c))
        else:
            graph.node.append(node)
    for vi in src.output:  # names and types; shapes are what inference is for
        out = graph.output.add()
        out.CopyFrom(vi)
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    return copy, graph_batch, notes


def _collect(values, shapes: dict) -> None:
    """name -> (dims, elem type) of tensor values, dims None where unknown."""
    for vi in values:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            t = vi.type.tensor_type
            shapes.setdefault(vi.name, ([d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim],
                                        t.elem_type))


def _known(shape) -> bool:
    return shape is not None and all(d is not None for d in shape[0])


def _small_value(t: onnx.TensorProto):
    if t.data_location == onnx.TensorProto.EXTERNAL or math.prod(t.dims) > _MAX_VALUE \
            or t.data_type == onnx.TensorProto.STRING:
        return None
    try:
        return numpy_helper.to_array(t)
    except Exception:  # a dtype numpy cannot hold: not a shape computation
        return None


def _constant_array(node: onnx.NodeProto):
    for a in node.attribute:
        if a.name == "value":
            return _small_value(a.t)
        if a.name in ("value_int", "value_ints", "value_float", "value_floats"):
            value = helper.get_attribute_value(a)
            return np.array(value, np.int64 if "int" in a.name else np.float32)
    return None


def _axes(attrs: dict, vals: list, k: int):
    axes = attrs.get("axes")
    if axes is None and len(vals) > k and vals[k] is not None:
        axes = vals[k].tolist()
    return axes


_BINARY = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal, "Less": np.less,
           "Greater": np.greater, "LessOrEqual": np.less_equal, "GreaterOrEqual": np.greater_equal,
           "And": np.logical_and, "Or": np.logical_or, "Max": np.maximum, "Min": np.minimum}
_UNARY = {"Neg": np.negative, "Abs": np.abs, "Floor": np.floor, "Ceil": np.ceil, "Not": np.logical_not,
          "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Identity": lambda v: v}
_EVALUATED = {"Shape", "Size", "Div", "Mod", "Sum", "Cast", "Gather", "Unsqueeze", "Squeeze", "Concat", "Slice",
              "Where", "Range", "Reshape", "ConstantOfShape", "ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin",
              "Transpose", "Expand"} | set(_BINARY) | set(_UNARY)


def _evaluate(node: onnx.NodeProto, vals: list, dims_of) -> list | None:
    """The outputs of a node of a small shape computation, or None. `vals` holds its inputs'
    values (None where unknown); `dims_of(name)` a value's full dims or None."""
    op = node.op_type
    if op not in _EVALUATED or node.domain not in ("", "ai.onnx"):
        return None
    if op in ("Shape", "Size"):  # need only their input's dims
        dims = dims_of(node.input[0])
        if dims is None:
            return None
        if op == "Size":
            return [np.array(math.prod(dims), np.int64)]
        a = _attrs(node)
        return [np.array(dims[a.get("start", 0):a.get("end")], np.int64)]
    if not vals or any(v is None for v, name in zip(vals, node.input) if name):
        return None
    a, x = _attrs(node), vals
    if op in _BINARY or op == "Sum":
        fn = _BINARY.get(op, np.add)
        out = x[0]
        for v in x[1:]:  # Max, Min and Sum take any number of inputs
            out = fn(out, v)
        return [out]
    if op == "Div":
        if np.issubdtype(x[0].dtype, np.integer):  # integer division truncates
            return [np.trunc(x[0] / x[1]).astype(x[0].dtype)]
        return [(x[0] / x[1]).astype(x[0].dtype)]
    if op == "Mod":
        return [np.fmod(x[0], x[1]) if a.get("fmod") else np.mod(x[0], x[1])]
    if op in _UNARY:
        return [_UNARY[op](x[0])]
    if op == "Cast":
        return [x[0].astype(helper.tensor_dtype_to_np_dtype(a["to"]))]
    if op == "Gather":
        return [np.take(x[0], x[1], axis=a.get("axis", 0))]
    if op == "Unsqueeze":
        out, axes = x[0], _axes(a, x, 1)
        rank = out.ndim + len(axes)
        for axis in sorted(ax % rank for ax in axes):
            out = np.expand_dims(out, axis)
        return [out]
    if op == "Squeeze":
        axes = _axes(a, x, 1)
        return [np.squeeze(x[0], axis=tuple(axes) if axes else None)]
    if op == "Concat":
        return [np.concatenate([np.atleast_1d(v) for v in x], axis=a["axis"])]
    if op == "Slice":
        if "starts" in a:  # opset < 10: attributes
            starts, ends, axes, steps = a["starts"], a["ends"], a.get("axes"), None
        else:
            starts, ends = x[1].tolist(), x[2].tolist()
            axes = x[3].tolist() if len(x) > 3 and node.input[3] else None
            steps = x[4].tolist() if len(x) > 4 and node.input[4] else None
        index = [slice(None)] * x[0].ndim
        for i, axis in enumerate(axes if axes is not None else range(len(starts))):
            index[axis] = slice(starts[i], ends[i], steps[i] if steps else 1)
        return [x[0][tuple(index)]]
    if op == "Where":
        return [np.where(x[0], x[1], x[2])]
    if op == "Range":
        if math.ceil((x[1] - x[0]) / x[2]) > _MAX_VALUE:
            return None
        return [np.arange(x[0], x[1], x[2]).astype(x[0].dtype)]
    if op == "Reshape":
        shape = [int(d) for d in x[1]]
        if not a.get("allowzero", 0):
            shape = [x[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return [x[0].reshape(shape)]
    if op in ("ConstantOfShape", "Expand"):
        shape = [int(d) for d in (x[0] if op == "ConstantOfShape" else x[1])]
        if op == "Expand":
            shape = list(np.broadcast_shapes(x[0].shape, tuple(shape)))
        if math.prod(shape) > _MAX_VALUE:
            return None
        if op == "Expand":
            return [np.broadcast_to(x[0], shape).copy()]
        value = next((attr.t for attr in node.attribute if attr.name == "value"), None)
        fill = numpy_helper.to_array(value).reshape(-1) if value is not None else np.zeros(1, np.float32)
        return [np.full(shape, fill[0], fill.dtype)]
    if op in ("ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin"):
        axes = _axes(a, x, 1)
        fn = {"ReduceProd": np.prod, "ReduceSum": np.sum, "ReduceMax": np.max, "ReduceMin": np.min}[op]
        return [np.asarray(fn(x[0], axis=tuple(axes) if axes else None, keepdims=bool(a.get("keepdims", 1))),
                           x[0].dtype)]
    if op == "Transpose":
        return [np.transpose(x[0], a.get("perm"))]
    return None


def _shape_of(t: onnx.TypeProto):
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    tt = t.tensor_type
    return [d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim], tt.elem_type


def _node_by_node(light: onnx.ModelProto, shapes: dict) -> None:
    """Fill in `shapes` node by node, evaluating small shape computations so that the shapes
    they make are known. What the first pass knew fully is kept; only nodes with an output it
    left unknown are typed again."""
    graph = light.graph
    opsets = {"" if o.domain == "ai.onnx" else o.domain: o.version for o in light.opset_import}
    types: dict[str, onnx.TypeProto] = {vi.name: vi.type for vi in graph.input}
    values: dict[str, np.ndarray] = {}
    for t in graph.initializer:
        types[t.name] = helper.make_tensor_type_proto(t.data_type, list(t.dims))
        if (v := _small_value(t)) is not None:
            values[t.name] = v

    def type_of(name: str):
        if name not in types and _known(shapes.get(name)):
            dims, elem = shapes[name]
            types[name] = helper.make_tensor_type_proto(elem, dims)
        return types.get(name)

    def dims_of(name: str):
        t = type_of(name)
        shape = _shape_of(t) if t is not None else None
        return shape[0] if _known(shape) else None

    for node in graph.node:
        try:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                outs = [_constant_array(node)]
            else:
                with np.errstate(all="ignore"):  # a division by zero is the graph's, not a reason to stop
                    outs = _evaluate(node, [values.get(i) if i else None for i in node.input], dims_of)
            if outs is not None and all(o is not None and np.asarray(o).size <= _MAX_VALUE for o in outs):
                for name, value in zip(node.output, outs):
                    value = np.asarray(value)
                    values[name] = value
                    types[name] = helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(value.dtype),
                                                                list(value.shape))
                continue
            if all(_known(shapes.get(o)) for o in node.output if o):
                continue  # the first pass typed it fully
            if node.op_type == "Constant":  # a value too large to evaluate, or of another form
                schema = onnx.defs.get_schema("Constant", opsets.get("", 1))
                types.update(onnx.shape_inference.infer_node_outputs(schema, node, {}))
                continue
            domain = "" if node.domain == "ai.onnx" else node.domain
            schema = onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
            if any(True for _ in _subgraphs(node)):  # subgraphs see every outer value
                inputs = {name: t for name in list(types) + list(shapes) if (t := type_of(name)) is not None}
            else:
                inputs = {i: t for i in node.input if i and (t := type_of(i)) is not None}
            data = {i: numpy_helper.from_array(values[i], i) for i in node.input if i in values}
            types.update(onnx.shape_inference.infer_node_outputs(schema, node, inputs, data,
                                                                 opset_imports=list(light.opset_import),
                                                                 ir_version=light.ir_version))
        except Exception:  # an op this pass cannot type (custom domain, unknown input): its outputs stay unknown
            continue
    for name, t in types.items():
        shape = _shape_of(t)
        if shape is not None and not _known(shapes.get(name)):
            shapes[name] = shape


def _shapes(model: onnx.ModelProto, g: _Graph, batch: int, size, wanted: set[str]) -> tuple[dict, int, list[str]]:
    """Output name -> (dims, elem type; a dim None where unknown) for the main graph's values,
    the graph's batch and notes. `wanted`: the outputs the layers need."""
    light, graph_batch, notes = _inference_copy(model, g, batch, size)
    shapes: dict = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
        _collect(list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input), shapes)
    except Exception as exc:  # inference is best effort; the node-by-node pass may still type most of it
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        notes.append(f"ONNX shape inference failed ({first}); shapes come from a node-by-node pass")
    if any(not _known(shapes.get(name)) for name in wanted):
        _node_by_node(light, shapes)
    return shapes, graph_batch, notes


# --- the inventory -----------------------------------------------------------------------------


@dataclass
class _Record:
    index: int  # the node's place in execution order
    kind: str
    signature: str
    params: list[TensorInfo] = field(default_factory=list)
    buffers: list[TensorInfo] = field(default_factory=list)
    out_node: int = 0
    first_output_only: bool = False


def _labels(g: _Graph) -> list[str]:
    """Node names, made up for unnamed nodes from a count that skips constant-producing
    nodes (so that moving weights into Constant nodes renames nothing) and made unique."""
    labels, seen, count = [], set(), 0
    for index, node in enumerate(g.nodes):
        label = node.name or f"{node.op_type}_{count}"
        count += index not in g.constant_nodes
        base, k = label, 2
        while label in seen:
            label, k = f"{base}#{k}", k + 1
        seen.add(label)
        labels.append(label)
    return labels


def _wanted(g: _Graph) -> set[str]:
    """Outputs that layers may need the shapes of: those of main-graph nodes reading a floating
    constant, and of the Add after each (a MatMul's bias)."""
    wanted: set[str] = set()
    for index, node in enumerate(g.nodes):
        if not g.top[index] or index in g.constant_nodes:
            continue
        if any((c := g.const(name)) is not None and c.floating for name in node.input):
            wanted.update(o for o in node.output if o)
            for reader in g.consumers.get(node.output[0], []) if node.output else []:
                if g.nodes[reader].op_type == "Add":
                    wanted.update(o for o in g.nodes[reader].output if o)
    return wanted


def onnx_layers(model: onnx.ModelProto, batch: int, size: tuple[int, int, int]):
    """Records in graph order, per-layer output bytes in that order, notes, and the model's
    parameter and buffer bytes (see the module docstring for which constant counts where)."""
    g = _Graph(model)
    shapes, graph_batch, notes = _shapes(model, g, batch, size, _wanted(g))
    if graph_batch != batch and graph_batch > 0:
        notes.append(f"the graph's batch is fixed at {graph_batch}; activations are scaled to batch {batch}")
    claimed: set[str] = set()
    records: dict[int, _Record] = {}
    absorbed: set[int] = set()

    def claim(record: _Record, tensors) -> None:
        for c, is_buffer in tensors:
            if c.floating and c.name not in claimed:
                claimed.add(c.name)
                (record.buffers if is_buffer else record.params).append(c.info())

    # Rule 1: parameterised layers, in execution order.
    planned: set[int] = set()
    for index, node in enumerate(g.nodes):
        if index in g.constant_nodes or index in absorbed:
            continue
        layer = _layer(index, node, g, shapes)
        if layer is None:
            continue
        planned.add(index)
        record = _Record(index, layer.kind, layer.signature,
                         out_node=index if layer.absorbed is None else layer.absorbed,
                         first_output_only=layer.first_output_only)
        if layer.absorbed is not None:
            absorbed.add(layer.absorbed)
        claim(record, layer.tensors)
        if record.params or record.buffers:
            records[index] = record
    # Rule 2: other nodes that hold a large floating constant.
    for index, node in enumerate(g.nodes):
        if index in g.constant_nodes or index in planned or index in absorbed or node.op_type in _SHAPE_ONLY:
            continue
        held, names = [], set()
        for k, name in enumerate(node.input):
            c = g.const(name)
            if c is not None and c.floating and c.name not in claimed and c.name not in names:
                names.add(c.name)
                held.append((k, c))
        if held and max(c.nbytes for _, c in held) > _LARGE:
            record = _Record(index, node.op_type, _generic(node, held), out_node=index)
            claim(record, [(c, False) for _, c in held])
            records[index] = record
    # Rule 3: the rest belongs to no layer.
    leftover = [c for c in g.consts.values() if c.floating and c.name not in claimed]
    leftover_bytes = sum(c.nbytes for c in leftover)

    labels = _labels(g)
    out: list[LayerRecord] = []
    calls: list[int] = []
    unmeasured: list[str] = []
    for index in sorted(records):
        r = records[index]
        node = g.nodes[r.out_node]
        names = [o for o in node.output if o][:1 if r.first_output_only else None]
        known = [shapes[o] for o in names if _known(shapes.get(o))]
        act = None
        if names and len(known) == len(names):
            act = sum(_nbytes(t, math.prod(d)) for d, t in known) * batch // max(graph_batch, 1)
            calls.append(act)
        else:
            unmeasured.append(labels[index])
        pb, bb = sum(t.nbytes for t in r.params), sum(t.nbytes for t in r.buffers)
        out.append(LayerRecord(name=labels[index], kind=r.kind, signature=r.signature, param_bytes=pb,
                               buffer_bytes=bb, activation_bytes=act, trainable=bool(r.params),
                               executed=act is not None, params=tuple(r.params), buffers=tuple(r.buffers)))
    if unmeasured:
        notes.append(f"{len(unmeasured)} ONNX layer(s) have no activation figure: shape inference did not give "
                     f"their output shapes, or they run inside an If or Loop (first: {unmeasured[0]})")
    if leftover:
        notes.append(f"{len(leftover)} small or unread floating-point constant(s), {leftover_bytes} bytes, belong "
                     f"to no layer: counted in the model's parameter bytes only")
    param_bytes = sum(r.param_bytes for r in out) + leftover_bytes
    buffer_bytes = sum(r.buffer_bytes for r in out)
    return out, calls, notes, param_bytes, buffer_bytes
