"""Markdown tables: every report, benchmark and check prints its figures through this one writer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence


def cell(value: object, floatfmt: str = ".4g") -> str:
    """One cell: floats in `floatfmt`, missing values (None, NaN) as a dash, pipes escaped."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value).replace("|", "\\|")


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]], floatfmt: str = ".4g",
                   formats: dict[str, Callable[[object], str]] | None = None) -> str:
    """A GitHub Markdown table; `formats` overrides the cell format of named columns."""
    names = [str(h) for h in header]
    formats = formats or {}
    lines = ["| " + " | ".join(names) + " |", "|" + "|".join("---" for _ in names) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(formats[n](v) if n in formats and v is not None else cell(v, floatfmt)
                                        for n, v in zip(names, row, strict=True)) + " |")
    return "\n".join(lines)
