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

def t975(df):
    """The 95 % two-sided Student t quantile t_{0.975, df} for df >= 1 degrees of freedom (12.706 at 1,
    4.303 at 2, 2.776 at 4; tests/test_stats.py checks it against the integrated density)."""
    if df < 1:
        raise ValueError(f"a t interval needs at least 2 values (df >= 1), got df={df}")
    return t_quantile(0.975, df)


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
    """'-0.023 ± 0.010 (real)' or '-0.004 ± 0.010 (not established at 5 seeds)'. A real difference gets
    as many more digits as it takes for the printed interval not to touch zero (|mean| > half as printed)."""
    mean, half, real = paired(a, b)
    while real and round(abs(mean), digits) <= round(half, digits) and digits < 12:
        digits += 1
    verdict = "real" if real else f"not established at {len(a)} seeds"
    return f"{mean:+.{digits}f} ± {half:.{digits}f} ({verdict})"


# ------------------------------------------------------------------------------------------------
# p-values, the multiplicity of many comparisons, and equivalence

def t_cdf(x, df):
    """P(T <= x) for Student's t on df degrees of freedom: the regularised incomplete beta function
    I_{df/(df+x^2)}(df/2, 1/2) by its continued fraction (Lentz's method; Numerical Recipes §6.4)."""
    tail = 0.5 * betainc(df / 2, 0.5, df / (df + x * x))
    return 1 - tail if x > 0 else tail


def betainc(a, b, x):
    """The regularised incomplete beta function I_x(a, b), x in [0, 1]."""
    if x <= 0 or x >= 1:
        return float(x >= 1)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(1 - x))
    if x > (a + 1) / (a + b + 2):  # the fraction converges fast on this side only: use the symmetry
        return 1 - betainc(b, a, 1 - x)
    f, c, d = 1.0, 1.0, 0.0
    for i in range(400):
        m = i // 2
        num = 1.0 if i == 0 else (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)) if i % 2 == 0
                                  else -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)))
        d = 1 + num * d
        d = 1 / (d if abs(d) > 1e-300 else 1e-300)
        c = 1 + num / (c if abs(c) > 1e-300 else 1e-300)
        f *= c * d
        if abs(c * d - 1) < 1e-15:
            break
    return front * (f - 1) / a


def p_value(a, b):
    """The two-sided p-value of the paired t test of a - b = 0 (n seeds, n - 1 degrees of freedom)."""
    diffs = [x - y for x, y in zip(a, b)]
    n, mean = len(diffs), sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0:
        return 0.0 if mean != 0 else 1.0
    return 2 * t_cdf(-abs(mean) / (sd / math.sqrt(n)), n - 1)


def holm(pvalues):
    """Holm's step-down adjustment (1979) of a family of p-values, in their order: reject where <= 0.05."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted


def t_quantile(q, df):
    """The q quantile of Student's t on df degrees of freedom (bisection on t_cdf, to ~1e-12)."""
    lo, hi = -1e3, 1e3
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
    return (lo + hi) / 2


def equivalent(a, b, margin):
    """Two one-sided tests at 5 % each (Schuirmann 1987): True when the 90 % t interval of the paired
    difference lies inside (-margin, margin), i.e. the arms are the same to within the margin."""
    diffs = [x - y for x, y in zip(a, b)]
    n, mean = len(diffs), sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    half = t_quantile(0.95, n - 1) * sd / math.sqrt(n)
    return -margin < mean - half and mean + half < margin
