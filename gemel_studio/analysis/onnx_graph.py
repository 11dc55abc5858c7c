"""An ONNX graph's floating-point constants, wherever a converter put them, and its nodes in order.

Weights are initializers (dense or sparse), `Constant` nodes (any value form), and
`Identity`/`Cast` chains onto either; the nodes of If/Loop/Scan bodies come before the node
that runs them. A constant's bytes come from its dims and dtype, never from its data, so
external data is never read. Integer, boolean and string constants are shapes, indices and
labels, not weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import onnx
from onnx import helper

from .records import TensorInfo

# Bytes: a constant over this is a layer of its own (onnx_inventory.py, rule 2) and is left out of
# the light copy that shape inference runs on (onnx_shapes.py).
LARGE_CONSTANT = 4096


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

_DTYPE_NAMES = {t: _TORCH_NAMES[n] for t, n in _types(*_TORCH_NAMES).items()}
_ALIASES = ("Identity", "Cast", "CastLike")  # their output is the constant they read, in another dtype at most


def stored_nbytes(elem_type: int, count: int) -> int:
    """Bytes of `count` elements as stored (sub-byte types packed)."""
    if elem_type == onnx.TensorProto.STRING or elem_type == onnx.TensorProto.UNDEFINED:
        return 0  # never a weight; its stored size is not in its dims
    bits = _BITS.get(elem_type) or helper.tensor_dtype_to_np_dtype(elem_type).itemsize * 8
    return (count * bits + 7) // 8


def dtype_of(elem_type: int) -> str:
    """The dtype's name as torch spells it where torch has it, else numpy's."""
    return _DTYPE_NAMES.get(elem_type) or str(helper.tensor_dtype_to_np_dtype(elem_type))


def node_attributes(node: onnx.NodeProto) -> dict:
    """A node's attributes as plain values; graphs and tensors as placeholders."""
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


@dataclass(frozen=True)
class GraphConstant:
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
        return TensorInfo(self.name, self.dims, dtype_of(self.elem_type), self.nbytes)


def _dense(name: str, t: onnx.TensorProto) -> GraphConstant:
    return GraphConstant(name, tuple(t.dims), t.data_type, stored_nbytes(t.data_type, math.prod(t.dims)))


def _sparse(name: str, sp: onnx.SparseTensorProto) -> GraphConstant:
    """The dense shape (what the graph computes with) and the bytes of the stored values; the
    indices are integers."""
    stored = sp.values
    return GraphConstant(name, tuple(sp.dims), stored.data_type,
                         stored_nbytes(stored.data_type, math.prod(stored.dims)))


def _constant_value(node: onnx.NodeProto) -> GraphConstant | None:
    """What a Constant node produces (opset 9 has `value` only; 11 adds sparse_value, 12 the rest)."""
    out, tp = node.output[0], onnx.TensorProto
    for a in node.attribute:
        if a.name == "value":
            return _dense(out, a.t)
        if a.name == "sparse_value":
            return _sparse(out, a.sparse_tensor)
        if a.name == "value_float":
            return GraphConstant(out, (), tp.FLOAT, 4)
        if a.name == "value_floats":
            return GraphConstant(out, (len(a.floats),), tp.FLOAT, 4 * len(a.floats))
        if a.name == "value_int":
            return GraphConstant(out, (), tp.INT64, 8)
        if a.name == "value_ints":
            return GraphConstant(out, (len(a.ints),), tp.INT64, 8 * len(a.ints))
        if a.name in ("value_string", "value_strings"):
            return GraphConstant(out, () if a.name == "value_string" else (len(a.strings),), tp.STRING, 0)
    return None


def subgraphs(node: onnx.NodeProto):
    """The bodies of a control-flow node (If, Loop, Scan)."""
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            yield a.g
        elif a.type == onnx.AttributeProto.GRAPHS:
            yield from a.graphs


class FlatGraph:
    """The model's nodes in execution order (a control-flow node's subgraphs before it), its
    constants by name, and Identity/Cast outputs resolved to the constant they carry."""

    def __init__(self, model: onnx.ModelProto):
        self.consts: dict[str, GraphConstant] = {}
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
            for sub in subgraphs(node):
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

    def const(self, name: str) -> GraphConstant | None:
        return self.consts.get(self.alias.get(name, name)) if name else None

    def weight(self, node: onnx.NodeProto, k: int) -> GraphConstant | None:
        """Input k of a node if it is a floating-point constant."""
        c = self.const(node.input[k]) if len(node.input) > k else None
        return c if c is not None and c.floating else None

