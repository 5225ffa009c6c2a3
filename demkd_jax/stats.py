"""The statistics of a results table: t intervals over seeds, paired t-tests, Holm's correction, verdicts.

Pure functions of plain numbers. A paired difference is taken over one matched pair of runs: the same data seed and
student seed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Hashable, Mapping, Sequence

from scipy import stats as scipy_stats


@dataclasses.dataclass(frozen=True)
class Interval:
    """A sample's mean, sample std (ddof 1; 0 for one value), size and two-sided interval (None for n < 2)."""

    mean: float
    std: float
    n: int
    low: float | None
    high: float | None
    confidence: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def t_interval(values: Sequence[float], confidence: float = 0.95) -> Interval:
    """``mean ± t_{(1+c)/2, n-1} * s / sqrt(n)`` with ``s`` the sample std; no interval for one value."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    values = [float(v) for v in values]
    if not values:
        raise ValueError("a statistic needs at least one value, got an empty sample")
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise ValueError(f"a statistic needs finite values, got {bad[0]!r}")
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        return Interval(mean, 0.0, 1, None, None, confidence)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(scipy_stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return Interval(mean, std, n, mean - half, mean + half, confidence)


def paired_differences(a: Mapping[Hashable, float], b: Mapping[Hashable, float]) -> list[float]:
    """``a[k] - b[k]`` for every key in both, in ``a``'s key order."""
    return [float(a[k]) - float(b[k]) for k in a if k in b]


def paired_t_p_value(differences: Sequence[float]) -> float | None:
    """Two-sided p-value of ``mean(differences) = 0`` (one-sample t-test); None for fewer than two pairs.

    Identical differences (std 0) give 0 for a non-zero mean and 1 for a zero one.
    """
    d = t_interval(differences)
    if d.n < 2:
        return None
    if d.std == 0.0:
        return 0.0 if d.mean != 0.0 else 1.0
    t = d.mean / (d.std / math.sqrt(d.n))
    return float(2.0 * scipy_stats.t.sf(abs(t), d.n - 1))


def holm(p_values: Sequence[float], alpha: float = 0.05) -> tuple[list[float], list[bool], list[float]]:
    """Holm's step-down procedure over ``m`` comparisons at family-wise level ``alpha``.

    Returns ``(adjusted p-values, rejected, interval alphas)``, each in the input order. The ``j``-th smallest
    p-value (0-based) is tested at ``alpha / (m - j)`` while every smaller one was rejected; the procedure
    stops at the first that is not. Interval alphas: a rejected comparison gets its own ``alpha / (m - j)``;
    every comparison from the first non-rejected one on gets that one's level. A two-sided interval at level
    ``1 - interval alpha`` then excludes 0 exactly when the comparison is rejected.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha!r}")
    p = [float(v) for v in p_values]
    bad = [v for v in p if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"p-values must be in [0, 1], got {bad[0]!r}")
    m = len(p)
    order = sorted(range(m), key=lambda i: p[i])
    adjusted, rejected, levels = [1.0] * m, [False] * m, [alpha] * m
    running_max, stopped_level = 0.0, None
    for j, i in enumerate(order):
        running_max = max(running_max, min(1.0, (m - j) * p[i]))
        adjusted[i] = running_max
        level = alpha / (m - j)
        if stopped_level is None and p[i] <= level:
            rejected[i] = True
        elif stopped_level is None:
            stopped_level = level
        levels[i] = level if stopped_level is None else stopped_level
    return adjusted, rejected, levels


def verdict(low: float | None, high: float | None, margin: float = 0.3) -> str:
    """The evidence rule of a DE-MKD-vs-baseline interval of differences: "wins" if its lower bound is > 0, "does
    not win" if its upper bound is < ``margin``, else "undecided" (also without an interval)."""
    if low is None or high is None:
        return "undecided"
    if low > 0.0:
        return "wins"
    if high < margin:
        return "does not win"
    return "undecided"
