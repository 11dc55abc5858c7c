"""Which model weights are resident on the device, under a memory budget, and at what cost.

The stored weights (the bundle's tensors, each shared tensor once) are the source; the
resident copy is what inference reads. Loading a tensor copies it from the stored weights to
the device (`.to(device)` on a GPU; on a CPU-only box a fresh copy, which costs real time and
memory), and evicting it drops the copy. Policies:

- `merged`: a tensor shared by several models is resident once; a model loads only the tensors
  not resident yet, and eviction drops tensors the running model does not need (per tensor).
- `time-sharing`: the usual baseline: whole models are swapped in and out (per model), each
  with its own copy of every tensor, shared or not.
- `space-sharing`: a static set of models that fits (each with its own copies), chosen to
  serve the most frames per second (`demand`: each stream's rate and models; see
  `choose_static_set`); frames for the other models are dropped.
- `unlimited`: every tensor resident once, budget ignored: the bound.

Eviction (`eviction`): `belady` (default) evicts what is needed furthest in the future, from
the `future` the caller passes to `acquire` (the models its queued frames need next, in the
order it expects to run them); among what the future does not name, the most recently used
goes first (MRU: under round robin, the model just used is the one needed last). `lru` evicts
the least recently used, the classic choice, kept for comparison: under round robin it evicts
exactly the model needed next.

Prefetch (`prefetch`): while one model runs, what the model expected next lacks is copied on
a loader thread (on CUDA, on a copy stream), so its load overlaps the run (GEMEL's evaluation:
"loading overlaps the previous model's run when memory allows"). Its bytes count as resident
from the start (against the budget), and it only evicts what neither model needs: when that
does not make room, no prefetch. Until its copy is done, what is left of it still counts as
missing in `missing_bytes` (the planner's load estimate): the model that runs next waits for
it. A prefetch for a model that then does not run next is finished (its copies filed as
resident, evictable like any other) before anything else loads when the model that runs
instead shares tensors with it; otherwise it is cancelled between tensors and its bytes freed,
so the merge-aware order counts what it had copied against such a model (`order_bytes`).

Resident bytes never exceed the budget: every load checks it. A model whose own bytes exceed
the budget is refused when the scheduler is made.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Hashable

import torch

from ..errors import GemelError
from .layered import PendingLoad
from .options import EVICTIONS, POLICIES



@dataclass
class ModelResidency:
    """Per model: how often it was loaded (swaps; initial loads count) and what that cost."""

    name: str
    bytes: int  # what the model alone needs resident
    swaps: int = 0
    load_seconds: float = 0.0
    loaded_bytes: int = 0
    runs: int = 0
    refused: int = 0  # requests refused (space-sharing: not in the resident set)
    # Time inference stood still waiting for loads: all of load_seconds for whole loads, only
    # what the overlap did not hide for layer-by-layer loads and prefetches.
    load_wait_seconds: float = 0.0
    prefetched_bytes: int = 0  # of loaded_bytes, those copied ahead while another model ran

    def to_dict(self) -> dict:
        return asdict(self)


class ModelScheduler:
    """Keeps the tensors of the models in use resident within `budget_bytes` on `device`.

    `tensors`: the stored tensors by key; `models`: for each model, its state-dict key -> stored
    key. `acquire(name)` makes the model resident (loading and evicting as the policy says) and
    returns its state dict of resident tensors, or None when the policy refuses the model."""

    def __init__(self, tensors: dict[str, torch.Tensor], models: dict[str, dict[str, str]], policy: str,
                 budget_bytes: int | None, device: str | torch.device = "cpu", eviction: str = "belady",
                 demand: list[tuple[float, list[str]]] | None = None):
        if policy not in POLICIES:
            raise GemelError(f"policy '{policy}': expected one of {', '.join(POLICIES)}")
        if eviction not in EVICTIONS:
            raise GemelError(f"eviction '{eviction}': expected one of {', '.join(EVICTIONS)} (--eviction)")
        self.eviction = eviction
        # Space-sharing's choice: per stream, its frame rate and the models its frames need.
        self.demand = demand if demand is not None else [(1.0, [n]) for n in models]
        if policy != "unlimited" and budget_bytes is None:
            raise GemelError(f"policy '{policy}' needs a memory budget (--memory-budget), or use --policy unlimited")
        if budget_bytes is not None and budget_bytes <= 0:
            raise GemelError(f"memory budget {budget_bytes}: must be a positive number of bytes")
        self.policy = policy
        self.budget = None if policy == "unlimited" else int(budget_bytes)
        self.device = torch.device(device)
        self._stored = tensors
        self._maps = models
        self.shared = policy in ("merged", "unlimited")
        # A unit is what is loaded and evicted: a stored key when tensors are shared, else
        # (model, stored key): each model's own copy.
        self._units: dict[str, list[Hashable]] = {}
        self._unit_bytes: dict[Hashable, int] = {}
        for name, mapping in models.items():
            units = list(dict.fromkeys(mapping.values()))
            for key in units:
                if key not in tensors:
                    raise GemelError(f"model '{name}': tensor '{key}' is not among the stored weights")
            units = units if self.shared else [(name, k) for k in units]
            self._units[name] = units
            for u in units:
                self._unit_bytes[u] = tensors[u if self.shared else u[1]].nbytes
        self.stats = {n: ModelResidency(n, sum(self._unit_bytes[u] for u in us)) for n, us in self._units.items()}
        if self.budget is not None:
            too_big = [s for s in self.stats.values() if s.bytes > self.budget]
            if too_big:
                worst = max(too_big, key=lambda s: s.bytes)
                need = f"{worst.bytes / 2**20:.1f} MiB ({worst.bytes} bytes)"
                raise GemelError(f"model '{worst.name}' needs {need} resident, more than the memory budget of "
                                 f"{self.budget / 2**20:.1f} MiB; raise the memory budget to at least {need} "
                                 "(--memory-budget)")
        self._resident: OrderedDict[Hashable, torch.Tensor] = OrderedDict()  # least recently used first
        self._models_lru: OrderedDict[str, None] = OrderedDict()  # time-sharing: resident models, LRU first
        self.resident_bytes = 0
        self.peak_resident_bytes = 0
        self.static_set: list[str] | None = None
        # Called with each model one of whose tensors was evicted: whoever holds views of them
        # (onnxruntime sessions) must let them go. (A load needs no call: nothing can hold a
        # view of a tensor that was not resident.)
        self.on_evict: list = []
        self._load_stream = None  # CUDA, layer-by-layer loads and prefetches: made on first use, then reused
        self._prefetch: PendingLoad | None = None  # at most one at a time
        self.prefetches = 0  # started
        self.prefetch_misses = 0  # started for a model that did not run next
        self._users: dict[Hashable, list[str]] = {}
        for name, us in self._units.items():
            for u in us:
                self._users.setdefault(u, []).append(name)
        self._prepare()

    # --- policy ------------------------------------------------------------------------------

    def _prepare(self) -> None:
        if self.policy == "unlimited":
            for name in self._units:
                self._load(name)
        elif self.policy == "space-sharing":
            self.static_set = []
            for name in self.choose_static_set(self.budget):
                self._load(name)
                self.static_set.append(name)

    def choose_static_set(self, budget: int) -> list[str]:
        """Space-sharing's resident set: the models that serve the most frames per second
        within `budget` (a stream's frames are served when all its models are in the set).
        Every subset when there are at most 12 models; else the best of greedy choices (the
        stream with the most frames per second per byte it still needs, or the most frames
        per second) and the naming order. Ties go to the set found first."""
        names = list(self._units)
        demand = [(fps, set(ms) & set(names)) for fps, ms in self.demand]
        demand = [(fps, ms) for fps, ms in demand if ms]

        def served(chosen) -> float:
            return sum(fps for fps, ms in demand if ms <= chosen)

        def size(chosen) -> int:
            return sum(self.stats[m].bytes for m in chosen)

        def greedy(score) -> list[str]:
            chosen: list[str] = []
            left = list(demand)
            while left:
                best = None
                for i, (fps, ms) in enumerate(left):
                    extra = size(ms - set(chosen))
                    if size(chosen) + extra <= budget and (best is None or score(fps, extra) > best[0]):
                        best = (score(fps, extra), i)
                if best is None:
                    break
                picked = left.pop(best[1])[1]
                chosen.extend(m for m in names if m in picked and m not in chosen)
            return chosen

        naming: list[str] = []
        for m in names:  # in the order named, each if it still fits
            if size(naming) + self.stats[m].bytes <= budget:
                naming.append(m)
        options = [greedy(lambda fps, extra: fps / extra if extra else float("inf")),
                   greedy(lambda fps, extra: (fps, -extra)), naming]
        if len(names) <= 12:
            for mask in range(1, 1 << len(names)):
                subset = [m for i, m in enumerate(names) if mask >> i & 1]
                if size(subset) <= budget:
                    options.append(subset)
        return max(options, key=lambda c: (served(set(c)), -size(c)))

    def acquire(self, name: str, future: list[str] | None = None) -> dict[str, torch.Tensor] | None:
        """The resident state dict of model `name`, loading what it lacks; None when the policy
        refuses it (space-sharing: not in the static set). `future`: the models expected to
        run next, soonest first (Belady eviction reads it)."""
        stats = self.stats[name]
        if self.policy == "space-sharing" and name not in self.static_set:
            stats.refused += 1
            return None
        self.settle_prefetch(name)
        units = self._units[name]
        missing = [u for u in units if u not in self._resident]
        if missing:
            self._make_room(name, missing, future)
            self._load(name, missing)
        for u in units:
            self._resident.move_to_end(u)
        if name in self._models_lru:
            self._models_lru.move_to_end(name)
        stats.runs += 1
        mapping = self._maps[name]
        return {k: self._resident[s if self.shared else (name, s)] for k, s in mapping.items()}

    def acquire_deferred(self, name: str, order: list[str] | None = None, future: list[str] | None = None
                         ) -> tuple[dict[str, torch.Tensor | None] | None, PendingLoad | None]:
        """Like `acquire`, but what the model lacks is copied on a loader thread, in the order
        of `order` (state-dict keys in the order the model uses them), while the caller runs.
        Returns the state dict (None where a tensor is still loading; `pending.get(unit)` for
        it, `unit_of(name, key)` names it) and the pending load, or (None, None) when refused.
        The bytes are counted as resident, and evictions done, before the copy starts; the
        caller must call `finish(pending)` when done, also after an error."""
        stats = self.stats[name]
        if self.policy == "space-sharing" and name not in self.static_set:
            stats.refused += 1
            return None, None
        self.settle_prefetch(name)
        units = self._units[name]
        missing = [u for u in units if u not in self._resident]
        if not missing:
            return self.acquire(name, future), None
        if order is not None:
            rank = {}
            for key in order:
                u = self.unit_of(name, key)
                rank.setdefault(u, len(rank))
            missing.sort(key=lambda u: rank.get(u, len(rank)))
        pending = self._start_copy(name, missing, self._make_room(name, missing, future))
        state = {k: self._resident.get(self.unit_of(name, k)) for k in self._maps[name]}
        return state, pending

    def _start_copy(self, name: str, missing: list[Hashable], need: int, doing: str = "loading") -> PendingLoad:
        """Count `missing` (`need` bytes, room already made for them) as resident and start
        copying it on the loader thread (on CUDA, on the one copy stream, made on first use).
        `doing`: what the budget's assertion calls it."""
        assert self.budget is None or self.resident_bytes + need <= self.budget, (
            f"{self.policy}: {doing} {name} would hold {self.resident_bytes + need} bytes, over the budget")
        self.resident_bytes += need
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
        if self.device.type == "cuda" and self._load_stream is None:
            self._load_stream = torch.cuda.Stream(self.device)
        return PendingLoad(name, missing, [self._stored[u if self.shared else u[1]] for u in missing],
                           self.device, need, self._load_stream)

    def finish(self, pending: PendingLoad) -> None:
        """File a deferred load's tensors as resident and count what it cost (once; a second
        call does nothing)."""
        if pending.finished:
            return
        if not self._file(pending):
            raise GemelError(f"loading model '{pending.name}' failed: {pending.error}")
        self.stats[pending.name].runs += 1

    def _file(self, pending: PendingLoad) -> bool:
        """Join a pending load and file its tensors as resident, counting its cost; False (and
        nothing of it resident) when its copy failed."""
        pending.finished = True
        pending.join()
        stats = self.stats[pending.name]
        if pending.error is not None:  # nothing of it is resident
            self.resident_bytes -= pending.need
            return False
        for u in pending.units:
            self._resident[u] = pending.tensors[u]
        for u in self._units[pending.name]:
            if u in self._resident:
                self._resident.move_to_end(u)
        stats.load_seconds += pending.load_seconds
        stats.load_wait_seconds += pending.wait_seconds
        stats.loaded_bytes += pending.need
        stats.swaps += 1
        if not self.shared:
            self._models_lru[pending.name] = None
            self._models_lru.move_to_end(pending.name)
        return True

    # --- prefetch ----------------------------------------------------------------------------

    def prefetch(self, name: str, running: str, future: list[str] | None = None) -> bool:
        """Start copying what model `name` lacks on the loader thread while model `running`
        (resident) runs; True when a copy started. Its bytes count as resident now; it evicts,
        as the policy says, only what neither model needs, and starts nothing when that does
        not make room (nor under unlimited and space-sharing, whose sets are loaded at start,
        nor while another prefetch is pending)."""
        if self.policy not in ("merged", "time-sharing") or self._prefetch is not None or name == running:
            return False
        units = self._units[name]
        missing = [u for u in units if u not in self._resident]
        if not missing:
            return False
        need = sum(self._unit_bytes[u] for u in missing)
        if self.policy == "merged":
            keep = set(units) | set(self._units[running])
            room = sum(self._unit_bytes[u] for u in self._resident if u not in keep)
        else:
            keep = {name, running}
            room = sum(self.stats[m].bytes for m in self._models_lru if m not in keep)
        if self.resident_bytes + need > self.budget + room:  # room only by evicting what runs now
            return False
        if self.policy == "merged":
            self._evict_tensors(keep=keep, need=need, future=future)
        else:
            self._evict_models(keep=keep, need=need, future=future)
        self._prefetch = self._start_copy(name, missing, need, "prefetching")
        self.stats[name].prefetched_bytes += need
        self.prefetches += 1
        return True

    def settle_prefetch(self, name: str | None = None) -> None:
        """Finish the pending prefetch, if any: its tensors become resident (waiting for the
        copy; the wait counts as the load wait). `name`: the model about to run. A prefetch for
        another model is a miss: cancelled (what was copied is let go, its bytes freed) unless
        `name` shares tensors with it, which are then filed and used. A failed copy leaves
        nothing resident: the model loads as usual when it runs."""
        pending, self._prefetch = self._prefetch, None
        if pending is None:
            return
        if name != pending.name:
            self.prefetch_misses += name is not None  # (the run ending is no miss)
            if name is None or not set(pending.units) & set(self._units[name]):
                pending.cancel()
                pending.finished = True
                pending.join()
                self.resident_bytes -= pending.need
                self.stats[pending.name].prefetched_bytes -= pending.need
                return
        if not self._file(pending):  # the copy failed: nothing of it was copied ahead after all
            self.stats[pending.name].prefetched_bytes -= pending.need
        elif self.device.type == "cuda":
            current = torch.cuda.current_stream(self.device)
            for u in pending.units:  # made on the copy stream, read on the compute stream
                pending.tensors[u].record_stream(current)

    def resident_state(self, name: str) -> dict[str, torch.Tensor]:
        """The state dict of a model whose tensors are all resident (no loading, no counting)."""
        return {k: self._resident[self.unit_of(name, k)] for k in self._maps[name]}

    def release(self) -> None:
        """Drop every resident tensor (the run is over); the counters stay."""
        self.settle_prefetch()
        for u in list(self._resident):
            self._drop(u)
        self._models_lru.clear()

    def unit_of(self, name: str, key: str) -> Hashable:
        stored = self._maps[name][key]
        return stored if self.shared else (name, stored)

    def _make_room(self, name: str, missing: list[Hashable], future: list[str] | None = None) -> int:
        """Evict, as the policy says, until `missing` fits; returns its bytes."""
        need = sum(self._unit_bytes[u] for u in missing)
        if self.policy == "time-sharing":
            self._evict_models(keep=name, need=need, future=future)
        elif self.policy == "merged":
            self._evict_tensors(keep=set(self._units[name]), need=need, future=future)
        return need

    def _next_use(self, future: list[str] | None) -> dict[str, int]:
        """Model -> position of its first use in `future`."""
        out: dict[str, int] = {}
        for i, m in enumerate(future or ()):
            out.setdefault(m, i)
        return out

    def _victims(self, candidates: list, uses, future: list[str] | None) -> list:
        """`candidates` (least recently used first) in the order to evict them. LRU: as they
        are. Belady: needed furthest in the future first; never needed, most recent first."""
        if self.eviction == "lru":
            return candidates
        nxt = self._next_use(future)
        never = len(future or ()) + 1

        def key(item):
            i, c = item
            when = min((nxt.get(m, never) for m in uses(c)), default=never)
            return (-when, -i)  # furthest first; ties (never needed): most recently used first
        return [c for _, c in sorted(enumerate(candidates), key=key)]

    def _evict_tensors(self, keep: set, need: int, future: list[str] | None = None) -> None:
        if self.resident_bytes + need <= self.budget:
            return
        candidates = [u for u in self._resident if u not in keep]  # least recently used first
        for u in self._victims(candidates, lambda u: self._users[u], future):
            if self.resident_bytes + need <= self.budget:
                return
            self._drop(u)

    def _evict_models(self, keep: str | set, need: int, future: list[str] | None = None) -> None:
        if self.resident_bytes + need <= self.budget:
            return
        keep = {keep} if isinstance(keep, str) else keep
        candidates = [m for m in self._models_lru if m not in keep]
        for other in self._victims(candidates, lambda m: (m,), future):
            if self.resident_bytes + need <= self.budget:
                return
            for u in self._units[other]:
                if u in self._resident:
                    self._drop(u)
            del self._models_lru[other]

    def _drop(self, unit: Hashable) -> None:
        del self._resident[unit]
        self.resident_bytes -= self._unit_bytes[unit]
        for listener in self.on_evict:
            for name in self._users[unit]:
                listener(name)

    def _load(self, name: str, units: list | None = None) -> None:
        units = [u for u in (units if units is not None else self._units[name]) if u not in self._resident]
        need = sum(self._unit_bytes[u] for u in units)
        assert self.budget is None or self.resident_bytes + need <= self.budget, (
            f"{self.policy}: loading {name} would hold {self.resident_bytes + need} bytes, over the budget "
            f"of {self.budget}")
        start = time.perf_counter()
        done = []
        try:
            for u in units:
                src = self._stored[u if self.shared else u[1]]
                # A real copy even on the CPU: that is what loading costs on a box without a GPU.
                self._resident[u] = src.to(self.device, copy=True)
                done.append(u)
                self.resident_bytes += self._unit_bytes[u]
                self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        except BaseException:  # out of memory, Ctrl-C: none of this load stays half-resident
            for u in done:
                self._drop(u)
            raise
        spent = time.perf_counter() - start
        stats = self.stats[name]
        stats.load_seconds += spent
        stats.load_wait_seconds += spent  # nothing runs while it loads
        stats.loaded_bytes += need
        stats.swaps += 1
        if not self.shared:
            self._models_lru[name] = None
            self._models_lru.move_to_end(name)
        self.peak_resident_bytes = max(self.peak_resident_bytes, self.resident_bytes)

    # --- reading -----------------------------------------------------------------------------

    def refuses(self, name: str) -> bool:
        """True when the policy will never run `name` (space-sharing: outside the static set)."""
        return self.static_set is not None and name not in self.static_set

    def missing_bytes(self, name: str) -> int:
        """Bytes model `name` would load, or wait for, if it ran now (0 when it is resident).
        A prefetch still copying is not loaded yet: running `name` first settles it
        (`settle_prefetch`), which for the prefetch's own model, or one that shares tensors
        with it, waits for the rest of that copy; so the bytes of the copy not copied yet count
        as missing for those models (a partial load), and what is copied does not. (For a model
        that shares nothing with it the copy is cancelled between tensors: nothing of it counts.)"""
        units = self._units[name]
        lacking = [u for u in units if u not in self._resident]
        pending = self._prefetch
        if pending is None:
            return sum(self._unit_bytes[u] for u in lacking)
        coming = set(pending.units)
        own = sum(self._unit_bytes[u] for u in lacking if u not in coming)
        if not coming & set(units):  # cancelled when `name` runs: no wait for it
            return own
        return own + sum(self._unit_bytes[u] for u in pending.remaining())

    def order_bytes(self, name: str) -> int:
        """What the merge-aware order ranks a model by: the bytes it would load or wait for if
        it ran now (`missing_bytes`), plus, when running it would cancel a prefetch for a model
        it shares nothing with, the bytes that copy has copied already: thrown away, and copied
        again when the prefetched model runs. So a prefetch nearly done is not cancelled for a
        model that lacks only a little less. (The load time estimate reads `missing_bytes`:
        the thrown-away bytes cost no wait.)"""
        missing = self.missing_bytes(name)
        pending = self._prefetch
        if pending is None or set(pending.units) & set(self._units[name]):
            return missing
        left = set(pending.remaining())
        return missing + sum(self._unit_bytes[u] for u in pending.units if u not in left)

    def is_resident(self, name: str) -> bool:
        return all(u in self._resident for u in self._units[name])

    def total_bytes(self) -> int:
        """Bytes every model in use would hold under this policy (shared once, or not)."""
        return sum(self._unit_bytes.values())

    def to_dict(self) -> dict:
        return {"policy": self.policy, "budget_bytes": self.budget, "device": str(self.device),
                "resident_bytes": self.resident_bytes, "peak_resident_bytes": self.peak_resident_bytes,
                "all_models_bytes": self.total_bytes(), "static_set": self.static_set,
                "prefetches": self.prefetches, "prefetch_misses": self.prefetch_misses,
                "models": {n: s.to_dict() for n, s in self.stats.items()}}

    @classmethod
    def for_bundle(cls, bundle, names: list[str], policy: str, budget_bytes: int | None,
                   device: str | torch.device = "cpu", eviction: str = "belady",
                   demand: list[tuple[float, list[str]]] | None = None) -> "ModelScheduler":
        """A scheduler for the named models of a loaded bundle."""
        maps = {}
        for n in names:
            try:
                maps[n] = dict(bundle.manifest.model(n).tensors)
            except KeyError:
                known = ", ".join(m.name for m in bundle.manifest.models)
                raise GemelError(f"model '{n}' is not in the bundle {bundle.path} (it has {known})") from None
        return cls(bundle.tensors, maps, policy, budget_bytes, device, eviction, demand)


__all__ = ["EVICTIONS", "ModelResidency", "ModelScheduler", "POLICIES"]
