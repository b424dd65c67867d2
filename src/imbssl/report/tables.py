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


def paired_difference(values: dict[int, float | None], baseline: dict[int, float | None]) -> dict[int, float]:
    """seed -> values[seed] - baseline[seed], the difference at the same seed; seeds that lack either side (absent,
    or None) are left out."""
    return {seed: values[seed] - baseline[seed] for seed in sorted(values.keys() & baseline.keys())
            if values[seed] is not None and baseline[seed] is not None}


def verdict(gains_by_seed: dict[int, float]) -> str:
    """'+2.10 ± 0.30 points (7.0 seed stds): holds' for paired-by-seed gains, or 'not shown at this scale' inside
    one std; 'the opposite holds' when the mean is a loss of more than one std."""
    gains = list(gains_by_seed.values())
    if not gains:
        return "not measured"
    mean, std = mean_std(gains)
    if len(gains) < 2:
        return f"{mean:+.2f} points (one seed: no std, not shown)"
    ratio = abs(mean) / std if std > 0 else float("inf")
    said = "holds" if mean > std else "the opposite holds" if -mean > std else "not shown at this scale"
    return f"{mean:+.2f} ± {std:.2f} points ({ratio:.1f} seed stds): {said}"


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
