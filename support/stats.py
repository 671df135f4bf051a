"""
One statistics rule for every table of the experiments (course/demos.py, docs/results.md).

n seeds per arm, the mean, and for a comparison the difference seed by seed (paired: the same seed
gives both arms the same batches) with a 95 % confidence interval from Student's t on n - 1 degrees
of freedom: mean ± t_{0.975, n-1} * s / sqrt(n), s the sample standard deviation of the
differences. A difference is called real only when its interval excludes zero; otherwise the text
says "not established at n seeds". With 3 seeds t is 4.30, with 5 seeds 2.78: a difference must be
about 4.3 / 2.8 times its standard error to count.
"""

import math

# t_{0.975, df}: the two-sided 95 % quantile of Student's t (tests/test_stats.py recomputes each by
# integrating the density)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t975(df):
    """The 95 % two-sided Student t quantile for df >= 1 degrees of freedom (the table's nearest df
    at or below; 1.96 beyond 120)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df >= 1), got df={df}")
    return T975[max(d for d in T975 if d <= df)] if df <= 120 else 1.96


def interval(values):
    """(mean, half-width of the 95 % t interval) of a list of numbers, one per seed."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, float("nan")
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, t975(n - 1) * sd / math.sqrt(n)


def paired(a, b):
    """The difference a - b seed by seed: (mean, half-width, real), real when the interval excludes 0."""
    if len(a) != len(b):
        raise ValueError(f"paired seeds: {len(a)} against {len(b)} values")
    mean, half = interval([x - y for x, y in zip(a, b)])
    return mean, half, abs(mean) > half


def fmt_interval(values, digits=3):
    mean, half = interval(values)
    return f"{mean:.{digits}f} ± {half:.{digits}f}"


def fmt_paired(a, b, digits=3):
    """'-0.023 ± 0.010 (real)' or '-0.004 ± 0.010 (not established at 5 seeds)'."""
    mean, half, real = paired(a, b)
    verdict = "real" if real else f"not established at {len(a)} seeds"
    return f"{mean:+.{digits}f} ± {half:.{digits}f} ({verdict})"
