"""Plain formatting shared by the command line and the studio: byte counts and text tables."""

from __future__ import annotations


def human_bytes(n: int | None) -> str:
    """A byte count in binary units: `512 B`, `1.5 KiB`, `3.2 GiB`; `-` for unknown."""
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def text_table(rows: list[list[str]], header: list[str]) -> str:
    """A plain-text table: the first column left-aligned, the rest right-aligned, a rule under
    the header."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
