"""Confidence intervals for ICL gains and gain ratios (docs/icl.md, "Intervals").

Everything here is a normal approximation from recorded means and standard errors:
- a gain is a fixed linear combination of scores, so its document standard error is the root
  of the sum of (coefficient × standard error)², scores taken as independent;
- the spread over few-shot seeds adds its standard error of the mean, std / sqrt(seeds);
- a ratio of two such gains gets Fieller's interval: the values R for which
  gain(model) − R·gain(baseline) is within z standard errors of 0. Unlike the delta method's
  symmetric interval it is exact under the same normal model, and it is unbounded exactly when
  the baseline's own interval contains 0, so such a ratio is never given a finite range.
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

    The set {R : (num − R·den)² ≤ z²(se_num² + R²·se_den²)} is the quadratic inequality
    a·R² − 2·num·den·R + c ≤ 0 with a = den² − z²·se_den², c = num² − z²·se_num². With a > 0
    (the denominator's interval excludes 0) it is the finite interval between the roots; the
    discriminant num²·se_den² + se_num²·a is then never negative. With a ≤ 0 the set is the
    whole line or the outside of two roots: unbounded either way.
    """
    a = den * den - (z * se_den) ** 2
    if a <= 0:
        return None
    half_width = z * math.sqrt(num * num * se_den * se_den + se_num * se_num * a)
    return (num * den - half_width) / a, (num * den + half_width) / a
