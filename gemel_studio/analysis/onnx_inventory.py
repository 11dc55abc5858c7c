"""Inventory of an ONNX graph: the nodes that hold floating-point constants become layers.

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

The graph's constants are found in onnx_graph.py, the layers with torch twins recognised in
onnx_twins.py, and output shapes inferred in onnx_shapes.py; this module applies the rules
above and builds the records.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import onnx

from .onnx_graph import LARGE_CONSTANT, FlatGraph, stored_nbytes
from .onnx_shapes import infer_shapes, known_shape
from .onnx_twins import generic_signature, recognise_layer
from .records import LayerRecord, ModelInventory, TensorInfo, peak_activation_bytes

__all__ = ["inventory_of_onnx", "onnx_layers"]

_SHAPE_ONLY = ("Shape", "Size")  # read a constant's dims, not its data


@dataclass
class _Record:
    index: int  # the node's place in execution order
    kind: str
    signature: str
    params: list[TensorInfo] = field(default_factory=list)
    buffers: list[TensorInfo] = field(default_factory=list)
    out_node: int = 0
    first_output_only: bool = False


def _labels(g: FlatGraph) -> list[str]:
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


def _wanted(g: FlatGraph) -> set[str]:
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
    g = FlatGraph(model)
    shapes, graph_batch, notes = infer_shapes(model, g, batch, size, _wanted(g))
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
        layer = recognise_layer(index, node, g, shapes)
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
        if held and max(c.nbytes for _, c in held) > LARGE_CONSTANT:
            record = _Record(index, node.op_type, generic_signature(node, held), out_node=index)
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
        known = [shapes[o] for o in names if known_shape(shapes.get(o))]
        act = None
        if names and len(known) == len(names):
            act = sum(stored_nbytes(t, math.prod(d)) for d, t in known) * batch // max(graph_batch, 1)
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


def inventory_of_onnx(model: onnx.ModelProto, name: str, *, architecture: str, task: str,
                      input_size: tuple[int, int, int], batch_size: int, source_kind: str = "onnx",
                      built_on: str = "meta", notes: list[str] | None = None) -> ModelInventory:
    """Inventory of an ONNX graph at the workload's input and batch size; `notes` (the build's)
    come before the inventory's own. The input is taken as float32 for the peak estimate."""
    records, calls, own_notes, param_bytes, buffer_bytes = onnx_layers(model, batch_size, tuple(input_size))
    input_bytes = batch_size * math.prod(input_size) * 4
    return ModelInventory(
        name=name, architecture=architecture, task=task, source_kind=source_kind, input_size=tuple(input_size),
        batch_size=batch_size, layers=records, param_bytes=param_bytes, buffer_bytes=buffer_bytes,
        activation_bytes=peak_activation_bytes(calls, input_bytes), built_on=built_on,
        notes=list(notes or []) + own_notes)
