"""Plain-text tables for the terminal, one way for every stage: columns left-aligned to their widest cell."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any


def cell_text(value: Any) -> str:
    """None -> empty, floats with 4 significant digits, everything else as str()."""
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def text_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, cell: Callable[[Any], str] = cell_text,
               max_width: int | None = None, indent: str = "") -> str:
    """The rows under their column names, two spaces apart; ``max_width`` cuts long cells."""
    cells = [[cell(v)[:max_width] if max_width else cell(v) for v in row] for row in rows]
    widths = [max([len(str(c)), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(indent + line.rstrip() for line in lines)
