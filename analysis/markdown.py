"""Markdown cells and tables for the reports (``analysis.report`` and its sections)."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["fmt", "human_bytes", "table"]


def human_bytes(n: float) -> str:
    """``65536`` -> ``"64K"``, powers of 1024 as ``ringcomm.bench`` sizes are written."""
    for unit, scale in (("G", 1 << 30), ("M", 1 << 20), ("K", 1 << 10)):
        if n >= scale:
            v = n / scale
            return f"{v:.0f}{unit}" if v == int(v) else f"{v:.1f}{unit}"
    return f"{n:.0f}"


def fmt(v: object, spec: str = ".3g") -> str:
    """``v`` for a table cell: ``spec`` for numbers, whole counts as they are, "–" for a missing value."""
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if isinstance(v, float) and math.isinf(v):
        return "∞"
    if isinstance(v, int) and not isinstance(v, bool) and spec == ".3g":
        return str(v)  # counts (batch sizes, steps) print whole
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return format(v, spec)
    return str(v)


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (no trailing newline)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
