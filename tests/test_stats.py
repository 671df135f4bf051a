"""
The statistics rule of the experiments (support/stats.py) against independent references: the
t quantiles by integrating Student's density, the interval by hand, the verdicts on made-up data.
"""

import math

import numpy as np
import pytest

from support.stats import fmt_paired, interval, paired, t975

# published tables
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 9: 2.262, 20: 2.086, 30: 2.042, 120: 1.980}


def t_cdf_integrated(x, df, n=400001):
    """P(T <= x) for Student's t and x > 0: 1/2 (symmetry) + the trapezoid rule on its density from 0 to x."""
    grid = np.linspace(0.0, x, n)
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))
    pdf = c * (1 + grid ** 2 / df) ** (-(df + 1) / 2)
    return 0.5 + float(np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(grid)))


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantiles_are_the_975_points_of_the_density(df):
    """t975 is the 0.975 point of the integrated density, and rounds to the published table's value."""
    assert abs(t_cdf_integrated(t975(df), df) - 0.975) < 1e-7, df
    assert round(t975(df), 3) == T975[df], df


def test_interval_by_hand_and_the_verdict():
    # 5 seeds around 1.0; the sample standard deviation by hand
    values = [0.9, 1.0, 1.1, 0.95, 1.05]
    sd = math.sqrt(sum((v - 1.0) ** 2 for v in values) / 4)         # 0.0790569
    mean, half = interval(values)
    assert math.isclose(mean, 1.0) and math.isclose(half, t975(4) * sd / math.sqrt(5))
    assert round(t975(7), 3) == 2.365 and round(t975(22), 3) == 2.074 and round(t975(1000), 3) == 1.962
    with pytest.raises(ValueError):
        t975(0)
    a = [1.0, 1.1, 1.2, 1.3, 1.4]
    assert paired([x - 0.05 for x in a], a)[2]                       # the same shift every seed: real
    assert not paired([x + d for x, d in zip(a, [0.05, -0.04, 0.03, -0.05, 0.02])], a)[2]  # noise: not real
    assert fmt_paired([2.0, 2.1, 1.9], [2.0, 2.0, 2.0]).endswith("(not established at 3 seeds)")
    assert "(real)" in fmt_paired([1.0, 1.01, 0.99, 1.0, 1.0], [2.0] * 5)


def test_t_cdf_against_the_integrated_density_and_p_values_by_hand():
    from support.stats import p_value, t_cdf, t_quantile
    for df in (1, 2, 4, 9, 30):
        for x in (0.3, 1.0, 2.5, 6.0):
            assert abs(t_cdf(x, df) - t_cdf_integrated(x, df)) < 1e-6, (x, df)
            assert abs(t_cdf(-x, df) - (1 - t_cdf_integrated(x, df))) < 1e-6
        assert abs(t_quantile(0.975, df) - T975[df]) < 5e-4
    # 5 paired differences 0.1, 0.2, 0.3, 0.2, 0.2: mean 0.2, sd sqrt(0.005), t = 0.2 / (sd / sqrt 5) = 6.3246
    a, b = [1.1, 1.2, 1.3, 1.2, 1.2], [1.0] * 5
    assert abs(p_value(a, b) - 2 * (1 - t_cdf_integrated(0.2 / math.sqrt(0.005 / 5), 4))) < 1e-6


def test_holm_and_equivalence_on_made_up_families():
    from support.stats import equivalent, holm
    adjusted = holm([0.01, 0.04, 0.03, 0.005])  # by hand: sorted 0.005*4, 0.01*3, 0.03*2, 0.04*1, then monotone
    assert all(math.isclose(x, y) for x, y in zip(adjusted, [0.03, 0.06, 0.06, 0.02]))
    same = [0.001, -0.002, 0.0015, -0.0005, 0.0]                      # tiny noise around 0
    assert equivalent([1 + d for d in same], [1.0] * 5, margin=0.01)
    assert not equivalent([1 + d for d in same], [1.0] * 5, margin=0.001)
    assert not equivalent([1.02 + d for d in same], [1.0] * 5, margin=0.01)


def test_a_real_verdict_never_prints_an_interval_that_touches_zero():
    # mean 0.0030, half 0.00278 (real): at 3 digits both print 0.003; one more digit parts them
    text = fmt_paired([1.003, 1.0, 1.006, 1.002, 1.004], [1.0] * 5, 3)
    assert text == "+0.0030 ± 0.0028 (real)"
