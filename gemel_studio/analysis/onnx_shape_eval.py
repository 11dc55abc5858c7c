"""Small shape computations of an ONNX graph, evaluated with numpy.

Graphs compute some shapes at run time (Shape -> Gather -> Div -> Cast -> Concat -> Reshape);
evaluating those few-element values lets the node-by-node shape pass (onnx_shapes.py) type the
nodes that use them. Only values of at most MAX_VALUE elements are evaluated.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_graph import node_attributes

MAX_VALUE = 1024  # elements: the shape computations the second pass evaluates are small


def small_value(t: onnx.TensorProto):
    """A small tensor's value held in the file, or None (large, external, string or not numpy's)."""
    if t.data_location == onnx.TensorProto.EXTERNAL or math.prod(t.dims) > MAX_VALUE \
            or t.data_type == onnx.TensorProto.STRING:
        return None
    try:
        return numpy_helper.to_array(t)
    except Exception:  # a dtype numpy cannot hold: not a shape computation
        return None


def constant_array(node: onnx.NodeProto):
    """A Constant node's small value, or None."""
    for a in node.attribute:
        if a.name == "value":
            return small_value(a.t)
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


def evaluate(node: onnx.NodeProto, vals: list, dims_of) -> list | None:
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
        a = node_attributes(node)
        return [np.array(dims[a.get("start", 0):a.get("end")], np.int64)]
    if not vals or any(v is None for v, name in zip(vals, node.input) if name):
        return None
    a, x = node_attributes(node), vals
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
        if math.ceil((x[1] - x[0]) / x[2]) > MAX_VALUE:
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
        if math.prod(shape) > MAX_VALUE:
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

