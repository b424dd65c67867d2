"""Mean ± std over seeds, differences paired by seed with their t intervals, and Markdown tables."""
from __future__ import annotations

from dataclasses import dataclass
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


#: t_{0.975} on 1..9 degrees of freedom (scipy.stats.t.ppf); from 10 on, the Cornish-Fisher series of ``t_975``
T_975_SMALL = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157)
Z_975 = 1.959963984540054


def t_975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom: the half-width factor of a two-sided 95%
    interval. From 10 degrees of freedom on, the Cornish-Fisher expansion around the normal quantile z
    (Abramowitz & Stegun 26.7.5), within 1e-5 of the exact value."""
    if df < 1:
        raise ValueError(f"t_975 needs at least 1 degree of freedom, got {df}")
    if df <= len(T_975_SMALL):
        return T_975_SMALL[df - 1]
    z = Z_975
    terms = ((z ** 3 + z) / 4, (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96,
             (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384,
             (79 * z ** 9 + 776 * z ** 7 + 1482 * z ** 5 - 1920 * z ** 3 - 945 * z) / 92160)
    return z + sum(term / df ** (i + 1) for i, term in enumerate(terms))


@dataclass(frozen=True)
class Paired:
    """Differences paired by seed (a - b at the same seed), their mean and its 95% confidence interval from the t
    distribution over the seeds: mean ± t_{0.975, n-1} s / sqrt(n). With one seed there is no interval."""

    differences: dict[int, float]

    @property
    def seeds(self) -> int:
        return len(self.differences)

    @property
    def mean(self) -> float:
        return mean_std(list(self.differences.values()))[0]

    @property
    def interval(self) -> tuple[float, float] | None:
        if self.seeds < 2:
            return None
        mean, std = mean_std(list(self.differences.values()))
        half = t_975(self.seeds - 1) * std / np.sqrt(self.seeds)
        return mean - half, mean + half

    def __sub__(self, other: "Paired") -> "Paired":
        """The difference of two paired differences, paired by seed (e.g. a gain at rho=100 less the one at 10)."""
        return Paired(paired_difference(self.differences, other.differences))


def verdict(paired: Paired) -> str:
    """'+2.10 points (95% CI +0.40 to +3.80, 3 seeds): holds'. A claim holds (or the opposite does) only when the
    interval excludes zero; an interval that reaches zero says 'not shown'. One seed gives no interval."""
    if not paired.seeds:
        return "not measured"
    if paired.interval is None:
        return f"{paired.mean:+.2f} points: not shown (one seed)"
    low, high = paired.interval
    return f"{paired.mean:+.2f} points (95% CI {low:+.2f} to {high:+.2f}, {paired.seeds} seeds): {_said(low, high)}"


def verdict_cell(paired: Paired) -> str:
    """``verdict`` in a table's cell: '+2.10 (+0.40 to +3.80): holds', where the table's heading gives the unit and
    the seeds."""
    if paired.interval is None:
        return f"{paired.mean:+.2f} (one seed)" if paired.seeds else "n/a"
    low, high = paired.interval
    return f"{paired.mean:+.2f} ({low:+.2f} to {high:+.2f}): {_said(low, high)}"


def _said(low: float, high: float) -> str:
    return "holds" if low > 0 else "the opposite holds" if high < 0 else "not shown"


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
