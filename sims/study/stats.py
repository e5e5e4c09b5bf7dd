"""The study's statistics: a curve's tail (mean and slope), t-intervals, paired differences.

Pure functions on lists of numbers; :mod:`sims.study.report` applies them to
the runs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["Interval", "paired_difference", "t_interval", "tail_mean", "tail_slope"]


def _tail(rounds: Sequence[int], values: Sequence[float], last: int) -> tuple[np.ndarray, np.ndarray]:
    if len(rounds) != len(values) or not rounds:
        raise ValueError(
            f"rounds and values should be non-empty and of one length, got {len(rounds)} and "
            f"{len(values)}"
        )
    if last < 1:
        raise ValueError(f"last should be >= 1 round, got {last}")
    r = np.asarray(rounds, dtype=np.float64)
    v = np.asarray(values, dtype=np.float64)
    keep = r > r.max() - last
    return r[keep], v[keep]


def tail_mean(rounds: Sequence[int], values: Sequence[float], last: int) -> float:
    """The mean of the values at the rounds among the last ``last`` (of the last round's)."""
    _, v = _tail(rounds, values, last)
    return float(v.mean())


def tail_slope(rounds: Sequence[int], values: Sequence[float], last: int) -> float:
    """The least-squares slope (value per round) over the last ``last`` rounds; NaN when they
    hold fewer than two points."""
    r, v = _tail(rounds, values, last)
    if len(r) < 2:
        return math.nan
    return float(np.polyfit(r, v, 1)[0])


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided confidence interval over ``n`` values (NaN bounds when n < 2)."""

    n: int
    mean: float
    low: float
    high: float
    std: float

    @property
    def excludes_zero(self) -> bool:
        """Whether the interval lies wholly above or below 0."""
        return self.low > 0 or self.high < 0


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """Student-t interval of the mean: ``mean ± t(1 - (1 - confidence) / 2, n - 1) · s / √n``."""
    if not 0 < confidence < 1:
        raise ValueError(f"confidence should be in (0, 1), got {confidence}")
    x = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return Interval(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Interval(n, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(1 - (1 - confidence) / 2, n - 1)) * std / math.sqrt(n)
    return Interval(n, mean, mean - half, mean + half, std)


def paired_difference(
    a: dict[int, float], b: dict[int, float], confidence: float = 0.95
) -> Interval:
    """The t-interval of ``a[seed] - b[seed]`` over the seeds both have."""
    seeds = sorted(set(a) & set(b))
    return t_interval([a[s] - b[s] for s in seeds], confidence)
