"""Confidence intervals for ICL gains and gain ratios (docs/icl.md, "Intervals").

Everything here is a normal approximation from recorded means and standard errors:
- a gain is a fixed linear combination of scores, so its document standard error is the root
  of the sum of (coefficient × standard error)², scores taken as independent;
- the spread over few-shot seeds adds its standard error of the mean, std / sqrt(seeds);
- a ratio of two such gains gets Fieller's interval: the values R for which
  gain(model) − R·gain(baseline) is within z standard errors of 0. Unlike the delta method's
  symmetric interval it is exact under the same normal model, and it is unbounded exactly when
  the baseline's own interval contains 0, so such a ratio is never given a finite range.
  `fieller_set` is the same set for any squared half-widths, a covariance included (the
  ratio over training seeds of `mamba-ft paper`, paired by seed).
"""

from __future__ import annotations

import math
from statistics import NormalDist

LEVEL = 0.95
Z = NormalDist().inv_cdf(0.5 + LEVEL / 2)  # 1.95996...


def linear_se(terms: list[tuple[float, float]]) -> float:
    """Standard error of Σ c·x over independent x, from (c, se(x)) pairs."""
    return math.sqrt(sum((c * se) ** 2 for c, se in terms))


def normal_interval(mean: float, se: float, z: float = Z) -> tuple[float, float]:
    return mean - z * se, mean + z * se


def fieller_interval(num: float, se_num: float, den: float, se_den: float,
                     z: float = Z) -> tuple[float, float] | None:
    """Fieller's interval for num/den (independent, normal); None when it is unbounded.

    The set {R : (num − R·den)² ≤ z²(se_num² + R²·se_den²)}: `fieller_set` with the squared
    half-widths z²·se_num² and z²·se_den² and no covariance.
    """
    return fieller_set(num, den, (z * se_num) ** 2, 0.0, (z * se_den) ** 2)


def fieller_set(num: float, den: float, h_nn: float, h_nd: float, h_dd: float) -> tuple[float, float] | None:
    """{R : (num − R·den)² ≤ h_nn − 2·R·h_nd + R²·h_dd} as (low, high); None when unbounded.

    The h's are squared half-widths (quantile² × (co)variance) of num and den: Fieller's set of
    ratios R for which num − R·den is within its own half-width of 0. With a quantile q and a
    covariance matrix V, h = q²·V; a sum of such forms (parts of the error with their own
    quantiles) is allowed too. The set is the quadratic inequality a·R² − 2·b·R + c ≤ 0 with
    a = den² − h_dd, b = num·den − h_nd, c = num² − h_nn. With a > 0 (the denominator's
    interval, den ± √h_dd, excludes 0) it is the finite interval between the roots; for a
    positive semi-definite form the discriminant b² − a·c is then never negative (R = num/den
    satisfies the inequality). With a ≤ 0 the set is the whole line or the outside of two
    roots: unbounded either way.
    """
    a = den * den - h_dd
    if a <= 0:
        return None
    b = num * den - h_nd
    half_width = math.sqrt(max(b * b - a * (num * num - h_nn), 0.0))
    return (b - half_width) / a, (b + half_width) / a
