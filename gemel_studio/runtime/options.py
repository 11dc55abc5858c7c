"""How a run runs, stated once: `RunOptions` (policy, memory budget, device, backend, loading,
deadline, eviction, batching, prefetch, CPU threads, order), validated once, read by the `gemel run` flags (built from it
with gemel_studio.options), by the studio's Live preview form and by the `Engine`.

What a run is fed and where it reports (its streams, duration, metrics port, results file)
is not an option of the run: the command and the preview supply those.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from ..errors import GemelError
from ..options import validate

# Torch-free on purpose: the `gemel` command builds its flags from RunOptions without importing
# torch. The modules that implement these choices import them from here.
POLICIES = ("merged", "time-sharing", "space-sharing", "unlimited")  # scheduler.py
EVICTIONS = ("belady", "lru")  # scheduler.py
BACKENDS = ("torch", "onnxruntime")  # backends.py
LOADS = ("whole", "layered")  # layered.py
ORDERS = ("merge-aware", "fair")  # batching.py
PREFETCHES = ("auto", "on", "off")  # scheduler.py, engine.py


def parse_bytes(text: str | int, what: str = "memory budget") -> int:
    """'200MiB', '1.5GB', '1024', '64k' -> bytes (binary units for KiB/MiB/GiB and k/M/G).
    `what` names the value in the error."""
    if isinstance(text, int) and not isinstance(text, bool):
        if text <= 0:
            raise GemelError(f"{what} {text}: must be a positive number of bytes")
        return text
    s = str(text).strip().replace(" ", "")
    units = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024**2, "mb": 1000**2, "mib": 1024**2,
             "g": 1024**3, "gb": 1000**3, "gib": 1024**3, "t": 1024**4, "tb": 1000**4, "tib": 1024**4}
    i = len(s)
    while i > 0 and s[i - 1].isalpha():
        i -= 1
    number, unit = s[:i], s[i:].lower()
    try:
        value = float(number)
    except ValueError:
        value = -1.0
    if unit not in units or not value > 0:
        raise GemelError(f"{what} '{text}': expected a positive size such as 200MiB, 1.5GiB or 52428800")
    return int(value * units[unit])


def _budget(value):
    return None if value is None else parse_bytes(value)


# Inside the Optional, so that the flag reads text ('200MiB') and the model turns it into bytes.
Bytes = Annotated[int, BeforeValidator(_budget)]


class RunOptions(BaseModel):
    """The options of one run. A bad value raises GemelError naming its flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal[BACKENDS] = Field(
        "torch", description="torch (default) or onnxruntime (CPU; sessions read the resident weights in place)")
    device: str = Field("auto", description="auto (default: CUDA when present), cpu, cuda, cuda:N")
    load: Literal[LOADS] = Field(
        "whole", description="whole: a model's missing weights load before it runs (default); layered: MemA-style, "
                             "each layer's weights load while the layers before it run (torch backend)")
    memory_budget: Bytes | None = Field(None, description="e.g. 200MiB, 1.5GiB or a number of bytes",
                                        json_schema_extra={"metavar": "BYTES"})
    policy: Literal[POLICIES] = "merged"
    deadline_ms: float | None = Field(
        None, description="milliseconds each frame has from its arrival (default: its stream's frame interval)",
        json_schema_extra={"flag": "--deadline", "metavar": "MS"})
    eviction: Literal[EVICTIONS] = Field(
        "belady", description="what to evict: belady (default: what the queued frames need furthest in the future; "
                              "most recently used otherwise) or lru (least recently used, for comparison)")
    batching: bool = Field(True, description="run every frame alone (for comparison)")
    prefetch: Literal[PREFETCHES] = Field(
        "auto", description="load the next model's weights while the model before it runs: auto (default: on CUDA, "
                            "where the copy does not take compute; off on a CPU, where it competes with inference "
                            "for the same cores), on or off")
    threads: int | None = Field(
        None, description="CPU threads one inference may use (default: torch's and onnxruntime's own, one per "
                          "core); fewer leave cores to decoding and the rest of the box",
        json_schema_extra={"metavar": "N"})
    order: Literal[ORDERS] = Field(
        "merge-aware", description="which waiting work runs next: merge-aware (default: among streams within "
                                   "one run of the fair share, the model with the fewest bytes left to load, so "
                                   "models sharing layers run back to back) or fair (max-min fairness alone)")

    @field_validator("deadline_ms")
    @classmethod
    def _positive_deadline(cls, value):
        if value is not None and not value > 0:
            raise GemelError(f"--deadline {value:g}: must be a positive number of milliseconds")
        return value

    @field_validator("threads")
    @classmethod
    def _positive_threads(cls, value):
        if value is not None and value < 1:
            raise GemelError(f"--threads {value}: must be at least 1 (or leave it out for one per core)")
        return value

    @model_validator(mode="after")
    def _layered_needs_torch(self):
        if self.load == "layered" and self.backend != "torch":
            raise GemelError("layer-by-layer loading needs the torch backend (an onnxruntime session takes all "
                             "its weights at once); use --backend torch or --load whole")
        return self

    @classmethod
    def from_keywords(cls, policy: str = "merged", budget_bytes: int | None = None, device: str = "cpu",
                      backend: str = "torch", load: str = "whole", deadline_s: float | None = None,
                      eviction: str = "belady", batching: bool = True, order: str = "merge-aware",
                      prefetch: str = "auto") -> "RunOptions":
        """The options the Engine's older keyword arguments name (the deadline in seconds)."""
        if deadline_s is not None and not deadline_s > 0:
            raise GemelError(f"deadline {deadline_s!r} s: must be a positive number (--deadline MS)")
        return validate(cls, {"policy": policy, "memory_budget": budget_bytes, "device": device, "backend": backend,
                              "load": load, "eviction": eviction, "batching": batching, "order": order,
                              "prefetch": prefetch,
                              "deadline_ms": None if deadline_s is None else 1000.0 * deadline_s})

    @property
    def deadline_s(self) -> float | None:
        return None if self.deadline_ms is None else self.deadline_ms / 1000.0

    @property
    def budget_device(self) -> str:
        """The device the memory budget is about: onnxruntime runs on the CPU here, so 'auto'
        means the CPU for it (as the engine decides)."""
        return "cpu" if self.backend == "onnxruntime" and self.device == "auto" else self.device

    def with_device_budget(self) -> "tuple[RunOptions, str | None]":
        """These options with the budget a run takes when none is given (`gemel run` without
        --memory-budget, the preview's "What the device can hold"): what the device can hold
        now. Returns them and where the figure came from (None: a budget was given, or the
        policy is unlimited)."""
        if self.memory_budget is not None or self.policy == "unlimited":
            return self, None
        from ..devices import resolve_device
        from .telemetry import device_capacity

        budget, where = device_capacity(resolve_device(self.budget_device))
        return self.model_copy(update={"memory_budget": budget}), where


def choices(name: str) -> list[str]:
    """The values option `name` may take (for a form's combo box)."""
    return list(get_args(RunOptions.model_fields[name].annotation))


__all__ = ["BACKENDS", "EVICTIONS", "LOADS", "ORDERS", "POLICIES", "PREFETCHES", "RunOptions", "choices", "parse_bytes"]
