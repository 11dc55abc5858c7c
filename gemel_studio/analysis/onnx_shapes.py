"""Output shapes of an ONNX graph's nodes at the workload's input size, for activation bytes.

ONNX shape inference runs on a light copy of the graph: large constants (weights) become typed
graph inputs, so none of their data are copied, and the real inputs take the workload's batch
and size where their dims are symbolic. Where inference leaves a layer's output unknown (a
shape computed at run time from other shapes, e.g. Shape -> Gather -> Div -> Cast -> Concat ->
Reshape, which onnx's data propagation does not follow through Div or Cast), a second pass goes
node by node and evaluates such small shape computations with numpy (onnx_shape_eval.py).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .onnx_graph import LARGE_CONSTANT, FlatGraph, GraphConstant, subgraphs
from .onnx_shape_eval import MAX_VALUE, constant_array, evaluate, small_value

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


def _inference_copy(model: onnx.ModelProto, g: FlatGraph, batch: int, size: tuple[int, int, int]):
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

    def keep(c: GraphConstant | None, proto, kept) -> None:
        if c is not None and c.nbytes > LARGE_CONSTANT:
            graph.input.append(helper.make_tensor_value_info(c.name, c.elem_type, list(c.dims)))
        else:
            kept.append(proto)

    for t in src.initializer:
        keep(g.consts[t.name], t, graph.initializer)
    for sp in src.sparse_initializer:
        keep(g.consts[sp.values.name], sp, graph.sparse_initializer)
    for node in src.node:
        keep(g.consts.get(node.output[0]) if node.op_type == "Constant" and node.output else None, node, graph.node)
    for vi in src.output:  # names and types; shapes are what inference is for
        out = graph.output.add()
        out.CopyFrom(vi)
        if out.type.HasField("tensor_type"):
            out.type.tensor_type.ClearField("shape")
    return copy, graph_batch, notes


def known_shape(shape) -> bool:
    """Whether a (dims, elem type) pair has every dim known."""
    return shape is not None and all(d is not None for d in shape[0])


def _shape_of(t: onnx.TypeProto):
    """(dims, elem type) of a tensor type, a dim None where unknown; None without a shape."""
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
        if (v := small_value(t)) is not None:
            values[t.name] = v

    def type_of(name: str):
        if name not in types and known_shape(shapes.get(name)):
            dims, elem = shapes[name]
            types[name] = helper.make_tensor_type_proto(elem, dims)
        return types.get(name)

    def dims_of(name: str):
        t = type_of(name)
        shape = _shape_of(t) if t is not None else None
        return shape[0] if known_shape(shape) else None

    for node in graph.node:
        try:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                outs = [constant_array(node)]
            else:
                with np.errstate(all="ignore"):  # a division by zero is the graph's, not a reason to stop
                    outs = evaluate(node, [values.get(i) if i else None for i in node.input], dims_of)
            if outs is not None and all(o is not None and np.asarray(o).size <= MAX_VALUE for o in outs):
                for name, value in zip(node.output, outs):
                    value = np.asarray(value)
                    values[name] = value
                    types[name] = helper.make_tensor_type_proto(helper.np_dtype_to_tensor_dtype(value.dtype),
                                                                list(value.shape))
                continue
            if all(known_shape(shapes.get(o)) for o in node.output if o):
                continue  # the first pass typed it fully
            if node.op_type == "Constant":  # a value too large to evaluate, or of another form
                schema = onnx.defs.get_schema("Constant", opsets.get("", 1))
                types.update(onnx.shape_inference.infer_node_outputs(schema, node, {}))
                continue
            domain = "" if node.domain == "ai.onnx" else node.domain
            schema = onnx.defs.get_schema(node.op_type, opsets.get(domain, 1), domain)
            if any(True for _ in subgraphs(node)):  # subgraphs see every outer value
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
        if shape is not None and not known_shape(shapes.get(name)):
            shapes[name] = shape


def infer_shapes(model: onnx.ModelProto, g: FlatGraph, batch: int, size: tuple[int, int, int],
                 wanted: set[str]) -> tuple[dict, int, list[str]]:
    """Output name -> (dims, elem type; a dim None where unknown) for the main graph's values,
    the graph's batch and notes. `wanted`: the outputs the layers need."""
    light, graph_batch, notes = _inference_copy(model, g, batch, size)
    shapes: dict = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(light, data_prop=True)
        for vi in [*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input]:
            if (shape := _shape_of(vi.type)) is not None:
                shapes.setdefault(vi.name, shape)
    except Exception as exc:  # inference is best effort; the node-by-node pass may still type most of it
        first = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        notes.append(f"ONNX shape inference failed ({first}); shapes come from a node-by-node pass")
    if any(not known_shape(shapes.get(name)) for name in wanted):
        _node_by_node(light, shapes)
    return shapes, graph_batch, notes

