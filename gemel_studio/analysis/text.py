"""A workload's analysis as text: the tables `gemel analyze` prints (figures from the analysis,
bytes formatted by units.py)."""

from __future__ import annotations

from ..units import human_bytes, text_table


def format_analysis(analysis, top: int = 15) -> str:
    """Per-model costs, the `top` heaviest share groups and the all-shareable bound."""
    out = [f"workload {analysis.workload}: {len(analysis.models)} models, alignment: {analysis.alignment}", ""]
    rows = [[m.name, m.architecture, m.task, f"{m.param_count:,}", human_bytes(m.param_bytes),
             human_bytes(m.buffer_bytes), human_bytes(m.activation_bytes), str(len(m.layers))]
            for m in analysis.models]
    out.append(text_table(rows, ["model", "architecture", "task", "parameters", "param bytes", "buffers",
                                 "peak activations", "layers"]))
    out.append("")
    shown = analysis.groups[:top]
    rows = [[str(i + 1), g.kind, str(len(g.members)), human_bytes(g.bytes_per_copy), human_bytes(g.savings_bytes),
             ", ".join(f"{m.model}:{m.layer}" for m in g.members)[:70]] for i, g in enumerate(shown)]
    out.append(f"{len(analysis.groups)} share groups (heaviest {len(shown)} shown)")
    if rows:
        out.append(text_table(rows, ["#", "kind", "models", "per copy", "saves", "members"]))
    out.append("")
    out.append(f"total parameter bytes   {human_bytes(analysis.total_param_bytes)}")
    out.append(f"all-shareable bound     {human_bytes(analysis.max_savings_bytes)} "
               f"({analysis.max_savings_fraction:.1%} of the total)")
    for m in analysis.models:
        for note in m.notes:
            out.append(f"note: {m.name}: {note}")
    return "\n".join(out)


__all__ = ["format_analysis"]
