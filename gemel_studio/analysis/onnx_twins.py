"""Which ONNX nodes are parameterised layers, with the signature of their torch twin.

Conv and ConvTranspose, Gemm and MatMul on a constant (with the Add of its bias) as Linear,
BatchNormalization, InstanceNormalization, LayerNormalization, PRelu, Gather on a constant
table (Embedding), LSTM, GRU and RNN get the signatures torch modules get (signature.py), so
an ONNX model can share layers with a torchvision one. Other nodes that hold a large constant
get a generic signature of their op type, attributes and constant shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from .onnx_graph import FlatGraph, GraphConstant, node_attributes, dtype_of
from .signature import (batchnorm_signature, conv_signature, embedding_signature, instancenorm_signature,
                        layernorm_signature, linear_signature, prelu_signature, rnn_signature)

_AUTO_PAD = {"SAME_UPPER": "same", "VALID": "valid"}  # as torch's string paddings
_RNN_ACTIVATIONS = {"LSTM": ("sigmoid", "tanh", "tanh"), "GRU": ("sigmoid", "tanh"), "RNN": ("tanh",)}  # defaults
_RNN_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


@dataclass
class RecognisedLayer:
    """A node recognised as a layer: its torch twin's kind and signature and the constants it holds."""

    kind: str
    signature: str
    tensors: list[tuple[GraphConstant, bool]]  # (constant, is a buffer)
    absorbed: int | None = None  # a following node folded into this layer (MatMul's bias Add)
    first_output_only: bool = False  # BatchNormalization's training outputs are statistics


def _rank(name: str, shapes: dict) -> int | None:
    known = shapes.get(name)
    return len(known[0]) if known else None


def _conv(node, a, w, b) -> RecognisedLayer | None:
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
                               tuple(a.get("dilations", [1] * spatial)), groups, b is not None,
                               dtype_of(w.elem_type), output_padding=output_padding)
    return RecognisedLayer(kind, signature, _weights(w, b))


def _weights(*tensors: GraphConstant | None) -> list[tuple[GraphConstant, bool]]:
    """The constants given (None where absent), as parameters."""
    return [(t, False) for t in tensors if t is not None]


def _linear(w: GraphConstant, in_f: int, out_f: int, b: GraphConstant | None, extra: str = "") -> RecognisedLayer:
    if extra:  # scaled (Gemm alpha/beta): no torch twin
        signature = f"Gemm(in={in_f},out={out_f},bias={b is not None}{extra},{dtype_of(w.elem_type)})"
        return RecognisedLayer("Gemm", signature, _weights(w, b))
    return RecognisedLayer("Linear", linear_signature(in_f, out_f, b is not None, dtype_of(w.elem_type)),
                           _weights(w, b))


def _gemm(node, a, g: FlatGraph) -> RecognisedLayer | None:
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


def _matmul(index: int, node, g: FlatGraph) -> RecognisedLayer | None:
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


def _rnn(node, a, g: FlatGraph) -> RecognisedLayer | None:
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
    tensors = _weights(w, r, b)
    if op == "LSTM" and (p := g.weight(node, 7)) is not None:
        extra += ",peepholes=True"
        tensors.append((p, False))
    states = (5, 6) if op == "LSTM" else (5,)
    tensors += [(s, True) for k in states if (s := g.weight(node, k)) is not None]
    signature = rnn_signature(op, w.dims[2], hidden, b is not None, dirs == 2, dtype_of(w.elem_type), extra)
    return RecognisedLayer(op, signature, tensors)


def recognise_layer(index: int, node: onnx.NodeProto, g: FlatGraph, shapes: dict) -> RecognisedLayer | None:
    """The parameterised layer a node is, or None (then rule 2 or 3 decides its constants)."""
    if node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op not in ("Conv", "ConvTranspose", "Gemm", "MatMul", "BatchNormalization", "InstanceNormalization",
                  "LayerNormalization", "PRelu", "Gather", "LSTM", "GRU", "RNN"):
        return None
    a = node_attributes(node)
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
        signature = batchnorm_signature(kind, sized.dims[0], a.get("epsilon", 1e-5), True, dtype_of(sized.elem_type))
        statistics = [(t, True) for t in (mean, var) if t is not None]
        return RecognisedLayer(kind, signature, _weights(scale, bias) + statistics, first_output_only=True)
    if op == "InstanceNormalization":  # X, scale, B
        scale, bias = g.weight(node, 1), g.weight(node, 2)
        sized = scale if scale is not None else bias
        if sized is None or not sized.dims:
            return None
        kind = _norm_kind("InstanceNorm", _rank(node.input[0], shapes))
        signature = instancenorm_signature(kind, sized.dims[0], a.get("epsilon", 1e-5), True,
                                           dtype_of(sized.elem_type))
        return RecognisedLayer(kind, signature, _weights(scale, bias))
    if op == "LayerNormalization":  # X, Scale, B; normalises the dims from `axis` on
        scale, bias = g.weight(node, 1), g.weight(node, 2)
        if scale is None:
            return None
        axis, rank = a.get("axis", -1), _rank(node.input[0], shapes)
        if not (axis == -len(scale.dims) or (rank is not None and axis % rank == rank - len(scale.dims))):
            return None  # the scale broadcasts over other dims: no nn.LayerNorm twin
        signature = layernorm_signature(scale.dims, a.get("epsilon", 1e-5), True, bias is not None,
                                        dtype_of(scale.elem_type))
        return RecognisedLayer("LayerNorm", signature, _weights(scale, bias))
    if op == "PRelu":
        slope = g.weight(node, 1)
        if slope is None:
            return None
        return RecognisedLayer("PReLU", prelu_signature(slope.numel, dtype_of(slope.elem_type)), _weights(slope))
    if op == "Gather":  # a table looked up by computed indices
        table = g.weight(node, 0)
        if table is None or len(table.dims) != 2 or a.get("axis", 0) != 0 or g.const(node.input[1]) is not None:
            return None
        signature = embedding_signature(table.dims[0], table.dims[1], dtype_of(table.elem_type))
        return RecognisedLayer("Embedding", signature, _weights(table))
    return None


def generic_signature(node: onnx.NodeProto, held: list[tuple[int, GraphConstant]]) -> str:
    """A node of no torch twin: op type, attributes, and the (input index, shape) of each constant held."""
    attrs = ",".join(f"{k}={v}" for k, v in sorted(node_attributes(node).items()))
    shapes = ";".join(f"{k}:({','.join(map(str, c.dims))})" for k, c in held)
    return f"{node.op_type}({attrs}|{shapes},{dtype_of(held[0][1].elem_type)})"

