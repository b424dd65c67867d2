"""Mean ± std over seeds and Markdown tables, in the style of the paper's Table 2."""
from __future__ import annotations

from typing import Sequence

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample std (ddof=1) over runs; the std of a single run is 0.0, not NaN."""
    array = np.asarray(values, dtype=float)
    if array.size == 0:
        raise ValueError("mean_std needs at least one value")
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return float(array.mean()), std


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """``"81.16 ± 0.42"``; a single run prints without a spread, so it is not mistaken for a zero std.
    Counts (ints, e.g. empty clusters) print as "3" for one run and "3.7 ± 2.9" for several."""
    mean, std = mean_std(values)
    if all(isinstance(v, int) for v in values):
        digits = 0 if len(values) == 1 else 1
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def _row(cells: Sequence[str]) -> str:
    """One Markdown row; a literal ``|`` in a cell would otherwise split it."""
    return "| " + " | ".join(str(cell).replace("|", "\\|") for cell in cells) + " |"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A GitHub-flavoured Markdown table (no trailing newline)."""
    for row in rows:
        if len(row) != len(header):
            raise ValueError(f"row {row!r} has {len(row)} cells, header has {len(header)}")
    lines = [_row(header), _row(["---"] * len(header)), *(_row(row) for row in rows)]
    return "\n".join(lines)
