"""The mean of a score over training seeds and its 95% Student-t interval.

Seeds are few (3 to 10), so the interval uses Student's t with seeds − 1 degrees of freedom, not
the normal 1.96: with 3 seeds the half-width is 4.30 · sd / √3. mamba-ft does not depend on
SciPy, so the t quantile is found here by bisection on the t distribution's CDF, itself a
Simpson integral of the density (error far below the two decimals the reports print).
"""

from __future__ import annotations

import math
import statistics
from functools import lru_cache

LEVEL = 0.95


def _t_density(x: float, df: int) -> float:
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))


def _t_cdf_above_half(x: float, df: int, steps: int = 2000) -> float:
    """P(0 < T < x) for x >= 0, by Simpson's rule (steps even)."""
    h = x / steps
    total = _t_density(0.0, df) + _t_density(x, df)
    total += sum((4 if i % 2 else 2) * _t_density(i * h, df) for i in range(1, steps))
    return total * h / 3


@lru_cache(maxsize=None)
def t_quantile(p: float, df: int) -> float:
    """The p-quantile (p > 1/2) of Student's t with `df` degrees of freedom."""
    target = p - 0.5
    lo, hi = 0.0, 1.0
    while _t_cdf_above_half(hi, df) < target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf_above_half(mid, df) < target else (lo, mid)
    return (lo + hi) / 2


def seed_interval(values: list[float]) -> tuple[float, float | None]:
    """(mean, half-width of the 95% t-interval); half-width None for a single seed."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    sd = statistics.stdev(values)
    return mean, t_quantile(0.5 + LEVEL / 2, len(values) - 1) * sd / math.sqrt(len(values))
