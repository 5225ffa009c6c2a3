"""The results table's statistics against hand-computed values and scipy's own tests."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from demkd_jax import stats


def test_t_interval_hand_values():
    r = stats.t_interval([1, 2, 3, 4, 5, 6])
    # mean 3.5, s = sqrt(3.5), t_{0.975, 5} = 2.570582 (tables): half width 2.570582 * 1.870829 / sqrt(6)
    assert r.mean == 3.5 and r.n == 6 and r.std == pytest.approx(math.sqrt(3.5))
    assert (r.low, r.high) == (pytest.approx(3.5 - 1.963315, abs=1e-6), pytest.approx(3.5 + 1.963315, abs=1e-6))
    r = stats.t_interval([0.0, 1.0, 2.0])  # s = 1, t_{0.975, 2} = 4.302653
    assert (r.low, r.high) == (pytest.approx(1 - 4.302653 / math.sqrt(3), abs=1e-6),
                               pytest.approx(1 + 4.302653 / math.sqrt(3), abs=1e-6))
    r90 = stats.t_interval([0.0, 1.0, 2.0], confidence=0.9)  # t_{0.95, 2} = 2.919986
    assert r90.high == pytest.approx(1 + 2.919986 / math.sqrt(3), abs=1e-6)
    one = stats.t_interval([42.0])
    assert (one.mean, one.std, one.n, one.low, one.high) == (42.0, 0.0, 1, None, None)


def test_t_interval_matches_scipy_and_rejects_bad_input():
    x = np.random.default_rng(0).normal(70, 0.4, 6)
    r = stats.t_interval(x)
    low, high = scipy_stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=scipy_stats.sem(x))
    assert (r.low, r.high) == (pytest.approx(low), pytest.approx(high))
    with pytest.raises(ValueError, match="empty sample"):
        stats.t_interval([])
    with pytest.raises(ValueError, match="finite values, got nan"):
        stats.t_interval([1.0, float("nan")])
    with pytest.raises(ValueError, match="confidence must be in"):
        stats.t_interval([1.0, 2.0], confidence=95)


def test_paired_differences_and_p_value():
    a = {(0, 0): 70.1, (0, 1): 70.5, (1, 0): 69.9, (1, 1): 70.8, (2, 0): 71.0}
    b = {(0, 1): 70.0, (0, 0): 70.3, (1, 1): 70.1, (1, 0): 69.0}
    d = stats.paired_differences(a, b)  # only the matched pairs, paired by key (not by position)
    assert d == pytest.approx([-0.2, 0.5, 0.9, 0.7])
    keys = [k for k in a if k in b]
    want = scipy_stats.ttest_rel([a[k] for k in keys], [b[k] for k in keys]).pvalue
    assert stats.paired_t_p_value(d) == pytest.approx(want)
    assert stats.paired_t_p_value([0.5]) is None
    assert stats.paired_t_p_value([0.5, 0.5]) == 0.0 and stats.paired_t_p_value([0.0, 0.0]) == 1.0


def test_holm_hand_values():
    adjusted, rejected, levels = stats.holm([0.01, 0.04, 0.03, 0.005], alpha=0.05)
    # sorted: 0.005 at 0.05/4 rejected, 0.01 at 0.05/3 rejected, 0.03 at 0.05/2 not: stop there.
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert rejected == [True, False, False, True]
    assert levels == pytest.approx([0.05 / 3, 0.025, 0.025, 0.0125])
    assert stats.holm([0.2], 0.05) == ([0.2], [False], [0.05])
    assert stats.holm([0.6, 0.7], 0.05)[0] == [1.0, 1.0]  # adjusted values are capped at 1
    with pytest.raises(ValueError, match="p-values must be in"):
        stats.holm([1.5])


def test_holm_intervals_agree_with_its_decisions():
    rng = np.random.default_rng(1)
    for _ in range(20):
        samples = [rng.normal(rng.uniform(-0.5, 1.5), 0.4, 6) for _ in range(5)]
        p = [stats.paired_t_p_value(s) for s in samples]
        _, rejected, levels = stats.holm(p)
        for s, rej, level in zip(samples, rejected, levels):
            r = stats.t_interval(s, confidence=1 - level)
            assert rej == (r.low > 0 or r.high < 0)


def test_verdict_rule():
    assert stats.verdict(0.1, 0.9) == "wins"
    assert stats.verdict(-0.5, 0.29) == "does not win"
    assert stats.verdict(-0.5, 0.31) == "undecided"
    assert stats.verdict(0.05, 0.2) == "wins"  # a win is checked first
    assert stats.verdict(None, None) == "undecided"
