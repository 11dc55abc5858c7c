"""What the CUDA context and the caching allocator hold beside the weights budget: absent on a
CPU (and the summary says nothing of them), computed from fake readings for the formatting,
and read from a real device only where there is one."""

from __future__ import annotations

import pytest
import torch

from gemel_studio.runtime.summary_text import format_run
from gemel_studio.runtime.telemetry import (MemoryReport, RunSnapshot, RunSummary, SummaryMemory, cuda_overhead,
                                            memory_figures, memory_snapshot)

GIB, MIB = 2**30, 2**20
CUDA_FIELDS = ("cuda_allocator_cache_bytes", "gpu_process_used_bytes", "cuda_context_bytes")


def summary(memory: SummaryMemory, device: str = "cuda:0") -> RunSummary:
    return RunSummary(bundle="b", backend="torch", device=device, policy="merged", budget_bytes=GIB,
                      elapsed_s=1.0, stopped="duration", last_error=None, streams=[], models={}, memory=memory,
                      prefetch=True)


def test_on_a_cpu_the_figures_are_absent_and_the_summary_says_nothing_of_them():
    figures = memory_figures(torch.device("cpu"))
    assert not set(CUDA_FIELDS) & set(figures)
    report = memory_snapshot(torch.device("cpu"), 10, 20, 100)
    assert all(getattr(report, k) is None for k in CUDA_FIELDS)
    assert not set(CUDA_FIELDS) & set(report.to_dict())
    text = format_run(summary(SummaryMemory(budget_bytes=GIB, runtime_resident_bytes=10, all_models_bytes=30), "cpu"))
    assert "CUDA" not in text and "caching allocator" not in text and "beside the weights" not in text
    assert "prefetch on" in text.splitlines()[0] and "order merge-aware" in text.splitlines()[0]


def test_the_overhead_from_a_fake_reading():
    # torch allocated 300 MiB, reserved 512 MiB; NVML says the process holds 1.0 GiB.
    fig = cuda_overhead(300 * MIB, 512 * MIB, GIB)
    assert fig == {"cuda_allocator_cache_bytes": 212 * MIB, "gpu_process_used_bytes": GIB,
                   "cuda_context_bytes": 512 * MIB}
    # NVML cannot see the process (a container's PID namespace): the context is unknown, not 0.
    assert cuda_overhead(300 * MIB, 512 * MIB, None) == {"cuda_allocator_cache_bytes": 212 * MIB}
    # Readings taken a moment apart never make a negative figure.
    assert cuda_overhead(600 * MIB, 512 * MIB, 500 * MIB)["cuda_context_bytes"] == 0
    assert cuda_overhead(600 * MIB, 512 * MIB, 500 * MIB)["cuda_allocator_cache_bytes"] == 0


def test_the_summary_and_the_snapshot_name_each_figure():
    mem = SummaryMemory(budget_bytes=GIB, runtime_resident_bytes=290 * MIB, torch_allocated_bytes=300 * MIB,
                        torch_reserved_bytes=512 * MIB, device_used_bytes=2 * GIB, device_total_bytes=16 * GIB,
                        **cuda_overhead(300 * MIB, 512 * MIB, GIB))
    text = format_run(summary(mem))
    line = next(x for x in text.splitlines() if x.startswith("beside the weights budget"))
    assert "CUDA context about 512.0 MiB" in line and "1.0 GiB" in line and "212.0 MiB" in line, line
    unknown = SummaryMemory(budget_bytes=GIB, torch_allocated_bytes=1, torch_reserved_bytes=1,
                            **cuda_overhead(1, 1, None))
    assert "CUDA context unknown" in format_run(summary(unknown))
    # The snapshot's JSON carries them and reads them back.
    report = MemoryReport(**{k: v for k, v in vars(mem).items() if k in MemoryReport.__dataclass_fields__})
    assert report.to_dict()["cuda_context_bytes"] == 512 * MIB
    snap = RunSnapshot("b", "merged", "torch", "cuda:0", "belady", "running", None, 1.0, [], {}, report)
    assert RunSnapshot.from_dict(snap.to_dict()).memory.cuda_allocator_cache_bytes == 212 * MIB


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_figures_are_read():  # pragma: no cover (no GPU on CI)
    device = torch.device("cuda", torch.cuda.current_device())
    x = torch.empty(64 * MIB // 4, device=device)
    del x  # freed but cached: the allocator holds it
    figures = memory_figures(device)
    assert figures["torch_reserved_bytes"] >= figures["torch_allocated_bytes"]
    assert figures["cuda_allocator_cache_bytes"] >= 64 * MIB
    if "gpu_process_used_bytes" in figures:  # NVML lists this process
        assert figures["cuda_context_bytes"] > 0
        assert figures["gpu_process_used_bytes"] >= figures["torch_reserved_bytes"]
    print({k: figures.get(k) for k in ("torch_allocated_bytes", "torch_reserved_bytes", *CUDA_FIELDS)})
