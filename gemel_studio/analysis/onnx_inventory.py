"""Layer records from an ONNX graph: nodes that consume initializers (weights) become layers.

Conv, Gemm (as Linear) and BatchNormalization get the same signatures as their torch
twins, so an ONNX model can share layers with a torchvision one. Activation bytes come from
ONNX shape inference with the graph's inputs fixed to the workload's input size.
"""

from __future__ import annotations

import math

import onnx
from onnx import helper

from .inventory import LayerRecord, TensorInfo
from .signature import batchnorm_signature, conv_signature, linear_signature

_KINDS = {"Conv": "Conv", "ConvTranspose": "ConvTranspose", "Gemm": "Linear", "MatMul": "MatMul",
          "BatchNormalization": "BatchNorm"}


def _types(*names: str) -> dict[int, str]:
    """TensorProto type id -> name, for the names this onnx version knows."""
    return {getattr(onnx.TensorProto, n): n for n in names if hasattr(onnx.TensorProto, n)}


# Weights are floating-point initializers, recognised by their TensorProto type (numpy has no
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


def _nbytes(elem_type: int, count: int) -> int:
    bits = _BITS.get(elem_type) or helper.tensor_dtype_to_np_dtype(elem_type).itemsize * 8
    return (count * bits + 7) // 8


def _dtype(elem_type: int) -> str:
    return _DTYPE_NAMES.get(elem_type) or str(helper.tensor_dtype_to_np_dtype(elem_type))


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _fix_inputs(model: onnx.ModelProto, batch: int, size: tuple[int, int, int]) -> tuple[onnx.ModelProto, int]:
    """A copy whose symbolic input dimensions are set to the workload's batch and size, and
    the batch the graph is then run at (an exported graph may have a fixed batch of its own)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    init_names = {i.name for i in model.graph.initializer}
    graph_batch = batch
    for inp in model.graph.input:
        if inp.name in init_names:
            continue
        dims = inp.type.tensor_type.shape.dim
        wanted = [batch, *size]
        if len(dims) == len(wanted):
            for i, (d, w) in enumerate(zip(dims, wanted)):
                if not d.HasField("dim_value"):
                    d.dim_value = w
                elif i == 0:
                    graph_batch = d.dim_value
    return model, graph_batch


def _shapes(model: onnx.ModelProto, batch: int, size) -> tuple[dict[str, tuple[list[int], int]], int]:
    fixed, graph_batch = _fix_inputs(model, batch, size)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed)
    except Exception:  # inference is best effort: without it, activations are unknown
        return {}, graph_batch
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if dims and all(d is not None for d in dims):
            out[vi.name] = (dims, t.elem_type)
    return out, graph_batch


def _signature(node: onnx.NodeProto, weights: list[onnx.TensorProto], shapes: dict) -> tuple[str, str]:
    a = _attrs(node)
    w = weights[0]
    dtype = _dtype(w.data_type)
    dims = list(w.dims)
    has_bias = len(weights) > 1
    if node.op_type in ("Conv", "ConvTranspose") and len(dims) >= 3:
        spatial = len(dims) - 2
        kind = f"{'Conv' if node.op_type == 'Conv' else 'ConvTranspose'}{spatial}d"
        groups = a.get("group", 1)
        if node.op_type == "Conv":
            out_ch, in_ch = dims[0], dims[1] * groups
        else:
            in_ch, out_ch = dims[0], dims[1] * groups
        pads = list(a.get("pads", [0] * 2 * spatial))
        padding = tuple(pads[:spatial]) if pads[:spatial] == pads[spatial:] else tuple(pads)
        auto_pad = a.get("auto_pad", b"NOTSET")
        auto_pad = str(auto_pad, "ascii") if isinstance(auto_pad, bytes) else auto_pad
        if auto_pad != "NOTSET":
            # torch exports padding='same' as SAME_UPPER (extra padding at the end) and 'valid' as VALID.
            padding = _AUTO_PAD.get(auto_pad, auto_pad.lower())
        return kind, conv_signature(kind, in_ch, out_ch, tuple(a.get("kernel_shape", dims[2:])),
                                    tuple(a.get("strides", [1] * spatial)), padding,
                                    tuple(a.get("dilations", [1] * spatial)), groups, has_bias, dtype)
    if node.op_type == "Gemm" and len(dims) == 2 and a.get("transB", 0) == 1 and a.get("transA", 0) == 0 \
            and a.get("alpha", 1.0) == 1.0 and a.get("beta", 1.0) == 1.0:
        return "Linear", linear_signature(dims[1], dims[0], has_bias, dtype)
    if node.op_type == "BatchNormalization":
        rank = len(shapes.get(node.input[0], ([0] * 4, 0))[0])
        kind = {2: "BatchNorm1d", 3: "BatchNorm1d", 4: "BatchNorm2d", 5: "BatchNorm3d"}.get(rank, "BatchNorm2d")
        return kind, batchnorm_signature(kind, dims[0], a.get("epsilon", 1e-5), True, dtype)
    shapes_s = ";".join(f"{i}:({','.join(map(str, t.dims))})" for i, t in enumerate(weights))
    attrs = ",".join(f"{k}={v}" for k, v in sorted(a.items()))
    return node.op_type, f"{node.op_type}({attrs}|{shapes_s},{dtype})"


def onnx_layers(model: onnx.ModelProto, batch: int, size: tuple[int, int, int]):
    """Records in graph order, per-node output bytes, notes, and parameter/buffer totals."""
    inits = {t.name: t for t in model.graph.initializer if t.data_type in _WEIGHT_TYPES}
    shapes, graph_batch = _shapes(model, batch, size)
    notes = [] if shapes else ["ONNX shape inference failed: activation bytes are not measured"]
    if graph_batch != batch and graph_batch > 0:
        notes.append(f"the graph's batch is fixed at {graph_batch}; activations are scaled to batch {batch}")
    used: set[str] = set()
    records: list[LayerRecord] = []
    calls: list[int] = []
    param_bytes = buffer_bytes = 0
    for index, node in enumerate(model.graph.node):
        weights = [inits[i] for i in node.input if i in inits and i not in used]
        out_bytes = None
        known = [shapes[o] for o in node.output if o in shapes]
        if known and len(known) == len(node.output):
            out_bytes = sum(_nbytes(t, math.prod(d)) for d, t in known) * batch // max(graph_batch, 1)
            calls.append(out_bytes)
        if not weights:
            continue
        used.update(t.name for t in weights)
        kind, signature = _signature(node, weights, shapes)
        infos = [TensorInfo(t.name, tuple(t.dims), _dtype(t.data_type), _nbytes(t.data_type, math.prod(t.dims)))
                 for t in weights]
        if node.op_type == "BatchNormalization":  # inputs: X, scale, B, mean, var
            stats = set(node.input[3:5])
            params = tuple(t for t in infos if t.name not in stats)
            buffers = tuple(t for t in infos if t.name in stats)
        else:
            params, buffers = tuple(infos), ()
        pb, bb = sum(t.nbytes for t in params), sum(t.nbytes for t in buffers)
        param_bytes += pb
        buffer_bytes += bb
        records.append(LayerRecord(name=node.name or f"{node.op_type}_{index}", kind=kind, signature=signature,
                                   param_bytes=pb, buffer_bytes=bb, activation_bytes=out_bytes, trainable=True,
                                   executed=out_bytes is not None, params=params, buffers=buffers))
    # Initializers no node consumes directly (e.g. behind a Constant or If) still cost memory.
    for name, t in inits.items():
        if name not in used:
            param_bytes += _nbytes(t.data_type, math.prod(t.dims))
    return records, calls, notes, param_bytes, buffer_bytes
