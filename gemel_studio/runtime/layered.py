"""Layer-by-layer loading (MemA's overlap): the first layers of a model run while the weights
of later ones are still being copied to the device.

`LayerPlan` says, per module, which tensors it needs before its forward starts and the order
to load them in; `PendingLoad` copies a model's missing tensors in that order on one of the
process's loader threads; `run_layered` runs the model with a forward pre-hook per module that
waits for its own tensors. A model the plan cannot trace (data-dependent detectors) loads whole.
"""

from __future__ import annotations

import contextlib
import threading
import time
from concurrent import futures
from typing import Hashable

import torch
from torch.func import functional_call
from torch.nn.utils._named_member_accessor import set_tensor

from ..errors import GemelError
from .options import LOADS

_LOADER: futures.ThreadPoolExecutor | None = None
_LOADER_LOCK = threading.Lock()


def _loader() -> futures.ThreadPoolExecutor:
    """The process's loader threads, made on first use and kept, instead of a thread made and
    ended per copy several times a second. (That churn was suspected of the soak's step in
    resident memory; the step stayed with kept threads, so it has another cause.) Two: a
    prefetch may still be finishing while the next load starts."""
    global _LOADER
    with _LOADER_LOCK:
        if _LOADER is None:
            _LOADER = futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix="gemel-load")
        return _LOADER


class PendingLoad:
    """Tensors of one model being copied to the device on a loader thread, in the order the
    model uses them (MemA's overlap: the first layers run while later ones load). `get(unit)`
    blocks until that unit is there; the scheduler's `finish()` files the copies as resident."""

    def __init__(self, name: str, units: list[Hashable], sources: list[torch.Tensor], device: torch.device,
                 need: int, stream=None):
        self.name = name
        self.units = units
        self.need = need  # bytes
        self.finished = False  # set by the scheduler's finish()
        self._stream = stream  # CUDA: the scheduler's one copy stream (one allocator pool, reused)
        self.device = device
        self.tensors: dict[Hashable, torch.Tensor] = {}
        self.error: BaseException | None = None
        self.wait_seconds = 0.0
        self.load_seconds = 0.0
        self._ready = {u: threading.Event() for u in units}
        self._cancel = threading.Event()
        self._done = _loader().submit(self._load, sources)

    def _load(self, sources: list[torch.Tensor]) -> None:
        start = time.perf_counter()
        stream = self._stream
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for u, src in zip(self.units, sources):
                    if self._cancel.is_set():  # between tensors: what was copied is let go
                        raise GemelError(f"the load of '{self.name}' was cancelled")
                    self.tensors[u] = src.to(self.device, copy=True, non_blocking=stream is not None)
                    if stream is not None:
                        stream.synchronize()  # this thread waits, not the compute stream
                    self._ready[u].set()
        except BaseException as exc:  # the consumer re-raises it
            self.error = exc
        finally:
            self.load_seconds = time.perf_counter() - start
            for event in self._ready.values():
                event.set()

    def get(self, unit: Hashable) -> torch.Tensor:
        event = self._ready[unit]
        if not event.is_set():
            start = time.perf_counter()
            event.wait()
            self.wait_seconds += time.perf_counter() - start
        if self.error is not None:
            raise GemelError(f"loading model '{self.name}' failed: {self.error}")
        t = self.tensors[unit]
        if t.device.type == "cuda":  # made on the loader's stream, used on the compute stream
            t.record_stream(torch.cuda.current_stream(t.device))
        return t

    def remaining(self) -> list[Hashable]:
        """The units not copied yet (all of them when the copy failed: then nothing of it is
        filed, and they load as usual)."""
        left = [u for u in self.units if not self._ready[u].is_set()]
        # Read after the events: a failed copy sets its error before it sets every event.
        return list(self.units) if self.error is not None else left

    def cancel(self) -> None:
        """Stop after the tensor being copied now; the load then ends with an error (nothing of
        it is to be filed as resident)."""
        self._cancel.set()

    def join(self) -> None:
        if not self._done.done():
            start = time.perf_counter()
            futures.wait([self._done])
            self.wait_seconds += time.perf_counter() - start


class LayerPlan:
    """How one model runs while its weights load layer by layer: which tensors each module
    must have before its forward starts, and the order to load them in (the order the modules
    first run). Found by running the model once on the meta device (no memory, no data); a
    model that cannot run there (data-dependent detectors) gets no plan and loads whole.

    A module waits for its own tensors and for those of descendants whose forward never runs
    (MultiheadAttention reads `out_proj.weight` directly); tensors no running module claims
    are waited for by the whole model, first."""

    def __init__(self, model: torch.nn.Module, input_size: tuple[int, int, int], state_keys: list[str]):
        modules = dict(model.named_modules())
        called: list[str] = []
        seen: set[str] = set()
        names = {id(m): n for n, m in modules.items()}

        def record(mod, args):
            n = names[id(mod)]
            if n not in seen:
                seen.add(n)
                called.append(n)

        hooks = [m.register_forward_pre_hook(record) for m in modules.values()]
        try:
            meta = {k: torch.empty_like(v, device="meta") for k, v in model.state_dict().items()}
            with torch.inference_mode():
                functional_call(model, meta, (torch.empty(1, *input_size, device="meta"),), strict=False)
        finally:
            for h in hooks:
                h.remove()
        self.waits: dict[str, list[tuple[str, str]]] = {n: [] for n in called}  # module -> (attr, state key)
        known = set(state_keys)
        for n, mod in modules.items():
            owner = n
            while owner not in seen and owner:  # the nearest ancestor that runs
                owner = owner.rpartition(".")[0]
            if owner not in seen:
                owner = ""
            for attr in list(mod._parameters) + list(mod._buffers):
                key = f"{n}.{attr}" if n else attr
                if key in known:  # (path from the owner, state key)
                    self.waits.setdefault(owner, []).append((key[len(owner) + 1:] if owner else key, key))
        self.order = [key for n in called for _, key in self.waits.get(n, [])]
        planned = set(self.order)
        self.order += [k for k in state_keys if k not in planned]


def plan_layers(bundle, names: list[str]) -> tuple[dict[str, LayerPlan], dict[str, str]]:
    """A layer plan per named model of the bundle, and for each model that gets none the
    reason it loads whole."""
    plans, notes = {}, {}
    for m in names:
        spec = bundle.manifest.model(m)
        try:
            plans[m] = LayerPlan(bundle.models[m], tuple(spec.input_size), list(spec.tensors))
        except Exception as exc:  # noqa: BLE001 (any failure on meta: load this model whole)
            notes[m] = f"loads whole: cannot trace its layers on the meta device ({exc})"
    return plans, notes


def run_layered(scheduler, name: str, model: torch.nn.Module, plan: LayerPlan, stored_keys: dict[str, str],
                stored: dict[str, torch.Tensor], state: dict, pending: PendingLoad, x: torch.Tensor):
    """Run model `name` while its missing tensors load: each module's pre-hook waits for its
    own tensors, which stand as placeholders on the meta device until then. Some kernels
    (convolution, linear) compute garbage from a meta weight instead of failing, so after
    the forward every placeholder must have been replaced; otherwise it raises and the
    caller runs the model whole. `stored_keys`: the model's state-dict key -> stored key;
    `stored`: the bundle's stored tensors (for the placeholders' shapes)."""
    placeholders: dict[str, torch.Tensor] = {}  # one per stored tensor: tied weights stay tied
    full = {}
    for k, t in state.items():
        if t is None:
            if stored_keys[k] not in placeholders:
                placeholders[stored_keys[k]] = torch.empty_like(stored[stored_keys[k]], device="meta")
            t = placeholders[stored_keys[k]]
        full[k] = t
    missing = {k for k, t in state.items() if t is None}
    replaced: set[str] = set()
    modules = dict(model.named_modules())
    hooks = []

    def waiter(entries):
        def pre(mod, args):
            for attr, key in entries:
                if key in missing:
                    target, _, attr_name = attr.rpartition(".")
                    set_tensor(mod.get_submodule(target) if target else mod, attr_name,
                               pending.get(scheduler.unit_of(name, key)))
                    replaced.add(key)
        return pre

    for n, entries in plan.waits.items():
        if any(key in missing for _, key in entries):
            hooks.append(modules[n].register_forward_pre_hook(waiter(entries)))
    try:
        with torch.inference_mode():
            out = functional_call(model, full, (x,), strict=False)
    finally:
        for h in hooks:
            h.remove()
    if replaced != missing:
        raise GemelError(f"{len(missing - replaced)} tensor(s) were not loaded before use, e.g. "
                         f"{sorted(missing - replaced)[0]}")
    scheduler.finish(pending)
    return out


__all__ = ["LOADS", "LayerPlan", "PendingLoad", "plan_layers", "run_layered"]
