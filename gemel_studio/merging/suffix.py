"""Re-running only the part of a model that a tie changes, for the merge risk's drops.

A group's drop (merging/risk.py) ties its layers, re-estimates the batch-norm statistics and
evaluates every member: a whole forward pass of each member over the statistics batches and
the held-out samples, group after group. Everything a model computes before the first tied
layer is the same as in the untied reference, and so are the statistics of the batch-norm
layers there (re-estimated from the same batches, on the same inputs). `SuffixRunner` traces
the model with torch.fx, records during the reference passes the activations that cross each
cut (the nodes before a tied layer that nodes after it read), and afterwards runs only the
nodes from the cut on, re-estimating only the batch-norm layers after it. The result is the
full pass's, bit for bit (a test compares the drops both ways): the same modules on the same
tensors in the same batches.

A model that cannot be traced (detectors' data-dependent control flow), that calls a
batch-norm layer twice, or whose recorded activations would pass `max_bytes` gets no runner, and the caller
runs it whole as before.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import fx

from .initialise import _BN


class NotSplittable(Exception):
    """The model cannot be run from a cut: run it whole."""


def _touches(node: fx.Node, layer: str) -> bool:
    """Whether `node` runs or reads `layer` (a module name; "" is the model itself): the layer
    itself, a module or tensor inside it, or a module fx keeps whole that holds it (the
    output projection inside nn.MultiheadAttention, which fx calls as one node)."""
    if node.op not in ("call_module", "get_attr"):
        return False
    target = str(node.target)
    return layer == "" or target == layer or target.startswith(layer + ".") or layer.startswith(target + ".")


def _in_place(gm: fx.GraphModule, node: fx.Node) -> bool:
    """Whether `node` may write into one of its inputs."""
    if node.op == "call_module":
        return bool(getattr(gm.get_submodule(str(node.target)), "inplace", False))
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return (bool(node.kwargs.get("inplace")) or name in {"iadd", "isub", "imul", "itruediv", "iand", "ior"}
                or (name.endswith("_") and not name.endswith("__")))
    return False


class SuffixRunner:
    """One classifier, traced, with its activations at the cuts before `blocks`' layers (each
    block: the layers tied together in one measurement) recorded by `record` passes and
    replayed by `run_from` passes, batch by batch in the same order."""

    def __init__(self, model: torch.nn.Module, blocks: Iterable[Sequence[str]], max_bytes: int = 512 << 20):
        try:
            gm = fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure means: run it whole
            raise NotSplittable(f"not traceable ({type(exc).__name__})") from None
        self.max_bytes = max_bytes
        self.nodes = list(gm.graph.nodes)
        index = {n: i for i, n in enumerate(self.nodes)}
        self.bn_at = {}  # batch-norm module -> the index of its call
        for n in self.nodes:
            if n.op == "call_module" and isinstance(gm.get_submodule(str(n.target)), _BN):
                bn = gm.get_submodule(str(n.target))
                if bn in self.bn_at:  # its statistics would mix calls before and after a cut
                    raise NotSplittable(f"batch-norm layer {n.target} is called more than once")
                self.bn_at[bn] = index[n]
        self.cut_of: dict[tuple[str, ...], int] = {}
        for layers in blocks:
            key = tuple(sorted(layers))
            hits = [index[n] for n in self.nodes if any(_touches(n, layer) for layer in key)]
            if not hits:
                raise NotSplittable(f"no node runs {', '.join(key)}")
            self.cut_of[key] = min(hits)
        self.frontier: dict[int, list[fx.Node]] = {}
        for cut in set(self.cut_of.values()):
            self.frontier[cut] = [n for n in self.nodes[:cut] if any(index[u] >= cut for u in n.users)]
        kept = sorted({n for f in self.frontier.values() for n in f}, key=index.__getitem__)
        # Values a later node may write in place (an in-place ReLU, x.mul_()): recorded as a copy
        # made as soon as they are computed, and handed to each run as a copy, so that the
        # recording stays what the reference computed.
        written = {n for n in kept if any(_in_place(gm, u) for u in n.users)}
        self.recorder = self._recorder(gm, kept, written)
        self.kept_at = {n: i for i, n in enumerate(kept)}
        self.suffixes = {cut: self._suffix(gm, cut, f) for cut, f in self.frontier.items()}
        self.copied = {cut: {i for i, n in enumerate(f) if n in written} for cut, f in self.frontier.items()}
        self.recorded: list[tuple] = []  # per recorded batch, the kept nodes' values
        self.bytes = 0

    @staticmethod
    def _recorder(gm: fx.GraphModule, kept: list[fx.Node], written: set[fx.Node]) -> fx.GraphModule:
        """The whole graph, returning the kept nodes' values beside its output (a copy of each
        `written` one, taken when it is computed)."""
        graph = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        copies: dict[fx.Node, fx.Node] = {}
        for n in gm.graph.nodes:
            if n.op == "output":
                out = fx.node.map_arg(n.args[0], env.__getitem__)
                graph.output((out, tuple(copies.get(k, env[k]) for k in kept)))
            else:
                env[n] = graph.node_copy(n, env.__getitem__)
                if n in written:
                    copies[n] = graph.call_method("clone", (env[n],))
        return fx.GraphModule(gm, graph)

    @staticmethod
    def _suffix(gm: fx.GraphModule, cut: int, frontier: list[fx.Node]) -> fx.GraphModule:
        """The nodes from `cut` on, taking the frontier's values as its inputs."""
        graph = fx.Graph()
        env = {n: graph.placeholder(f"cut_{i}") for i, n in enumerate(frontier)}
        for n in list(gm.graph.nodes)[cut:]:
            env[n] = graph.node_copy(n, env.__getitem__)
        return fx.GraphModule(gm, graph)

    def clear(self) -> None:
        self.recorded, self.bytes = [], 0

    def record(self, x: torch.Tensor) -> torch.Tensor:
        """A whole pass over `x` that keeps the cuts' activations; returns the output. Raises
        NotSplittable once the kept values pass `max_bytes` (they are let go)."""
        out, kept = self.recorder(x)
        self.bytes += sum(v.numel() * v.element_size() for v in kept if isinstance(v, torch.Tensor))
        if self.bytes > self.max_bytes:
            self.clear()
            raise NotSplittable(f"recorded activations pass {self.max_bytes >> 20} MiB")
        self.recorded.append(tuple(kept))
        return out

    def run_from(self, layers: Sequence[str], batch: int) -> torch.Tensor:
        """The output for recorded batch `batch` (in recording order) when only the nodes from the
        cut before `layers` run."""
        cut = self.cut_of[tuple(sorted(layers))]
        values = [self.recorded[batch][self.kept_at[n]] for n in self.frontier[cut]]
        values = [v.clone() if i in self.copied[cut] else v for i, v in enumerate(values)]
        return self.suffixes[cut](*values)

    def batchnorms_after(self, layers: Sequence[str]) -> list[torch.nn.Module]:
        """The batch-norm layers the cut before `layers` leaves to run (their statistics are the
        only ones a tie there can change)."""
        cut = self.cut_of[tuple(sorted(layers))]
        return [bn for bn, at in self.bn_at.items() if at >= cut and bn.track_running_stats]


__all__ = ["NotSplittable", "SuffixRunner"]
