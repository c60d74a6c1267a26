"""Plain-text tables for the terminal, one way for every stage: columns left-aligned to their widest cell."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any


def cell_text(value: Any) -> str:
    """None -> empty, floats with 4 significant digits, everything else as str()."""
    if value is None:
        return ""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cut(text: str, max_width: int | None) -> str:
    return text if not max_width or len(text) <= max_width else text[:max_width - 1] + "…"


def text_table(columns: Sequence[str], rows: Iterable[Sequence[Any]], *, cell: Callable[[Any], str] = cell_text,
               max_width: int | None = None, indent: str = "") -> str:
    """The rows under their column names, two spaces apart; ``max_width`` cuts longer cells, ending them in "…"
    so a cut never passes for the whole value."""
    cells = [[cut(cell(v), max_width) for v in row] for row in rows]
    widths = [max([len(str(c)), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(indent + line.rstrip() for line in lines)
