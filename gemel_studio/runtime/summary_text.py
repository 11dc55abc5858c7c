"""A run's summary as the text `gemel run` prints: a header line, a table per stream and per
model, and the memory figures, each under its own name."""

from __future__ import annotations

from ..units import human_bytes, text_table
from .telemetry import RunSummary


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def format_run(summary: RunSummary) -> str:
    s = summary
    out = [f"{s.bundle}: policy {s.policy} (eviction {s.eviction}{', no batching' if not s.batching else ''}, "
           f"order {s.order}, prefetch {'on' if s.prefetch else 'off'}), "
           f"budget {human_bytes(s.budget_bytes)}, device {s.device}, backend {s.backend}"
           f"{'' if s.threads is None else f', {s.threads} CPU thread(s)'}; ran {s.elapsed_s:.1f} s, "
           f"stopped: {s.stopped}", ""]
    rows = [[r.name, ",".join(r.models), f"{r.fps:g}", str(r.frames_in), str(r.processed), str(r.dropped),
             _ms(r.latency_p50_ms), _ms(r.latency_p99_ms), f"{r.throughput_fps:.1f}", r.end_reason or "-"]
            for r in s.streams]
    out.append(text_table(rows, ["stream", "models", "fps", "in", "processed", "dropped", "p50 ms", "p99 ms",
                                 "frames/s", "ended"]))
    out.append("")
    rows = [[n, human_bytes(m.bytes), str(m.runs), str(m.swaps), f"{m.load_seconds:.3f}",
             f"{m.load_wait_seconds:.3f}", human_bytes(m.loaded_bytes), _ms(m.mean_infer_ms), str(m.refused), m.load,
             f"{m.mean_batch_size:.1f}/{m.max_batch}" if m.mean_batch_size else "-"]
            for n, m in s.models.items()]
    out.append(text_table(rows, ["model", "bytes", "runs", "swaps", "load s", "waited s", "loaded", "infer ms",
                                 "refused", "load", "batch mean/max"]))
    out.extend(f"note: {n} {m.load_note}" for n, m in s.models.items() if m.load_note is not None)
    out.append("")
    mem = s.memory
    out.append(f"runtime resident weights {human_bytes(mem.runtime_resident_bytes)} "
               f"(peak {human_bytes(mem.runtime_peak_resident_bytes)}; all models "
               f"{human_bytes(mem.all_models_bytes)}); process RSS {human_bytes(mem.process_rss_bytes)}")
    if mem.torch_allocated_bytes is not None:
        out.append(f"torch allocated {human_bytes(mem.torch_allocated_bytes)}, reserved "
                   f"{human_bytes(mem.torch_reserved_bytes)}; device used "
                   f"{human_bytes(mem.device_used_bytes)} of {human_bytes(mem.device_total_bytes)}")
    if mem.cuda_allocator_cache_bytes is not None:  # CUDA only: beside the weights budget
        context = "CUDA context unknown (NVML does not list this process)" if mem.cuda_context_bytes is None \
            else f"CUDA context about {human_bytes(mem.cuda_context_bytes)} (this process's GPU memory " \
                 f"{human_bytes(mem.gpu_process_used_bytes)} less what torch reserved)"
        out.append(f"beside the weights budget: {context}; the caching allocator holds "
                   f"{human_bytes(mem.cuda_allocator_cache_bytes)} reserved beyond allocated tensors")
    if s.order == "merge-aware" and s.reordered_batches:
        out.append(f"merge-aware order: {s.reordered_batches} batch(es) ran before the fair choice, their model "
                   "having fewer bytes to load")
    if s.prefetch:
        out.append(f"prefetch: {s.prefetches} load(s) started while the model before ran "
                   f"({s.prefetch_misses} for a model that did not run next)")
    if s.last_error:
        dropped = sum(r.dropped_error for r in s.streams)
        out.append(f"{dropped} frame(s) dropped because a model failed; the last error: {s.last_error}")
    if mem.static_set is not None:
        out.append(f"space-sharing keeps {', '.join(mem.static_set) or 'no model'} resident")
    return "\n".join(out)


__all__ = ["format_run"]
